"""The six stage scripts and every GPU benchmark in one call, within a 10-minute device command on one H100 or
H200, ending in one markdown table.

    python bench/gpu_suite.py              # on a GPU: the reference shapes; on a CPU: the scripts' tiny shapes
    python bench/gpu_suite.py --only train,explainer

Each benchmark runs as its own process under a time limit (one failure or time-out does not stop the
others); its full output goes to $OUT/<name>.log when OUT is set (the device tool brings $OUT back). The
table has each benchmark's headline lines (throughput, peak memory, ratios against the plain path), its
wall time and how it ended. Budget: SUITE's limits add up to 7 min 30 s, PUBLIC's is 2 min more.

Last, with its own limit, the released LLaDA-8B and Dream-7B at full size with random weights
(bench/public_models_gpu.py: a scan batch, a transcoder step and a step graph each); its own table follows the
suite's. The whole suite keeps within --budget seconds (default 570: a 10-minute device command, with room for
the suite's own start): a benchmark's limit is cut to the time left, and one with less than MIN_LIMIT seconds
left is skipped.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
# torch's on-disk compile cache, shared by every benchmark and stage process (git-ignored; the device tool's
# `carry` can bring it to a bare card, which then skips most of the compilation)
INDUCTOR_CACHE = ROOT / ".cache" / "inductor"
# name, time limit (s), script and flags: on a GPU the reference shape, sized to the budget
SUITE = [
    ("stages", 210, ["bench/gpu_stages.py", "--limit", "75"]),  # the six stage scripts themselves, first
    ("train", 50, ["bench/train_throughput.py", "--steps", "20", "--warmup", "4"]),
    ("transcoders", 40, ["bench/transcoder_throughput.py", "--steps", "10", "--warmup", "2"]),
    ("topk", 40, ["bench/topk_throughput.py", "--batches", "8"]),
    ("generate", 25, ["bench/generate_throughput.py", "--steps", "16,64", "--batch_sizes", "1,32"]),
    ("explainer", 60, ["bench/explainer_throughput.py", "--compare", "--rounds", "2"]),
    ("graph", 25, ["bench/graph_throughput.py", "--repeats", "2"]),
]
# run after SUITE: the released models at full size (on a CPU: tiny configs); the graph at 128 positions
# fits the limit (the script's default, 512, is its own run of up to 8 minutes)
PUBLIC = ("public_models", 120, ["bench/public_models_gpu.py", "--graph_seq_len", "128"])
BUDGET = 570  # seconds for the whole suite
MIN_LIMIT = 30  # a benchmark with less time left than this is skipped
# the lines a table row keeps: the numbers, not the set-up chatter
HEADLINE = re.compile(r"^stage \w+:|tokens/s|(descriptions|judgements)/s(?!\w)|peak memory|MFU|\bratios?\b|graph:|"
                      r"whole step|^device |vs CPU", re.I)


def run(name: str, limit: int, cmd: list[str], logs: Path | None) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env={"TORCHINDUCTOR_CACHE_DIR": str(INDUCTOR_CACHE), **os.environ,
                                   "PYTHONUNBUFFERED": "1"})
        out, status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode() if isinstance(x, bytes) else x for x in (e.stdout or "", e.stderr or ""))
        status = f"time-out ({limit} s)"
    wall = time.perf_counter() - t0
    if logs is not None:
        (logs / f"{name}.log").write_text(out)
    lines = [line.strip() for line in out.splitlines() if HEADLINE.search(line) and "Warning" not in line]
    if status != "ok" and not lines:
        lines = [line.strip() for line in out.splitlines() if line.strip()][-2:]
    return {"name": name, "status": status, "wall": wall, "lines": lines, "output": out}


def time_left_limit(limit: int, left: float) -> int | None:
    """The limit a benchmark runs under with `left` seconds of the budget left: its own, cut to what is left;
    None (skip it) when less than MIN_LIMIT seconds are left."""
    return None if left < MIN_LIMIT else min(limit, int(left))


def skipped(name: str, left: float) -> dict:
    return {"name": name, "status": f"skipped ({max(0, left):.0f} s of the budget left)", "wall": 0.0, "lines": [],
            "output": ""}


def markdown_tables(out: str) -> list[str]:
    """The markdown table lines of a benchmark's output."""
    return [line.strip() for line in out.splitlines() if line.strip().startswith("|")]


def table(rows: list[dict]) -> str:
    out = ["| benchmark | result | wall | status |", "|---|---|---|---|"]
    for r in rows:
        result = "<br>".join(line.replace("|", "\\|") for line in r["lines"]) or "–"
        out.append(f"| {r['name']} | {result} | {r['wall']:.0f} s | {r['status']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole suite")
    args = p.parse_args()
    start = time.perf_counter()
    wanted = {x for x in args.only.split(",") if x}
    logs = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if CUDA:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        print(smi.stdout.strip(), flush=True)
    rows = []
    public_cmd = [*PUBLIC[2], *(["--device", "cuda"] if CUDA else ["--device", "cpu", "--tiny"])]
    for name, limit, cmd in [*SUITE, (PUBLIC[0], PUBLIC[1], public_cmd)]:
        if wanted and name not in wanted:
            continue
        left = args.budget - (time.perf_counter() - start)
        cut = time_left_limit(limit, left)
        if cut is None:
            rows.append(skipped(name, left))
            print(f"== {name}: {rows[-1]['status']}", flush=True)
            continue
        limit = cut
        if not CUDA and name == "explainer":
            cmd = [*cmd, "--tiny"]  # Flan-T5-small's shape would take minutes on a CPU
        if not CUDA and name == "graph":  # its default is the reference shape, 40 s a step on a CPU
            cmd = [*cmd, "--num_layers", "2", "--model_dim", "64", "--num_heads", "2", "--n_vocab", "1317",
                   "--expansion_factor", "8", "--k", "8"]
        print(f"== {name} (limit {limit} s)", flush=True)
        rows.append(run(name, limit, cmd, logs))
        print("\n".join(rows[-1]["lines"]) + f"\n== {name}: {rows[-1]['status']}, {rows[-1]['wall']:.0f} s", flush=True)
    print()
    print(table(rows))
    public = [r for r in rows if r["name"] == PUBLIC[0] and markdown_tables(r["output"])]
    if public:
        print("\nReleased models at full size, random weights (bench/public_models_gpu.py):\n")
        print("\n".join(markdown_tables(public[0]["output"])))


if __name__ == "__main__":
    main()
