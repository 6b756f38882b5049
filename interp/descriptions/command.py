"""Stage 5's command: `main(cfg)` and the console script `diffusion-interp-describe` (also what
`python get_activation_descriptions.py` and `python -m interp.descriptions.command` run)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from core import cli
from interp.descriptions.config import IGNORED, DescriptionsConfig
from interp.descriptions.stage import run_descriptions


def main(cfg: DescriptionsConfig) -> Path:
    return run_descriptions(cfg)


def command(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (`argv`, default sys.argv[1:]) and describe; a mistake is one line, exit 2."""
    cli.run(main, DescriptionsConfig, argv, description=DescriptionsConfig.__doc__, ignored=IGNORED)


if __name__ == "__main__":
    command()
