"""Command-line flags from config dataclasses, and the one-line error contract.

Every command declares one dataclass (a `Flags`; a stage's lives in the library beside its code); each
field carries a one-line help text and a check of its value (`core.checks`) in its metadata.
`run(main, Config)` builds the parser from it, checks every value, from the command line or a `--config`
file alike, against the field's declared type and check (then the dataclass' own `__post_init__` checks,
which raise ValueError), calls `main(cfg)`, and turns a `UserError` or an `OSError` into one line on
stderr (`prog: error: ...`) and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from core.checks import Kind, Range
from core.files import UserError


def arg(default: Any, help: str, check: Range | Kind | None = None) -> Any:
    """A dataclass field with its --help text and the check of its value (every number and text flag of a
    `Flags` has one; a bool or a `Literal` needs none)."""
    meta = {"help": help, "check": check}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Flags:
    """A config whose fields are checked when it is made: type, then each field's declared check."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check_value(type(self), f.name, getattr(self, f.name))


@functools.cache
def _fields(cls: type) -> dict[str, tuple[Any, bool, Any]]:
    """Per field: (its type without Optional, whether None is allowed, its declared check)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (*_unwrap_optional(hints[f.name]), f.metadata.get("check")) for f in dataclasses.fields(cls)}


def field_type(cls: type, name: str) -> tuple[Any, bool]:
    """(the field's type without Optional, whether None is allowed)."""
    return _fields(cls)[name][:2]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return "a list of " + _type_name(typing.get_args(tp)[0]).removeprefix("a ").removeprefix("an ") + "s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(tp, str(tp))


def _is(tp: Any, value: Any) -> bool:
    if typing.get_origin(tp) is Literal:  # the same value and type (True is not 1)
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_is(typing.get_args(tp)[0], v) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def check_value(cls: type, name: str, value: Any) -> None:
    """The field's declared type, then its check (ValueError naming the flag)."""
    tp, optional, check = _fields(cls)[name]
    if value is None and optional:
        return
    if not _is(tp, value):
        raise ValueError(f"--{name} must be {_type_name(tp)}, got {value!r:.60} ({type(value).__name__})")
    if check is not None:
        for v in value if isinstance(value, list) else [value]:
            check.check(name, v)


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
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError (one line, no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(message.replace("argument ", "", 1) + " (--help lists the flags)")


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
        kwargs["type"] = {int: parse_int, float: parse_float}.get(inner, inner)
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
        kwargs["type"] = parse_float
    else:
        kwargs["type"] = str
    parser.add_argument(f"--{name}", **kwargs)


def build_parser(cls: type, description: str, ignored: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = OneLineParser(description=description, allow_abbrev=False, prog=program_name())
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
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
    if p.is_dir():
        raise UserError(f"--config {path}: a folder, not a file")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: not UTF-8 text (byte {e.start}); expected JSON or YAML") from None
    yaml_file = p.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError, RecursionError
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"--config {path}: not valid {'YAML' if yaml_file else 'JSON'} ({first})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    return {str(k).lstrip("-"): v for k, v in values.items()}


def _from_file(cls: type, name: str, value: Any) -> Any:
    """A --config value in the field's own terms: one item of a list flag becomes a list, an integral float
    of an int flag an int, a number of a flag whose check takes numbers as text (--mask_ratio) text."""
    tp, _, check = _fields(cls)[name]
    inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp

    def one(v: Any) -> Any:
        if inner is int and isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return int(v)
        if inner is str and getattr(check, "numbers_as_text", False) and isinstance(v, (int, float)) \
                and not isinstance(v, bool):
            return str(v)
        return v

    if typing.get_origin(tp) is list:
        return [one(v) for v in value] if isinstance(value, list) else [one(value)]
    return one(value)


def _flags_on_command_line(argv: Sequence[str]) -> set[str]:
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}


RUN_SECTIONS = {"train", "model", "tokenizer", "data"}  # a run's config.json: stage 1's flags under "train"


def is_run_config(values: dict) -> bool:
    """Whether a --config mapping is a run's config.json (sections, not flags)."""
    sections = isinstance(values.get("train"), dict) and isinstance(values.get("model"), dict)
    return sections and set(values) <= RUN_SECTIONS


def run_config_section(values: dict, path: str, flags: set[str]) -> dict:
    """A run's own config.json as --config: its "train" section (stage 1's flags) when that is all flags of
    this command; otherwise one line saying what to pass. Any other mapping is returned as it is."""
    if not is_run_config(values):
        return values
    unknown = sorted(set(values["train"]) - flags)
    if unknown:
        raise UserError(f"--config {path} is a run's config.json, whose \"train\" section has flags this command "
                        f"does not take ({', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''}): "
                        "train_diffusion.py takes that section; later stages read the run with --train_folder")
    return dict(values["train"])


def parse_config(cls: type, argv: Sequence[str] | None = None, description: str | None = "",
                 ignored: Sequence[str] = ()) -> Any:
    """Parse argv (and its --config file) into `cls`, checking every value against the field's type and
    check first; flags in `ignored` are accepted and reported once. Any mistake is a UserError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, description or (cls.__doc__ or ""), ignored)
    known, _ = parser.parse_known_args(argv)
    names = {f.name for f in dataclasses.fields(cls)}
    from_file: dict[str, Any] = {}
    if known.config:  # the file's values become defaults, so the command line still wins
        values = run_config_section(read_config_file(known.config), known.config, names | set(ignored))
        unknown = sorted(set(values) - names - set(ignored))
        if unknown:
            raise UserError(f"--config {known.config}: unknown flag(s) {', '.join(unknown)}")
        from_file = {k: _from_file(cls, k, v) for k, v in values.items() if k in names}
        for k, v in from_file.items():
            try:
                check_value(cls, k, v)
            except ValueError as e:
                raise UserError(f"--config {known.config}: {e}") from None
        lists = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
        parser.set_defaults(**{k: v for k, v in from_file.items() if k not in lists},
                            **{k: v for k, v in values.items() if k in ignored})
    ns = vars(parser.parse_args(argv))
    for k in set(from_file) & {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}:
        if ns[k] is None:  # a list flag given on the command line replaces the file's list instead of extending it
            ns[k] = from_file[k]
    ns.pop("config")
    given_ignored = [n for n in ignored if ns.pop(n) is not None]
    if given_ignored:
        print("ignored by this stage: " + ", ".join(f"--{n}" for n in given_ignored))
    for f in dataclasses.fields(cls):
        if ns[f.name] is None and f.default_factory is not dataclasses.MISSING:
            ns[f.name] = f.default_factory()
    on_line = _flags_on_command_line(argv)
    if issubclass(cls, Flags):
        for name in names:  # each value alone first, so the message names where it came from
            try:
                check_value(cls, name, ns[name])
            except ValueError as e:
                where = f"--config {known.config}: " if name in from_file and name not in on_line else ""
                raise UserError(f"{where}{e}") from None
    try:
        return cls(**ns)
    except ValueError as e:
        raise UserError(str(e)) from None


DISTRIBUTION = "diffusion-interp"  # the installed project (pyproject.toml), whose console scripts name themselves


@functools.cache
def console_scripts() -> frozenset[str]:
    """The names of the installed project's console scripts (none when it is not installed)."""
    try:
        entry_points = importlib.metadata.distribution(DISTRIBUTION).entry_points
    except importlib.metadata.PackageNotFoundError:
        return frozenset()
    return frozenset(ep.name for ep in entry_points if ep.group == "console_scripts")


def program_name(main: Callable | None = None) -> str:
    """How the user called the command: `python -m <module>`, the script's file name, a console script by
    its name, or (called from Python, as the tests do) the module that defines `main`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and not spec.name.startswith("pytest"):
        return f"python -m {spec.name.removesuffix('.__main__')}"
    if sys.argv and sys.argv[0].endswith(".py"):
        return Path(sys.argv[0]).name
    if sys.argv and Path(sys.argv[0]).name in console_scripts():
        return Path(sys.argv[0]).name
    module = getattr(main, "__module__", None) or "python"
    return f"{module}.py" if "." not in module else f"python -m {module}"


def run(main: Callable[[Any], Any], cls: type, argv: Sequence[str] | None = None, description: str | None = "",
        ignored: Sequence[str] = ()) -> None:
    """The entry point of every script: parse, run, and end user mistakes in one line with exit 2: a
    UserError, or an OSError (a read-only folder, a full disk, a file that vanished)."""
    prog = program_name(main)
    try:
        main(parse_config(cls, argv, description, ignored))
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        what = f"{e.strerror or type(e).__name__}" + (f": {e.filename}" if e.filename else "")
        print(f"{prog}: error: {what} (finished work is kept; fix it and rerun the same command)", file=sys.stderr)
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
            values = read_config_file(path)
            names |= set(values["train"] if is_run_config(values) else values)
    return names - {"config"}
