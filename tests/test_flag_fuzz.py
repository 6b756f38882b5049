"""A fuzz test over the whole command line: every flag of every command, read from the parsers themselves
(a new flag or command is covered the day it is added), gets the bad values of its type, on the command
line and through a `--config` file, and broken `--config` files; each case must end in one line on stderr
naming the flag, exit status 2, no traceback, and no file of the workspace changed.

Bad values are refused before a stage starts, so the stage's `main` here is one that fails the test if a
bad value reaches it. The few bad values only the stage can see (a checkpoint or a layer the run does not
have, a feature the transcoders lack) run through the real stage on a copy of the session's tiny run.
"""
from __future__ import annotations

import dataclasses
import importlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from core import cli
from core.checks import Kind, Range
from tests.helpers import ERROR_LINE, ROOT, assert_one_line_error

RUN = {"--train_folder": "{run}", "--device": "cpu"}
# every command a user runs (the module whose `cli.run` parses it → base flags that make the rest of the command
# line valid); the six stages' modules are also the stage scripts' (SCRIPTS) and the console scripts'
COMMANDS = {
    "training.diffusion_command": {"--experiments_dir": "{ws}/exp", "--data_dir": "{ws}/data", "--device": "cpu"},
    "interp.generation": RUN,
    "training.transcoders_command": RUN,
    "interp.contexts.command": RUN,
    "interp.descriptions.command": {**RUN, "--explainer": "tokens"},
    "interp.explanations.command": {**RUN, "--explainer": "tokens"},
    "data.prepare": {"--data_dir": "{ws}/data"},
    "data.fineweb": {"--data_dir": "{ws}/data"},
    "interp.ground_truth.benchmark": RUN,
    "interp.descriptions.audit": RUN,
    "interp.exports.delphi": RUN,
    "interp.exports.circuit_tracer": RUN,
    "interp.exports.saelens": RUN,
    "interp.exports.sparsify": RUN,
    "interp.exports.neuronpedia": RUN,
    "experiment.hub": RUN,
    "experiment.init_base": {"--model": "{dir}", "--data_dir": "{ws}/data", "--experiments_dir": "{ws}/exp"},
}
# the stage scripts at the top of the repository → the library module whose `command` each runs
SCRIPTS = {
    "train_diffusion": "training.diffusion_command",
    "generate": "interp.generation",
    "train_transcoders": "training.transcoders_command",
    "get_topk_activations": "interp.contexts.command",
    "get_activation_descriptions": "interp.descriptions.command",
    "generate_descriptions": "interp.explanations.command",
}
SOURCE_DIRS = ("core", "data", "model", "experiment", "training", "interp")


def entry_points() -> set[str]:
    """Every module of the project that runs a command through `cli.run`."""
    files = [*ROOT.glob("*.py"), *(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in files
            if p.name != "cli.py" and re.search(r"\bcli\.run\(", p.read_text())}


def command(module: str) -> tuple[type, tuple[str, ...]]:
    """(the config class, the ignored flags) that the module's `cli.run` parses."""
    mod = importlib.import_module(module)
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    name = re.search(r"cli\.run\(.*?, (\w+Config)\b", source).group(1)
    return getattr(mod, name), tuple(getattr(mod, "IGNORED", ()) if "ignored=IGNORED" in source else ())


def field_check(cls: type, f: dataclasses.Field):
    return f.metadata.get("check")


def bad_cli_values(cls: type, f: dataclasses.Field) -> list[str]:
    tp, _ = cli.field_type(cls, f.name)
    inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    check = field_check(cls, f)
    if typing.get_origin(inner) is typing.Literal:
        return ["bogus", ""]
    if inner is bool:
        return ["maybe", "2", ""]
    if isinstance(check, Range):
        return list(check.bad(integer=inner is int))
    return list(check.bad) if isinstance(check, Kind) else []


def bad_file_values(cls: type, f: dataclasses.Field) -> list:
    """Values of the wrong type (and out-of-range numbers) as a JSON config file would hold them."""
    tp, optional = cli.field_type(cls, f.name)
    is_list = typing.get_origin(tp) is list
    inner = typing.get_args(tp)[0] if is_list else tp
    check = field_check(cls, f)
    out: list = [{"a": 1}, [[1]] if is_list else [1]]
    if not optional:
        out.append(None)
    if inner is bool:
        out += ["yes", 1]
    elif inner in (int, float):
        out += ["x", True, math.inf, math.nan] + ([1.5] if inner is int else [])
        if isinstance(check, Range):
            out += [check.low - 1 if not check.low_open else check.low, check.high * 2 + 1]
        else:  # --cuda: an index
            out += [-1, 99]
    elif inner is str and typing.get_origin(inner) is not typing.Literal:
        out += [True] + ([] if getattr(check, "numbers_as_text", False) else [12])
        out += [v for v in getattr(check, "bad", ())]
    else:  # a Literal
        out += ["bogus", 3]
    return out


class Workspace:
    """A folder with a fake run folder and the files the placeholders name; digest() is cheap enough to
    take before and after every case (paths, sizes and modification times)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "run").mkdir(parents=True)
        (root / "run" / "config.json").write_text("{}")
        (root / "a_dir").mkdir()
        (root / "a_file.txt").write_text("some text\n")
        (root / "latin1.txt").write_bytes(b"caf\xe9 \xff\xfe\n")
        self.names = {"{missing}": str(root / "missing"), "{file}": str(root / "a_file.txt"),
                      "{dir}": str(root / "a_dir"), "{nonutf8}": str(root / "latin1.txt"),
                      "{run}": str(root / "run"), "{ws}": str(root)}

    def fill(self, value):
        if isinstance(value, str):
            for k, v in self.names.items():
                value = value.replace(k, v)
        return value

    def digest(self) -> dict:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(self.root.rglob("*"))}


def refused(ws: Workspace, cls: type, ignored, argv: list[str]) -> str | None:
    """None when the case ends as it must; otherwise what went wrong."""
    reached = []
    before = ws.digest()
    err, out = io.StringIO(), io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(out):
            cli.run(lambda cfg: reached.append(cfg), cls, argv, ignored=ignored)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # a traceback
        return f"{type(e).__name__}: {e}"
    else:
        return "accepted" if reached else "no exit"
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code != 2 or len(lines) != 1 or not ERROR_LINE.search(lines[0]):
        return f"exit {code}, stderr {err.getvalue()!r:.300}"
    if ws.digest() != before:
        return "changed the workspace"
    return None


def base_argv(ws: Workspace, module: str, drop: str = "") -> list[str]:
    return [x for k, v in COMMANDS[module].items() if k != drop for x in (k, ws.fill(v))]


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path)


def test_every_command_is_fuzzed_and_every_flag_declares_its_check():
    assert entry_points() == set(COMMANDS), "add the new command to COMMANDS"
    for module in COMMANDS:
        cls, _ = command(module)
        assert issubclass(cls, cli.Flags), module
        for f in dataclasses.fields(cls):
            tp, _ = cli.field_type(cls, f.name)
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            if inner is bool or typing.get_origin(inner) is typing.Literal:
                continue
            assert isinstance(field_check(cls, f), (Range, Kind)), f"{module} --{f.name}: declare its check"



@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_the_base_command_line_is_valid(module, ws):
    cls, ignored = command(module)
    reached = []
    cli.run(lambda cfg: reached.append(cfg), cls, base_argv(ws, module), ignored=ignored)
    assert len(reached) == 1


CASES_RUN: dict[str, int] = {}


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_every_flag_refuses_every_bad_value(module, ws):
    cls, ignored = command(module)
    failures, n = [], 0
    for f in dataclasses.fields(cls):
        flag = f"--{f.name}"
        for value in bad_cli_values(cls, f):
            n += 1
            argv = base_argv(ws, module, drop=flag) + [flag, ws.fill(value)]
            if (why := refused(ws, cls, ignored, argv)) is not None:
                failures.append(f"{flag} {value!r}: {why}")
        for value in bad_file_values(cls, f):
            n += 1
            config = ws.root / "bad.json"
            config.write_text(json.dumps({f.name: ws.fill(value)}))
            argv = base_argv(ws, module, drop=flag) + ["--config", str(config)]
            if (why := refused(ws, cls, ignored, argv)) is not None:
                failures.append(f"--config {{{f.name}: {value!r}}}: {why}")
            config.unlink()
    CASES_RUN[module] = n
    assert not failures, f"{len(failures)} of {n} cases:\n" + "\n".join(failures[:30])


BROKEN_CONFIGS = {
    "binary.json": b"\x00\x01\x02\xff\xfe",
    "latin1.yaml": "train_steps: caf\xe9".encode("latin-1"),
    "list.json": b"[1, 2]",
    "scalar.yaml": b"3",
    "empty.json": b"",
    "invalid.json": b"{not json",
    "invalid.yaml": b"a: [1, 2\n",
    "unknown.json": b'{"no_such_flag": 1}',
    "deep.json": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_broken_config_files_are_one_line(module, ws):
    cls, ignored = command(module)
    failures = []
    for name, data in BROKEN_CONFIGS.items():
        (ws.root / name).write_bytes(data)
        if (why := refused(ws, cls, ignored, base_argv(ws, module) + ["--config", str(ws.root / name)])) is not None:
            failures.append(f"{name}: {why}")
        (ws.root / name).unlink()
    for path in ("{missing}", "{dir}"):
        if (why := refused(ws, cls, ignored, base_argv(ws, module) + ["--config", ws.fill(path)])) is not None:
            failures.append(f"--config {path}: {why}")
    assert not failures, "\n".join(failures)


CONFLICTS = [
    ("training.diffusion_command", ["--cuda", "0", "--device", "cpu"]),
    ("training.diffusion_command", ["--val_tokens", "100", "--val_seq_len", "4096"]),
    ("training.diffusion_command", ["--model_dim", "96", "--num_heads", "5"]),
    ("training.diffusion_command", ["--model_dim", "90", "--num_heads", "6"]),
    ("interp.generation", ["--gen_length", "10", "--block_length", "3"]),
    ("interp.generation", ["--gen_length", "8", "--block_length", "4", "--num_generate_steps", "3"]),
    ("interp.contexts.command", ["--scan_batches", "5", "--train_steps", "2", "--grad_acc_steps", "2"]),
    ("interp.ground_truth.benchmark", ["--noise_levels", "0.5", "--noise_levels", "2"]),
    ("interp.explanations.command", ["--prompt", "x", "--gen_length", "6", "--block_length", "4"]),
]


@pytest.mark.parametrize("module,flags", CONFLICTS)
def test_conflicting_flags_are_one_line(module, flags, ws):
    cls, ignored = command(module)
    assert refused(ws, cls, ignored, base_argv(ws, module) + flags) is None


@pytest.mark.slow
def test_the_real_entry_points_behave_the_same(tmp_path):
    """A bad flag through `python <script>` / `python -m <module>` (a script, a tool, a module that runs
    another's main): the program's name, one line, exit 2 (started together; each costs an interpreter)."""
    ws = Workspace(tmp_path)
    procs = {}
    for program in ("train_diffusion", "generate_descriptions", "interp.descriptions.audit", "data.fineweb"):
        args = [f"{program}.py"] if "." not in program else ["-m", program]
        argv = base_argv(ws, SCRIPTS.get(program, program)) + ["--seed_that_is_not", "1"]
        procs[program] = subprocess.Popen([sys.executable, *args, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
    for program, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert_one_line_error(done, "unrecognized arguments: --seed_that_is_not")
        assert done.returncode == 2
        name = f"{program}.py" if "." not in program else f"python -m {program}"
        assert err.strip().startswith(f"{name}: error: "), err


def test_every_stage_script_runs_its_library_command():
    """The scripts at the top are thin: each re-exports its stage's config and `main` and runs its `command`."""
    found = {p.stem for p in ROOT.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()} - {"demo"}
    assert found == set(SCRIPTS), "add the new script to SCRIPTS"
    for script, module in SCRIPTS.items():
        mod, lib = importlib.import_module(script), importlib.import_module(module)
        cls, _ = command(module)
        assert mod.main is lib.main and mod.command is lib.command and getattr(mod, cls.__name__) is cls, script
        assert "\n    command()\n" in (ROOT / f"{script}.py").read_text(), script


def test_every_console_script_resolves_and_refuses_a_bad_flag_in_one_line(capsys):
    """pyproject.toml's console scripts: one per stage, each its module's `command`, installed as declared;
    a bad flag is one line naming the flag, exit 2 (called in-process; the next test runs one installed)."""
    import tomllib  # Python 3.11+, as the project's environment
    from importlib.metadata import distribution

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(declared.values()) == sorted(f"{m}:command" for m in SCRIPTS.values())
    installed = {ep.name: ep.value for ep in distribution(cli.DISTRIBUTION).entry_points
                 if ep.group == "console_scripts"}
    assert installed == declared, "the installed entry points are stale: pip install --no-deps -e . (make test does)"
    for name, target in declared.items():
        module, attr = target.split(":")
        fn = getattr(importlib.import_module(module), attr)
        assert callable(fn), name
        with pytest.raises(SystemExit) as e:
            fn(["--seed_that_is_not", "1"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and ERROR_LINE.search(err), (name, err)
        assert "unrecognized arguments: --seed_that_is_not" in err, (name, err)


@pytest.mark.slow
def test_an_installed_console_script_names_itself_in_its_one_line_error(tmp_path):
    """The installed command, run from another folder: its own name, one line, exit 2."""
    name = "diffusion-interp-topk"
    exe = shutil.which(name, path=str(Path(sys.executable).parent))
    assert exe, f"{name} is not installed beside {sys.executable}: pip install --no-deps -e . (make test does)"
    done = subprocess.run([exe, "--train_folder", str(tmp_path), "--seed_that_is_not", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(done, "unrecognized arguments: --seed_that_is_not")
    assert done.returncode == 2 and done.stderr.strip().startswith(f"{name}: error: "), done.stderr


def test_run_dependent_values_are_refused_by_the_stage(tiny_descriptions, tiny_run, tmp_path):
    """What only the run can refuse (a checkpoint or layer it lacks, ...), through the real stage."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("explanations", "ground_truth.json", "exports",
                                                                 "hub"))
    ws = Workspace(tmp_path / "ws")
    ws.names["{run}"] = str(run)
    failures, n = [], 0
    for module in COMMANDS:
        if "--train_folder" not in COMMANDS[module]:
            continue
        cls, ignored = command(module)
        main = importlib.import_module(module).main
        for f in dataclasses.fields(cls):
            for value in getattr(field_check(cls, f), "runs", ()):
                n += 1
                flag = f"--{f.name}"
                argv = base_argv(ws, module, drop=flag) + [flag, value]
                before = {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}
                err = io.StringIO()
                try:
                    with redirect_stderr(err), redirect_stdout(io.StringIO()):
                        cli.run(main, cls, argv, ignored=ignored)
                    failures.append(f"{module} {flag} {value}: accepted")
                except SystemExit as e:
                    lines = [x for x in err.getvalue().splitlines() if x.strip()]
                    if e.code != 2 or len([x for x in lines if ERROR_LINE.search(x)]) != 1:
                        failures.append(f"{module} {flag} {value}: exit {e.code} {err.getvalue()!r:.300}")
                except Exception as e:
                    failures.append(f"{module} {flag} {value}: {type(e).__name__}: {e}")
                if {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} != before:
                    failures.append(f"{module} {flag} {value}: changed the run folder")
    assert n >= 19 and not failures, "\n".join(failures)


@pytest.mark.slow
def test_unreadable_paths_are_one_line(tmp_path):
    """A folder or file the user may not read (as an unprivileged user: root reads everything, so the suite,
    when it runs as root, drops to `nobody` with setpriv)."""
    import os
    import stat
    import tempfile

    shared = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        shared.chmod(0o755)
        ws = Workspace(shared / "ws")
        for p in (shared / "ws", shared / "ws" / "run"):
            p.chmod(0o755)
        (shared / "ws" / "run" / "config.json").chmod(0o644)
        locked_dir, locked_file = shared / "ws" / "locked_run", shared / "ws" / "prompts.txt"
        locked_dir.mkdir()
        (locked_dir / "config.json").write_text("{}")
        locked_dir.chmod(0)
        locked_file.write_text("a prompt\n")
        locked_file.chmod(0)
        config = shared / "ws" / "c.json"
        config.write_text("{}")
        config.chmod(0)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        env = {**os.environ, "HOME": str(shared), "PYTHONDONTWRITEBYTECODE": "1"}
        base = ["generate.py", "--device", "cpu"]
        cases = [(["--train_folder", str(locked_dir)], "not readable"),
                 (["--train_folder", ws.names["{run}"], "--prompts_file", str(locked_file)], "not readable"),
                 (["--train_folder", ws.names["{run}"], "--config", str(config)], "cannot read it")]
        procs = [subprocess.Popen([*drop, sys.executable, *base, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for flags, _ in cases]
        for proc, (_, needle) in zip(procs, cases):
            out, err = proc.communicate(timeout=300)
            assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), needle)
            assert proc.returncode == 2
        assert stat.S_IMODE(locked_file.stat().st_mode) == 0 and locked_file.read_text() == "a prompt\n"
    finally:
        for p in shared.rglob("*"):
            p.chmod(0o700)
        shutil.rmtree(shared)
