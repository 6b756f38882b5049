"""Stage 3's command: `main(cfg)` and the console script `diffusion-interp-transcoders` (also what
`python train_transcoders.py` and `python -m training.transcoders_command` run)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from core import cli
from training.config import TranscoderTrainConfig
from training.transcoders import train_transcoders


def main(cfg: TranscoderTrainConfig) -> Path:
    return train_transcoders(cfg)


def command(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (`argv`, default sys.argv[1:]) and train; a mistake is one line, exit 2."""
    cli.run(main, TranscoderTrainConfig, argv, description=TranscoderTrainConfig.__doc__)


if __name__ == "__main__":
    command()
