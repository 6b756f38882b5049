"""Damaged and torn files: a reader never rewrites another stage's output, a torn last line of an appended
file is redone by its writer only, a damaged line or file is one line naming it, a killed writer's
temporary files go when its folder is resumed, and a changed byte in tensor data is caught by a checksum."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from core import cli
from core.files import (
    UserError,
    load_checkpoint,
    load_safetensors,
    read_jsonl,
    remove_stale_temporaries,
    resume_jsonl,
    save_checkpoint,
    save_safetensors,
)

STEM = "state_step000400"
RECORDS = Path("descriptions") / STEM / "descriptions.jsonl"
TOPK = Path("topk") / STEM


def copy_run(tiny_run: Path, dst: Path, *without: str) -> Path:
    """The session's run (its transcoders, top-k output and `tokens` descriptions too) without `without`."""
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("explanations", "exports", "hub", "ground_truth.json",
                                                                 *without))
    return dst


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys, main, config, argv: list[str]) -> str:
    """Run a program in-process: it must end with exit status 2 and one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, config, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("\r", "tokenizing"))]
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    return lines[0]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- the JSON-lines reader -------------------------------------------------------------------------------


def test_jsonl_reader_torn_tails_and_damaged_lines(tmp_path):
    records = [{"i": i, "text": "café …"} for i in range(4)]
    whole = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path = tmp_path / "a.jsonl"
    last = json.dumps(records[-1], ensure_ascii=False).encode()
    cuts = {"no newline": whole[:-1], "cut inside a character": whole[:len(whole) - len(last) - 1 + last.index(
        "…".encode()) + 1], "cut in JSON": whole[:-5]}
    for name, data in cuts.items():
        path.write_bytes(data)
        assert read_jsonl(path, appended=True) == records[:3], name  # read only: the file is not changed
        assert path.read_bytes() == data, name
        assert resume_jsonl(path) == records[:3], name  # the writer drops the torn line
        assert path.read_bytes() == whole[:len(whole) - len(last) - 1], name
    path.write_bytes(whole + b"\n  \n")  # blank lines are no records
    assert read_jsonl(path) == records == read_jsonl(path, appended=True)
    path.write_bytes(whole[:-1])  # a file written whole may lack its last newline
    assert read_jsonl(path) == records
    for damage in (b"\xff", b"{", b"[1]"):
        lines = whole.split(b"\n")
        lines[1] = damage
        path.write_bytes(b"\n".join(lines))
        for appended in (False, True):
            with pytest.raises(UserError, match=rf"{path} line 2 is damaged"):
                read_jsonl(path, appended=appended)
        with pytest.raises(UserError, match="line 2 is damaged"):
            resume_jsonl(path)
        assert path.read_bytes() == b"\n".join(lines)
    path.write_bytes(whole[:-5])  # a file written whole has no torn line: its last line is damaged
    with pytest.raises(UserError, match="line 4 is damaged"):
        read_jsonl(path)


def test_metrics_reader_leaves_a_torn_line_to_the_writer(tmp_path):
    from experiment.record import read_metrics, truncate_metrics

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    data = ("\n".join(lines) + "\n" + lines[0][:7]).encode()
    (tmp_path / "metrics.jsonl").write_bytes(data)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "metrics.jsonl").read_bytes() == data
    truncate_metrics(tmp_path, 2)  # the writer, when it resumes
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"


# --- descriptions.jsonl: a torn last line, a damaged middle line -----------------------------------------


def torn(pristine: bytes, inside_character: bool) -> bytes:
    """descriptions.jsonl whose last record (given a description with multi-byte characters) was cut short."""
    lines = pristine.split(b"\n")
    assert lines[-1] == b""
    last = json.loads(lines[-2])
    last["description"] = "café … " + (last["description"] or "")
    line = json.dumps(last, ensure_ascii=False).encode()
    cut = line.index("…".encode()) + 1 if inside_character else line.index(b'"feature"')
    return b"\n".join(lines[:-2]) + b"\n" + line[:cut]


@pytest.mark.parametrize("inside_character", [True, False], ids=["cut-in-a-character", "cut-in-ascii"])
def test_a_torn_last_description_is_read_around_and_redone_only_by_stage_5(inside_character, tiny_run,
                                                                            tiny_descriptions, tmp_path, capsys):
    from generate_descriptions import ExplainConfig, main as explain
    from get_activation_descriptions import DescriptionsConfig, main as describe
    from interp.exports.delphi import DelphiExportConfig, main as export

    run = copy_run(tiny_run, tmp_path / "run")
    path = run / RECORDS
    pristine = path.read_bytes()
    n = len(pristine.splitlines())
    damaged = torn(pristine, inside_character)
    path.write_bytes(damaged)

    out = tmp_path / "e.json"  # stage 6 reads the descriptions without changing them
    cli.run(explain, ExplainConfig, ["--train_folder", str(run), "--explainer", "tokens", "--device", "cpu", "--prompt",
                                     "The capital of France is", "--gen_length", "2", "--num_generate_steps", "2",
                                     "--output", str(out)])
    assert out.is_file() and path.read_bytes() == damaged
    if inside_character:  # so does the delphi export (it read bytes cut inside a character as text before)
        cli.run(export, DelphiExportConfig, ["--train_folder", str(run), "--device", "cpu", "--output",
                                             str(tmp_path / "delphi")])
        assert path.read_bytes() == damaged
        described = [r for r in map(json.loads, pristine.splitlines()[:-1]) if r["description"] is not None]
        assert len(list((tmp_path / "delphi" / "tokens" / "explanations").iterdir())) == len(described)
    capsys.readouterr()

    cli.run(describe, DescriptionsConfig, ["--train_folder", str(run), "--explainer", "tokens", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "describing 1 features" in printed and f"{n - 1} already done" in printed, printed
    assert path.read_bytes() == pristine  # exactly the torn record was redone, every finished one kept


def test_a_damaged_middle_description_is_one_line_for_every_reader(tiny_run, tiny_descriptions, tmp_path, capsys):
    from generate_descriptions import ExplainConfig, main as explain
    from get_activation_descriptions import DescriptionsConfig, main as describe
    from interp.exports.delphi import DelphiExportConfig, main as export

    run = copy_run(tiny_run, tmp_path / "run")
    path = run / RECORDS
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:20] + b"\xff" + lines[2][21:]
    path.write_bytes(b"\n".join(lines))
    before = tree_digest(run)
    common = ["--train_folder", run, "--device", "cpu"]
    for main, config, argv in [
        (describe, DescriptionsConfig, [*common, "--explainer", "tokens"]),
        (explain, ExplainConfig, [*common, "--explainer", "tokens", "--prompt", "A", "--output", tmp_path / "e.json"]),
        (export, DelphiExportConfig, common),
    ]:
        line = one_error_line(capsys, main, config, argv)
        assert f"{path} line 3 is damaged" in line, line
        assert tree_digest(run) == before, main.__module__
    assert not list(run.rglob("*.partial")) and not (run / "exports").exists() and not (tmp_path / "e.json").exists()


# --- the top-k output: index.json, contexts.jsonl, features.jsonl -----------------------------------------


def corrupt(path: Path) -> None:
    data = path.read_bytes()
    if path.suffix == ".json":
        path.write_bytes(data[:len(data) // 2] + "…".encode()[:2])  # cut short, inside a character
    else:
        lines = data.split(b"\n")
        lines[1] = lines[1][:len(lines[1]) // 2]  # a line cut short in the middle of the file
        path.write_bytes(b"\n".join(lines))


CORRUPT = [(name, program) for name in ("index.json", "layer_00/contexts.jsonl", "layer_00/features.jsonl")
           for program in ("stage5", "audit", "export") if (name, program) != ("layer_00/features.jsonl", "export")]


@pytest.mark.parametrize("name,program", CORRUPT)
def test_a_corrupt_topk_file_is_one_line_and_changes_nothing(name, program, tiny_run, tiny_descriptions, tmp_path,
                                                              capsys):
    from get_activation_descriptions import DescriptionsConfig, main as describe
    from interp.descriptions.audit import AuditConfig, main as audit
    from interp.exports.delphi import DelphiExportConfig, main as export

    run = copy_run(tiny_run, tmp_path / "run", *(["descriptions"] if program == "stage5" else []))
    path = run / TOPK / name
    corrupt(path)
    before = tree_digest(run)
    main, config, extra = {"stage5": (describe, DescriptionsConfig, ["--explainer", "tokens", "--device", "cpu"]),
                           "audit": (audit, AuditConfig, []),
                           "export": (export, DelphiExportConfig, ["--device", "cpu"])}[program]
    line = one_error_line(capsys, main, config, ["--train_folder", run, *extra])
    assert str(path) in line and ("damaged" in line or "not valid JSON" in line), line
    assert tree_digest(run) == before
    assert not list(run.rglob("*.partial")) and not (run / "exports").exists()


# --- temporary files of a killed writer ---------------------------------------------------------------------


def test_stale_temporaries_of_dead_processes_only(tmp_path):
    (tmp_path / "sub").mkdir()
    dead, mine = dead_pid(), os.getpid()
    files = {name: tmp_path / name for name in (f".a.json.{dead}.tmp", f"sub/.b.pt.{dead}.tmp", f".c.pt.{mine}.tmp",
                                                 ".d.pt.1.tmp", "e.tmp", f"f.{dead}.tmp")}
    for p in files.values():
        p.write_text("x")
    assert remove_stale_temporaries(tmp_path, recursive=False) == [files[f".a.json.{dead}.tmp"]]
    assert remove_stale_temporaries(tmp_path) == [files[f"sub/.b.pt.{dead}.tmp"]]  # pid 1 is alive, this one is us
    assert remove_stale_temporaries(tmp_path, held=True) == [files[".d.pt.1.tmp"]]  # a held folder: all but ours
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [f".c.pt.{mine}.tmp", "e.tmp",
                                                                           f"f.{dead}.tmp"]


def test_an_orphan_temporary_of_a_killed_scan_is_removed_on_resume(tiny_run, tiny_transcoders, tmp_path, capsys):
    from get_topk_activations import TopKConfig, main as topk

    run = copy_run(tiny_run, tmp_path / "run", "topk", "descriptions")
    argv = ["--train_folder", str(run), "--device", "cpu", "--train_seq_len", "128", "--batch_size", "4",
            "--scan_batches", "2", "--n_top", "4", "--context_before", "4", "--context_after", "2", "--n_quantile", "2",
            "--n_random", "2"]
    cli.run(topk, TopKConfig, argv)
    out = run / TOPK
    finished = tree_digest(out)
    (out / "index.json").unlink()  # killed while writing the layer files: no index yet, one half-written file
    orphan = out / "layer_00" / f".contexts.jsonl.{dead_pid()}.tmp"
    orphan.write_text('{"feature": 0, "top": [')
    cli.run(topk, TopKConfig, argv)
    assert not orphan.exists()
    assert tree_digest(out) == finished
    capsys.readouterr()


# --- checksums of tensor data ------------------------------------------------------------------------------


def flip_byte_in(path: Path, tensor: torch.Tensor) -> None:
    """Change one bit of `tensor`'s bytes where the file holds them."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.detach().cpu().contiguous().numpy().tobytes()[:64])
    assert at > 0
    data[at + 13] ^= 0x04
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_transcoder_is_one_line(tiny_run, tiny_transcoders, tmp_path, capsys):
    from interp.exports.circuit_tracer import CircuitTracerExportConfig, main as export

    run = copy_run(tiny_run, tmp_path / "run", "topk", "descriptions")
    path = run / "transcoders" / STEM / "blocks.0.mlp" / "sae.safetensors"
    flip_byte_in(path, load_safetensors(path)["W_dec"])
    line = one_error_line(capsys, export, CircuitTracerExportConfig, ["--train_folder", run, "--output",
                                                                      tmp_path / "ct"])
    assert f"{path} is damaged" in line, line
    assert not list((tmp_path / "ct").glob("*.safetensors"))


def test_a_flipped_byte_in_a_checkpoint_is_one_line(tiny_run, tmp_path, capsys):
    from generate import GenerateConfig, main as generate

    run = copy_run(tiny_run, tmp_path / "run", "transcoders", "topk", "descriptions")
    path = run / f"{STEM}.pt"
    state = torch.load(path, weights_only=True)
    assert isinstance(state.get("sha256"), str)  # written with its checksum
    flip_byte_in(path, max(state["model"].values(), key=torch.Tensor.numel))
    line = one_error_line(capsys, generate, GenerateConfig, ["--train_folder", run, "--checkpoint_name", path.name,
                                                             "--device", "cpu", "--prompt", "A", "--gen_length", "2",
                                                             "--num_generate_steps", "2"])
    assert f"checkpoint {path} is damaged" in line, line


def test_arrays_and_files_without_a_checksum(tiny_topk, tmp_path):
    from safetensors.torch import load_file, save_file

    from interp.contexts.store import read_arrays

    path = tmp_path / "arrays.safetensors"
    shutil.copy(tiny_topk / "layer_01" / "arrays.safetensors", path)
    arrays = read_arrays(path)
    assert arrays.keys() == load_file(str(path)).keys()
    flip_byte_in(path, arrays["top_values"])
    with pytest.raises(UserError, match=f"{path} is damaged"):
        read_arrays(path)
    # written by an older version or another tool: no checksum, loaded as it is
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    assert all(torch.equal(v, tensors[k]) for k, v in load_safetensors(tmp_path / "plain.safetensors").items())
    state = {"model": tensors, "step": 3, "optimizers": [{"state": {0: {"m": torch.zeros(2)}}, "lr": 0.1}]}
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["step"] == 3
    save_checkpoint(tmp_path / "new.pt", state)  # the checksum entry is checked and removed on load
    loaded = load_checkpoint(tmp_path / "new.pt")
    assert sorted(loaded) == sorted(state) and torch.equal(loaded["model"]["b"], tensors["b"])
    save_safetensors(tmp_path / "new.safetensors", tensors)
    assert load_file(str(tmp_path / "new.safetensors")).keys() == tensors.keys()  # still plain safetensors
