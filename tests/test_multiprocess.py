"""The interpretation stages under torchrun with two gloo processes on the CPU: the scan (each process a
share of the batches) and the descriptions (each a share of the features) merge into exactly one
process's outputs, and a killed two-process scan resumes to them."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, run_cli

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def copy_run(tiny_run, dest):
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("topk", "descriptions", "explanations", "exports",
                                                                  "hub"))
    return dest


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it (it starts each worker in a session of its own, so a
    signal to its process group would miss them): the whole job dies at once, as in a crash."""
    parent_of = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as fh:
                    parent_of[int(stat)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    job, grew = {proc.pid}, True
    while grew:
        more = {pid for pid, parent in parent_of.items() if parent in job} - job
        job |= more
        grew = bool(more)
    for pid in job:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def topk_args(run, **flags) -> list[str]:
    cfg = dict(device="cpu", train_seq_len=128, batch_size=8, scan_batches=6, n_top=10, context_before=8,
               context_after=4, n_quantile=6, n_random=6)
    cfg.update(flags)
    return ["get_topk_activations.py", "--train_folder", str(run)] + [x for k, v in cfg.items()
                                                                      for x in (f"--{k}", str(v))]


def assert_same_scan(a, b) -> None:
    """Two top-k outputs are the same: every example, statistic and array; the float64 activation sums (and
    the means made from them) to 1e-12, as their summation order differs."""
    layers = json.loads((a / "index.json").read_text())["layers"]
    assert json.loads((b / "index.json").read_text())["layers"] == layers
    for layer in layers:
        la, lb = a / f"layer_{layer:02d}", b / f"layer_{layer:02d}"
        assert (la / "contexts.jsonl").read_text() == (lb / "contexts.jsonl").read_text()
        fa = [json.loads(x) for x in (la / "features.jsonl").read_text().splitlines()]
        fb = [json.loads(x) for x in (lb / "features.jsonl").read_text().splitlines()]
        for x, y in zip(fa, fb, strict=True):
            assert y.pop("mean_activation") == pytest.approx(x.pop("mean_activation"), rel=1e-12)
            assert x == y
        ta, tb = load_file(str(la / "arrays.safetensors")), load_file(str(lb / "arrays.safetensors"))
        assert ta.keys() == tb.keys()
        for k in ta:
            if k == "act_sum":
                assert (ta[k] - tb[k]).abs().max() <= 1e-12 * ta[k].abs().max()
            else:
                torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=0, equal_nan=True, msg=k)


def test_two_process_scan_equals_one_process(tiny_run, tiny_topk, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    proc = run_cli(TORCHRUN + topk_args(run), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 processes" in proc.stdout
    out = run / "topk" / tiny_topk.name
    assert not list(out.glob("scan_state*"))  # every process's state file is gone once the output is written
    assert_same_scan(tiny_topk, out)


def test_killed_two_process_scan_resumes(tiny_run, tiny_transcoders, tmp_path):
    one = copy_run(tiny_run, tmp_path / "one")
    two = copy_run(tiny_run, tmp_path / "two")
    flags = dict(scan_batches=40, checkpoint_every=1, checkpoint_minutes=0)
    ref = run_cli(topk_args(one, scan_batches=40), timeout=600)  # (checkpoints change nothing in the output)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = two / "topk" / "state_step000400"
    proc = subprocess.Popen([sys.executable, *TORCHRUN, *topk_args(two, **flags)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not all((out / f"scan_state.rank{r}of2.pt").exists() for r in (0, 1)):
        assert proc.poll() is None, "the scan finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    kill_job(proc)
    assert not (out / "index.json").exists()
    saved = [torch.load(out / f"scan_state.rank{r}of2.pt", weights_only=True)["next_batch"] for r in (0, 1)]
    assert min(saved) < 40, saved  # killed mid-scan (a finished process saves 40 before the merge)
    done = run_cli(TORCHRUN + topk_args(two, **flags), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming the scan" in done.stdout
    assert_same_scan(one / "topk" / "state_step000400", out)


def describe_args(run, t5, **flags) -> list[str]:
    cfg = dict(explainer=str(t5), device="cpu", batch_size=2, max_features_per_layer=7, n_examples=2,
               max_new_tokens=4, n_score=2, scorers="detection,fuzzing,token_match")
    cfg.update(flags)
    return ["get_activation_descriptions.py", "--train_folder", str(run)] + [x for k, v in cfg.items()
                                                                             for x in (f"--{k}", str(v))]


def records(run) -> list[dict]:
    path = run / "descriptions" / "state_step000400" / "descriptions.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_two_process_descriptions_equal_one_process(tiny_run, tiny_topk, tiny_llms, tmp_path):
    """A tiny T5 explains and judges: each process loads it and takes every other batch of features."""
    one, two = copy_run(tiny_run, tmp_path / "one"), copy_run(tiny_run, tmp_path / "two")
    for run in (one, two):
        shutil.copytree(tiny_run / "topk", run / "topk")
    # torchrun gives each process one thread; so does the reference: with another thread count the judge's
    # probabilities differ in their 7th digit (float32 sums in another order), the descriptions do not
    a = run_cli(describe_args(one, tiny_llms["t5"]), env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_cli(TORCHRUN + describe_args(two, tiny_llms["t5"]), timeout=600)
    assert b.returncode == 0, b.stderr[-3000:]
    assert "from 2 processes" in b.stdout
    ra, rb = records(one), records(two)
    assert len(ra) == 14 and ra == rb  # the same records, in the same order
    assert not list((two / "descriptions" / "state_step000400").glob("*.part*"))
    summary = json.loads((two / "descriptions" / "state_step000400" / "summary.json").read_text())
    assert summary["explainers"] == json.loads((one / "descriptions" / "state_step000400" / "summary.json")
                                               .read_text())["explainers"]


def test_killed_two_process_descriptions_lose_and_redo_nothing(tiny_run, tiny_topk, tiny_llms, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    shutil.copytree(tiny_run / "topk", run / "topk")
    args = TORCHRUN + describe_args(run, tiny_llms["t5"], batch_size=1, max_features_per_layer=60, n_score=6,
                                    max_new_tokens=8)
    out = run / "descriptions" / "state_step000400"
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def finished_in_parts() -> int:
        return sum(p.read_text().count("\n") for p in out.glob("*.part*"))

    while finished_in_parts() < 3:
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    kill_job(proc)
    assert not (out / "descriptions.jsonl").exists(), "killed too late: the parts were already folded"
    before = {(r["layer"], r["feature"]): r for p in out.glob("*.part*") for r in
              (json.loads(x) for x in p.read_text().splitlines() if x.endswith("}"))}
    done = run_cli(args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = records(run)
    keys = [(r["layer"], r["feature"]) for r in after]
    assert len(keys) == len(set(keys)) == 120  # every feature once: nothing lost, nothing redone
    assert all(after[keys.index(k)] == r for k, r in before.items())  # finished records untouched
    assert f"{len(before)} already done" in done.stdout


def test_two_process_scan_resumes_with_one_process_behind_the_other(tiny_run, tiny_transcoders, tmp_path):
    """Killed when one process's checkpoint was well behind the other's (each keeps its own state file): the
    resumed job continues each from its own, and the output is still one process's."""
    one, two = copy_run(tiny_run, tmp_path / "one"), copy_run(tiny_run, tmp_path / "two")
    flags = dict(scan_batches=64, checkpoint_every=1, checkpoint_minutes=0)
    ref = run_cli(topk_args(one, scan_batches=64), timeout=600)  # (checkpoints change nothing in the output)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = two / "topk" / "state_step000400"
    rank0, rank1 = out / "scan_state.rank0of2.pt", out / "scan_state.rank1of2.pt"

    def next_batch(path):
        try:
            return torch.load(path, weights_only=True)["next_batch"]
        except Exception:  # not written yet, or replaced while read
            return None

    proc = subprocess.Popen([sys.executable, *TORCHRUN, *topk_args(two, **flags)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stash, deadline = None, time.time() + 300
    while stash is None or (next_batch(rank0) or 0) < 20:  # rank 0 scans the even batches up to 62
        data = rank1.read_bytes() if rank1.exists() else None
        if stash is None and data is not None and next_batch(rank1) is not None:
            stash = data  # rank 1's first checkpoint
        assert proc.poll() is None, "the scan finished before it could be killed"
        assert time.time() < deadline
    kill_job(proc)
    assert not (out / "index.json").exists()
    rank1.write_bytes(stash)  # the process behind
    done = run_cli(TORCHRUN + topk_args(two, **flags), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_scan(one / "topk" / "state_step000400", out)
