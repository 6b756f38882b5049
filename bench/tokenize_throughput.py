"""Tokenization throughput of data preparation on the synthetic corpus, by worker count.

    python bench/tokenize_throughput.py [--mb 16] [--workers 1,2,4]

Prints tokens/s and the speed-up over one worker (the whole shard-writing path: tokenize, label,
write). Numbers go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.synthetic import generate_documents  # noqa: E402
from data.tokenizer import train_bpe  # noqa: E402
from data.writer import ShardPlan, write_shards  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=float, default=16.0, help="synthetic corpus size in MB of text")
    p.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated worker counts")
    args = p.parse_args()
    docs = [(d.text, d.spans) for d in generate_documents(int(args.mb * 1e6), seed=0)]
    tok = train_bpe((t for t, _ in docs[:20_000]), 4096)
    print(f"corpus: {len(docs):,} documents, {args.mb:g} MB; tokenizer {tok.name}; {os.cpu_count()} CPU cores")
    base = None
    for workers in [int(w) for w in args.workers.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(tmp)
            t0 = time.perf_counter()
            plan = ShardPlan("bench", 10_000_000, val_docs=100)
            shards = write_shards(lambda skip: docs[skip:], tok, Path(tmp), plan, workers=workers, labelled=True,
                                  total_docs=len(docs))
            dt = time.perf_counter() - t0
        n = sum(s["n_tokens"] for s in shards)
        base = base or n / dt
        print(f"workers={workers}: {n:,} tokens in {dt:.2f} s = {n / dt:,.0f} tokens/s (x{n / dt / base:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
