"""A stage's output, or a resumed run, against the settings asked for now: one check, one message."""
from __future__ import annotations

from typing import Iterable

from core.files import UserError

_ABSENT = object()


def refuse_other_settings(what: str, saved: dict, now: dict, remedy: str,
                          names: Iterable[str] | None = None) -> None:
    """UserError `{what} with other settings {name: (saved, now), ...}; {remedy}` when any of `names` has
    another value in `saved` (what was recorded) than in `now`, a name missing on one side counting as another
    value (shown as None). `names` default to every name either holds, those asked for now first."""
    names = list(dict.fromkeys([*now, *saved])) if names is None else names
    diff = {k: (saved.get(k), now.get(k)) for k in names if saved.get(k, _ABSENT) != now.get(k, _ABSENT)}
    if diff:
        raise UserError(f"{what} with other settings {diff}; {remedy}")
