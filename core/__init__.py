"""The bottom layer: files written atomically, JSON, checkpoints, the user-error type (`files`), and
command-line flags from config dataclasses (`cli`). It imports nothing else of the project."""
