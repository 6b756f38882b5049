"""The one progress bar: tqdm on a terminal, nothing where the output is a file or a pipe (a log)."""
from __future__ import annotations

from typing import Any

from tqdm import tqdm


def progress(iterable: Any = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (`iterable` and tqdm's keywords) drawn only when `show` and its stream (stderr unless
    `file=`) is a terminal: tqdm's `disable=None`, so bars never fill a redirected log."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if show else True, **kwargs)
