"""Compare two run folders file by file: do two versions of the code make the same outputs?

    python bench/compare_runs.py experiments/A experiments/B

Files are paired by their path with every run-folder and timestamp name (20261129_161609, …) blanked.
A pair is "same" when its bytes are equal; else JSON / JSONL files are compared as data, with the values
that record when, where and how long (times, durations, absolute paths, the code's commit) left out,
checkpoints (.pt) and .safetensors tensor by tensor; what still differs is listed key by key. Prints one
line per file and a count; exits 1 if anything differs or is missing on one side.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open

STAMP = re.compile(r"\d{8}_\d{6}")
VOLATILE = re.compile(r"(^|_)(time|times|seconds|elapsed|duration|started|finished|date|wall|timestamp|commit|"
                      r"git|source|host|hostname|machine|cpu|processor|pid|path|folder|dir|tokens_per_s|"
                      r"throughput|created)($|_)")


def key(path: Path, root: Path) -> str:
    return STAMP.sub("*", str(path.relative_to(root)))


def scrub(value: Any, root: str) -> Any:
    """The value without the parts that say when, where and how fast it was made."""
    if isinstance(value, dict):
        return {k: scrub(v, root) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [scrub(v, root) for v in value]
    if isinstance(value, str):
        return STAMP.sub("*", value.replace(root, "<run>"))
    return value


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in {'A' if k in a else 'B'}" for k in sorted(set(a) ^ set(b))]
        return out + [d for k in sorted(set(a) & set(b)) for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) else [f"{where}: tensors differ"]
    return [] if a == b else [f"{where}: {str(a)[:60]!r} ≠ {str(b)[:60]!r}"]


def load(path: Path, root: Path) -> Any:
    if path.suffix == ".json":
        return scrub(json.loads(path.read_text(encoding="utf-8")), str(root))
    if path.suffix == ".jsonl":
        return [scrub(json.loads(line), str(root)) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if path.suffix == ".pt":
        return scrub(torch.load(path, map_location="cpu", weights_only=True), str(root))
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return {"tensors": load_file(str(path)), "metadata": scrub(meta, str(root))}
    return STAMP.sub("*", path.read_text(encoding="utf-8", errors="replace").replace(str(root), "<run>"))


def compare(a_root: Path, b_root: Path) -> int:
    a = {key(p, a_root): p for p in a_root.rglob("*") if p.is_file()}
    b = {key(p, b_root): p for p in b_root.rglob("*") if p.is_file()}
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"only in {'A' if name in a else 'B'}  {name}")
            bad += 1
            continue
        if a[name].read_bytes() == b[name].read_bytes():
            print(f"same bytes  {name}")
            continue
        try:
            diff = differences(load(a[name], a_root), load(b[name], b_root))
        except (ValueError, RuntimeError) as e:
            diff = [f"unreadable: {e}"]
        if diff:
            bad += 1
            more = f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""
            print(f"DIFFERS     {name}: " + "; ".join(diff[:5]) + more)
        else:
            print(f"same data   {name} (bytes differ only in times, durations, paths or commit)")
    print(f"{len(set(a) | set(b))} files, {bad} differ or are missing on one side")
    return bad


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/compare_runs.py RUN_A RUN_B")
    sys.exit(1 if compare(Path(sys.argv[1]), Path(sys.argv[2])) else 0)
