"""Command-line flags from config dataclasses, and the one-line error contract.

Every stage script declares one dataclass; each field carries a one-line help text in its metadata.
`run(main, Config)` builds the parser from it, validates (the dataclass' `__post_init__` raises
ValueError), calls `main(cfg)`, and turns a `UserError` into one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from core.files import UserError


def arg(default: Any, help: str) -> Any:
    """A dataclass field with its --help text."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def require_positive(cfg: Any, *names: str) -> None:
    """For a config's __post_init__: every named field must be > 0 (ValueError naming the flag)."""
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")


def require_non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be 0 or positive, got {getattr(cfg, name)}")


def check_mask_ratio(value: str) -> None:
    """'random' (the training noise process) or a fixed t in [0, 1]."""
    if value == "random":
        return
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"--mask_ratio must be 'random' or a number in [0, 1], got {value!r}") from None
    if not 0 <= t <= 1:
        raise ValueError(f"--mask_ratio must lie in [0, 1], got {t}")


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_int(text: str) -> int:
    # int() already accepts "4_096"; this also accepts "1e6"-style integers written as floats.
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if value != int(value):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        return int(value)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _add_field(parser: argparse.ArgumentParser, name: str, tp: Any, default: Any, help: str) -> None:
    tp, optional = _unwrap_optional(tp)
    kwargs: dict[str, Any] = {"default": default, "help": f"{help} (default: {default!r})"}
    origin = typing.get_origin(tp)
    if origin is Literal:
        kwargs["choices"] = list(typing.get_args(tp))
        kwargs["type"] = type(kwargs["choices"][0])
    elif origin is list:
        (inner,) = typing.get_args(tp)
        kwargs["type"] = parse_int if inner is int else inner
        kwargs["action"] = "append"
        kwargs["default"] = None  # argparse would append to the default list otherwise
    elif tp is bool:
        kwargs["type"] = parse_bool
        kwargs["metavar"] = "True|False"
        kwargs["nargs"] = "?"  # "--quiet" alone means True; "--save_model False" also parses
        kwargs["const"] = True
    elif tp is int:
        kwargs["type"] = parse_int
    elif tp is float:
        kwargs["type"] = float
    else:
        kwargs["type"] = str
    parser.add_argument(f"--{name}", **kwargs)


def build_parser(cls: type, description: str, ignored: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        _add_field(parser, f.name, hints[f.name], default, f.metadata.get("help", ""))
    for name in ignored:
        # nargs="?": a value is optional, so a boolean flag given alone ("--quiet") is accepted too
        parser.add_argument(f"--{name}", default=None, nargs="?", const="",
                            help="accepted for a shared command line; ignored by this stage")
    parser.add_argument("--config", default=None, metavar="FILE.json|yaml",
                        help="flag values from a JSON or YAML file (a mapping of flag names to values); flags "
                             "given on the command line override it")
    return parser


def read_config_file(path: str) -> dict:
    """A JSON or YAML mapping of flag names (without dashes) to values; anything else is a UserError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise UserError(f"--config {path}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                        f"({str(e).splitlines()[0][:120]})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    return {str(k).lstrip("-"): v for k, v in values.items()}


def parse_config(cls: type, argv: Sequence[str] | None = None, description: str = "",
                 ignored: Sequence[str] = ()) -> Any:
    """Parse argv into `cls`; flags in `ignored` are accepted and reported once."""
    parser = build_parser(cls, description or (cls.__doc__ or ""), ignored)
    known, _ = parser.parse_known_args(argv)
    if known.config:  # the file's values become defaults, so the command line still wins
        values = read_config_file(known.config)
        names = {f.name for f in dataclasses.fields(cls)} | set(ignored)
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"--config {known.config}: unknown flag(s) {', '.join(unknown)}")
        lists = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
        parser.set_defaults(**{k: v for k, v in values.items() if k not in lists})
    ns = vars(parser.parse_args(argv))
    if known.config:  # a list flag given on the command line replaces the file's list instead of extending it
        for k in lists & set(values):
            if ns[k] is None:
                ns[k] = list(values[k]) if isinstance(values[k], list) else [values[k]]
    ns.pop("config")
    given_ignored = [n for n in ignored if ns.pop(n) is not None]
    if given_ignored:
        print("ignored by this stage: " + ", ".join(f"--{n}" for n in given_ignored))
    for f in dataclasses.fields(cls):
        if ns[f.name] is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            ns[f.name] = f.default_factory()  # type: ignore[misc]
    try:
        return cls(**ns)
    except ValueError as e:
        raise UserError(str(e)) from None


def run(main: Callable[[Any], Any], cls: type, argv: Sequence[str] | None = None, description: str = "",
        ignored: Sequence[str] = ()) -> None:
    """The entry point of every script: parse, run, and end user mistakes in one line with exit 2."""
    try:
        main(parse_config(cls, argv, description, ignored))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def given_flags(argv: Sequence[str] | None = None) -> set[str]:
    """The names of the flags that appear on the command line or in its --config file (to tell a value the
    user gave from a default)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    for i, a in enumerate(argv):
        path = a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1] if a == "--config" and i + 1 < len(
            argv) else None
        if path:
            names |= set(read_config_file(path))
    return names - {"config"}
