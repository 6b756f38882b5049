"""Stage 1's command: `main(cfg)` and the console script `diffusion-interp-train` (also what
`python train_diffusion.py` and `python -m training.diffusion_command` run)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from core import cli
from training.config import TrainConfig
from training.diffusion import train


def main(cfg: TrainConfig, given: set[str] | None = None) -> Path | None:
    return train(cfg, given)


def command(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (`argv`, default sys.argv[1:]) and train; a mistake is one line, exit 2."""
    cli.run(lambda cfg: main(cfg, cli.given_flags(argv)), TrainConfig, argv, description=TrainConfig.__doc__)


if __name__ == "__main__":
    command()
