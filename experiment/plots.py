"""The one way a stage draws and saves a figure: matplotlib on the Agg backend (files only, no display),
imported on first use, and a PNG written atomically."""
from __future__ import annotations

from pathlib import Path

from core.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """`fig` as a 100 dpi PNG at `path` (written atomically), then closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)
