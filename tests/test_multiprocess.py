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


def topk_args(run, **flags) -> list[str]:
    cfg = dict(device="cpu", train_seq_len=128, batch_size=8, scan_batches=6, top_k=10, context_before=8,
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


def test_killed_two_process_scan_resumes(tiny_run, tmp_path):
    one = copy_run(tiny_run, tmp_path / "one")
    two = copy_run(tiny_run, tmp_path / "two")
    flags = dict(scan_batches=120, checkpoint_every=1)
    ref = run_cli(topk_args(one, **flags), timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = two / "topk" / "state_step000400"
    # a new session: the kill reaches torchrun and both workers
    proc = subprocess.Popen([sys.executable, *TORCHRUN, *topk_args(two, **flags)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not all((out / f"scan_state.rank{r}of2.pt").exists() for r in (0, 1)):
        assert proc.poll() is None, "the scan finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists()
    done = run_cli(TORCHRUN + topk_args(two, **flags), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming the scan" in done.stdout
    assert_same_scan(one / "topk" / "state_step000400", out)
