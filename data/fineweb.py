"""FineWeb-edu → token shards: `python -m data.fineweb --num_shards 8 [--subset sample-10BT] [--workers N]`.

The same pipeline as `python -m data.prepare` with `--dataset fineweb-edu` (the default). It streams
HuggingFaceFW/fineweb-edu with `datasets` (see data.sources.fineweb_stream), so no full download is kept.
"""
from core import cli
from data.prepare import PrepareConfig, main

if __name__ == "__main__":
    cli.run(main, PrepareConfig)
