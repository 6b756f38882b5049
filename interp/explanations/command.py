"""Stage 6's command: `main(cfg)` and the console script `diffusion-interp-explain` (also what
`python generate_descriptions.py` and `python -m interp.explanations.command` run)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from core import cli
from interp.explanations.config import IGNORED, ExplainConfig
from interp.explanations.stage import run_explanations


def main(cfg: ExplainConfig) -> Path:
    return run_explanations(cfg)


def command(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (`argv`, default sys.argv[1:]) and explain; a mistake is one line, exit 2."""
    cli.run(main, ExplainConfig, argv, description=ExplainConfig.__doc__, ignored=IGNORED)


if __name__ == "__main__":
    command()
