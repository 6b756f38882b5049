"""Stage 4's command: `main(cfg)` and the console script `diffusion-interp-topk` (also what
`python get_topk_activations.py` and `python -m interp.contexts.command` run)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from core import cli
from interp.contexts.config import IGNORED, TopKConfig
from interp.contexts.stage import run_topk


def main(cfg: TopKConfig) -> Path:
    return run_topk(cfg)


def command(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (`argv`, default sys.argv[1:]) and scan; a mistake is one line, exit 2."""
    cli.run(main, TopKConfig, argv, description=TopKConfig.__doc__, ignored=IGNORED)


if __name__ == "__main__":
    command()
