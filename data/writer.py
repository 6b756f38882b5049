"""Documents → token shards, tokenized in worker processes, resumable after the last finished shard.

Shard 0 is validation; shards 1.. are training. Each document becomes [BOS] + its tokens and is never
split across shards (one longer than a whole shard is truncated, and counted). With concept spans
(the synthetic corpus) a parallel labels shard gives every token the concept of the span it lies in.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from core.files import UserError
from core.progress import progress
from data.shards import ShardError, read_header, write_shard
from data.tokenizer import Tokenizer, load_tokenizer

Record = tuple[str, Sequence[tuple[int, int, int]] | None]  # text, optional (start, end, concept) spans
DOCS_PER_TASK = 64


def shard_name(prefix: str, index: int, labels: bool = False) -> str:
    split = "val" if index == 0 else "train"
    return f"{prefix}_{split}_{index:06d}{'.labels' if labels else ''}.bin"


def token_labels(tok: Tokenizer, text: str, ids: Sequence[int], spans: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Concept id per token: the span that contains the token's bytes, leading whitespace aside; else 0."""
    labels = np.zeros(len(ids), dtype=np.int64)
    if not spans:
        return labels
    byte_at = lambda i: len(text[:i].encode("utf-8"))  # noqa: E731 (only called at span boundaries)
    bspans = sorted((byte_at(s), byte_at(e), c) for s, e, c in spans)
    pos, j = 0, 0
    for k, tid in enumerate(ids):
        piece = tok.token_bytes(tid)
        start, end = pos + len(piece) - len(piece.lstrip()), pos + len(piece)
        pos = end
        while j < len(bspans) and bspans[j][1] <= start:
            j += 1
        if start < end and j < len(bspans) and bspans[j][0] <= start and end <= bspans[j][1]:
            labels[k] = bspans[j][2]
    return labels


_WORKER_TOK: Tokenizer | None = None


def _init_worker(spec: dict, folder: str) -> None:
    global _WORKER_TOK
    _WORKER_TOK = load_tokenizer(spec, folder)


def _tokenize_batch(batch: list[Record]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    tok = _WORKER_TOK
    assert tok is not None, "worker used before _init_worker"
    out = []
    for text, spans in batch:
        ids = tok.encode(text)
        labels = None
        if spans is not None:
            labels = np.concatenate([[0], token_labels(tok, text, ids, spans)]).astype(np.uint32)
        out.append((np.asarray([tok.bos_id, *ids], dtype=np.uint32), labels))
    return out


def _batched(records: Iterable[Record], n: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for r in records:
        batch.append(r)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def ordered_map(fn: Callable, tasks: Iterable, workers: int, init: Callable, initargs: tuple) -> Iterator:
    """`map(fn, tasks)` over `workers` processes, in order, with a bounded number of tasks in flight
    (Pool.imap would read a streaming corpus to its end into memory)."""
    if workers <= 1:
        init(*initargs)
        yield from map(fn, tasks)
        return
    # spawn, not fork: the Rust tokenizer's thread pool does not survive a fork reliably.
    with mp.get_context("spawn").Pool(workers, init, initargs) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class ShardPlan:
    prefix: str
    shard_size: int  # max tokens in a training shard
    val_docs: int | None = None  # the validation shard closes after this many documents ...
    val_tokens: int | None = None  # ... or before it would exceed this many tokens
    num_shards: int | None = None  # training shards wanted (None: until the documents run out)


def finished_shards(out_dir: Path, plan: ShardPlan, labelled: bool) -> list[dict]:
    """The contiguous run of complete shards from 0 (an interrupted run resumes after them)."""
    done: list[dict] = []
    while True:
        path = out_dir / shard_name(plan.prefix, len(done))
        if not path.exists():
            return done
        h = read_header(path)  # a corrupt shard is an error, not something to silently overwrite
        if labelled and read_header(out_dir / shard_name(plan.prefix, len(done), labels=True)).n_tokens != h.n_tokens:
            raise ShardError(f"labels shard of {path} does not match it; delete both and prepare again")
        done.append({"file": path.name, "split": "val" if not done else "train", "n_tokens": h.n_tokens,
                     "first_doc": h.first_doc, "n_docs": h.n_docs})


def write_shards(records: Callable[[int], Iterable[Record]], tok: Tokenizer, out_dir: Path,
                 plan: ShardPlan, workers: int = 1, labelled: bool = False, total_docs: int | None = None,
                 source_name: str = "corpus") -> list[dict]:
    """Tokenize `records(skip)` (the documents after the first `skip`) into shards under `out_dir`
    (which also holds the tokenizer's files, for the workers to load)."""
    done = finished_shards(out_dir, plan, labelled)
    if plan.num_shards is not None and len(done) > plan.num_shards:
        return done
    next_doc = done[-1]["first_doc"] + done[-1]["n_docs"] if done else 0
    if done:
        print(f"resuming after {len(done)} finished shard(s), at document {next_doc:,}")
    shards = list(done)
    buf: list[np.ndarray] = []
    lab: list[np.ndarray] = []
    n_buf, first_doc, n_docs, truncated = 0, next_doc, 0, 0

    def capacity() -> int:
        return (plan.val_tokens or plan.shard_size) if not shards else plan.shard_size

    def flush() -> None:
        nonlocal buf, lab, n_buf, first_doc, n_docs
        index = len(shards)
        if labelled:  # labels first: a token shard on disk always has its labels beside it
            write_shard(out_dir / shard_name(plan.prefix, index, labels=True), np.concatenate(lab), 2**16,
                        first_doc, n_docs)
        write_shard(out_dir / shard_name(plan.prefix, index), np.concatenate(buf), tok.vocab_size, first_doc, n_docs)
        shards.append({"file": shard_name(plan.prefix, index), "split": "val" if index == 0 else "train",
                       "n_tokens": n_buf, "first_doc": first_doc, "n_docs": n_docs})
        buf, lab, first_doc, n_buf, n_docs = [], [], first_doc + n_docs, 0, 0

    def enough() -> bool:
        return plan.num_shards is not None and len(shards) > plan.num_shards

    tasks = _batched(records(next_doc), DOCS_PER_TASK)
    bar = progress(total=total_docs, initial=next_doc, unit="doc", desc=f"tokenizing {source_name}")
    with bar:
        for results in ordered_map(_tokenize_batch, tasks, workers, _init_worker, (tok.spec(), str(out_dir))):
            for ids, labels in results:
                cap = capacity()
                if n_buf and n_buf + len(ids) > cap:
                    flush()
                    if enough():
                        break
                    cap = capacity()
                if len(ids) > cap:
                    ids, labels, truncated = ids[:cap], None if labels is None else labels[:cap], truncated + 1
                buf.append(ids)
                lab.append(labels)
                n_buf, n_docs = n_buf + len(ids), n_docs + 1
                if not shards and plan.val_docs is not None and n_docs >= plan.val_docs:
                    flush()
            bar.update(len(results))
            bar.set_postfix(shards=len(shards), refresh=False)
            if enough():
                break
        else:
            if n_buf:
                flush()
    if truncated:
        print(f"note: {truncated} document(s) longer than a shard were truncated to the shard size")
    if not shards or sum(s["n_docs"] for s in shards) == 0:
        raise UserError(f"{source_name} has no documents to tokenize")
    return shards
