"""Prepare a dataset once: choose or train the tokenizer, tokenize into shards, write meta.json.

    python -m data.prepare --dataset synthetic
    python -m data.prepare --dataset path/to/corpus --tokenizer bpe:8192
    python -m data.fineweb --num_shards 8            (the same, for FineWeb-edu)

Each dataset gets its own folder under --data_dir, named after its source and tokenizer; it is written as
<name>.partial and renamed into place once complete. Rerunning skips what is finished (a complete folder
returns at once; an interrupted one resumes after its last shard; one that failed is removed).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, NamedTuple, Optional

from core import checks as c, cli
from core.cli import Flags, arg
from core.files import UserError, read_json, remove_stale_temporaries, write_json_atomic
from core.locks import hold_output
from data import sources
from data.tokenizer import (
    BPETokenizer,
    ModelTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    parse_tokenizer_name,
    train_bpe,
)
from data.writer import ShardPlan, write_shards

META_FILE = "meta.json"
PARTIAL_SUFFIX = ".partial"  # <dataset>.partial: a new dataset being written, renamed into place when complete
SYNTHETIC_MB = c.positive(10_000.0)  # MB of synthetic text


def _dataset(flag: str, value: str) -> None:
    """fineweb-edu, synthetic, or a file or folder that exists (what it holds is checked when it is read)."""
    if value not in ("fineweb-edu", "synthetic"):
        c.IN_PATH.check(flag, value)


def _tokenizer(flag: str, value: str) -> None:
    if not value:
        return
    try:
        kind, arg_ = parse_tokenizer_name(value)
    except UserError as e:
        raise ValueError(f"--{flag}: {e}") from None
    if kind == "bpe":
        c.count(258, 1_000_000).check(f"{flag} bpe:<size>", arg_)
    elif kind == "file":
        c.TEXT_FILE.check(flag, value)


DATASET = c.Kind("dataset", _dataset, ("", "{missing}"))
TOKENIZER = c.Kind("tokenizer", _tokenizer, ("bogus", "bpe:x", "bpe:-5", "bpe:0", "{missing}.json", "{dir}.json"))


@dataclass
class PrepareConfig(Flags):
    """Tokenize a corpus into shards (shard 0 = validation)."""

    dataset: str = arg("fineweb-edu", "fineweb-edu, synthetic, or the path of a .txt/.jsonl/.parquet file or folder",
                       DATASET)
    tokenizer: str = arg("", "gpt2, bpe:<vocab size> (trained on the corpus), a tokenizer.json, or hf:<folder> "
                             "(a released model's own tokenizer and ids); empty: gpt2 for fineweb-edu, bpe:4096 "
                             "otherwise", TOKENIZER)
    data_dir: str = arg("data_cache", "where prepared datasets live, one folder each", c.ROOT_FOLDER)
    subset: str = arg("sample-10BT", "FineWeb-edu subset (sample-10BT, sample-100BT, sample-350BT, default, "
                                     "CC-MAIN-...)", c.NAME)
    num_shards: Optional[int] = arg(None, "training shards to write (FineWeb-edu; default 8); local and "
                                          "synthetic corpora are always tokenized whole", c.count(1, 100_000))
    shard_size: int = arg(100_000_000, "tokens per training shard", c.COUNT)
    val_tokens: int = arg(10_000_000, "tokens in the validation shard (FineWeb-edu)", c.COUNT)
    val_fraction: float = arg(0.05, "fraction of documents in the validation shard (local and synthetic corpora)",
                              c.fraction(low_open=True, high_open=True))
    workers: int = arg(os.cpu_count() or 1, "tokenizer worker processes", c.count(1, 1024))
    synthetic_mb: float = arg(4.0, "size of the synthetic corpus in MB of text", SYNTHETIC_MB)
    seed: int = arg(0, "seed of the synthetic corpus", c.SEED)
    txt_sample_by: Literal["document", "paragraph", "line"] = arg(
        "paragraph", "how a .txt file splits into documents")
    bpe_train_docs: int = arg(100_000, "documents used to train a BPE tokenizer", c.COUNT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tokenizer:
            self.tokenizer = "gpt2" if self.dataset == "fineweb-edu" else "bpe:4096"
        parse_tokenizer_name(self.tokenizer)  # an unknown name fails here, before any work


class PreparedData(NamedTuple):
    folder: Path
    tokenizer: Tokenizer
    meta: dict


def _tok_tag(name: str) -> str:
    """The tokenizer's part of a dataset folder's name (a released model's: a hash of its tokenizer and ids, so
    two tokenizers never share a folder)."""
    kind, value = parse_tokenizer_name(name)
    if kind == ModelTokenizer.KIND:
        return ModelTokenizer.tag(str(value))
    return f"bpe{value}" if kind == "bpe" else Path(str(value)).stem if kind == "file" else str(value)


def _params(cfg: PrepareConfig) -> dict:
    """The settings that determine the shards' content (a folder is reused only if they match)."""
    keep = ["dataset", "tokenizer", "shard_size"]
    by_source = {"fineweb-edu": ["subset", "val_tokens", "bpe_train_docs"],
                 "synthetic": ["synthetic_mb", "seed", "val_fraction"]}
    keep += by_source.get(cfg.dataset, ["val_fraction", "txt_sample_by", "bpe_train_docs"])
    return {k: v for k, v in asdict(cfg).items() if k in keep}


def _get_tokenizer(name: str, folder: Path, texts) -> Tokenizer:
    """Load a named tokenizer, or train a BPE on `texts()` once and keep it in the dataset folder."""
    kind, value = parse_tokenizer_name(name)
    if kind == "tiktoken":
        return TiktokenTokenizer.from_name(str(value))
    if kind == ModelTokenizer.KIND:
        tok: Tokenizer = ModelTokenizer.from_model_folder(str(value))
    elif kind == "file":
        tok = BPETokenizer.from_file(str(value))
    elif (folder / "tokenizer.json").exists():
        return BPETokenizer.from_file(folder / "tokenizer.json")
    else:
        print(f"training a byte-level BPE tokenizer ({value} tokens) on the corpus")
        assert isinstance(value, int)  # parse_tokenizer_name gives a bpe size as an int
        tok = train_bpe(texts(), value)
    tok.save(folder)
    return tok


def prepare_dataset(cfg: PrepareConfig) -> PreparedData:
    """Make sure the dataset's shards exist (resuming if interrupted) and return where they are."""
    tag = _tok_tag(cfg.tokenizer)
    if cfg.dataset == "fineweb-edu":
        name, files = f"fineweb-edu_{cfg.subset}_{tag}", None
    elif cfg.dataset == "synthetic":
        name, files = f"synthetic_seed{cfg.seed}_{cfg.synthetic_mb:g}mb_{tag}", None
    else:
        files = sources.local_files(cfg.dataset)
        name = f"local_{Path(cfg.dataset).resolve().stem}_{sources.local_key(files)}_{tag}"
    folder = Path(cfg.data_dir) / name
    params = _params(cfg)
    meta = _finished(cfg, folder, params)
    if meta is not None:
        return PreparedData(folder, load_tokenizer(meta["tokenizer"], folder), meta)
    with hold_output(folder, f"the dataset {folder}"):  # two preparations at once would write the same shards
        meta = _finished(cfg, folder, params)  # finished by another run meanwhile
        if meta is not None:
            return PreparedData(folder, load_tokenizer(meta["tokenizer"], folder), meta)
        if folder.exists():  # more shards for a finished dataset (or one an older version left unfinished): each
            return _write(cfg, files, params, folder, folder)  # shard appears whole, meta.json last
        # a new dataset is written under another name and appears whole, by one rename, once it is complete
        partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
        _resume_or_clear(partial, params)
        try:
            prepared = _write(cfg, files, params, folder, partial)
        except KeyboardInterrupt:
            raise  # interrupted: the next run resumes after the last finished shard
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # failed: nothing half-written is left behind
            raise
        os.rename(partial, folder)
        return prepared


def _finished(cfg: PrepareConfig, folder: Path, params: dict) -> dict | None:
    """The meta.json of `folder` if it holds the dataset complete (and, for FineWeb-edu, with enough shards)."""
    meta_path = folder / META_FILE
    if meta_path.exists():
        meta = read_json(meta_path)  # a damaged one: one line naming it
        if meta.get("params") != params:
            raise UserError(f"{folder} was prepared with other settings ({meta.get('params')}); "
                            "delete it or choose another --data_dir")
        if meta.get("complete") and (cfg.num_shards is None or cfg.dataset != "fineweb-edu"
                                     or meta["train_shards"] >= cfg.num_shards):
            return meta
    return None


def _resume_or_clear(partial: Path, params: dict) -> None:
    """An interrupted run's unfinished folder is resumed when made with these settings, removed otherwise."""
    if not partial.exists():
        return
    try:
        same = json.loads((partial / META_FILE).read_text()).get("params") == params
    except (OSError, ValueError):
        same = False
    if not same:
        print(f"note: removing {partial}, an unfinished preparation with other settings")
        shutil.rmtree(partial)


def _write(cfg: PrepareConfig, files, params: dict, folder: Path, work: Path) -> PreparedData:
    """Write the dataset `folder` in `work` (`folder` itself, or its unfinished sibling)."""
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work)  # a killed preparation's unfinished shard
    meta_path = work / META_FILE
    write_json_atomic(meta_path, {"params": params, "complete": False})

    labelled, num_shards = False, None
    records: Callable[[int], Iterable[tuple[str, list | None]]]
    if cfg.dataset == "fineweb-edu":
        ds = sources.open_fineweb(cfg.subset)
        num_shards = cfg.num_shards or 8
        texts = lambda: (row["text"] for row in itertools.islice(ds, cfg.bpe_train_docs))  # noqa: E731
        records = lambda skip: ((row["text"], None) for row in ds.skip(skip))  # noqa: E731
        plan, total = ShardPlan(cfg.dataset, cfg.shard_size, val_tokens=cfg.val_tokens, num_shards=num_shards), None
    else:
        if cfg.dataset == "synthetic":
            docs = sources.write_synthetic(work, cfg.synthetic_mb, cfg.seed)
            labelled, texts, prefix = True, lambda: (t for t, _ in docs), "synthetic"
            records = lambda skip: itertools.islice(docs, skip, None)  # noqa: E731
            total = len(docs)
        else:
            ds = sources.open_local(files, Path(cfg.data_dir) / ".hf_cache", cfg.txt_sample_by)
            texts = lambda: (t for t in ds.select(range(min(len(ds), cfg.bpe_train_docs)))["text"])  # noqa: E731
            records = lambda skip: ((row["text"], None) for row in ds.select(range(skip, len(ds))))  # noqa: E731
            total, prefix = len(ds), "local"
        if total < 2:
            raise UserError(f"{cfg.dataset} has {total} document(s); a validation and a training split need at least 2")
        val_docs = max(1, min(total - 1, round(cfg.val_fraction * total)))
        plan = ShardPlan(prefix, cfg.shard_size, val_docs=val_docs)

    tok = _get_tokenizer(cfg.tokenizer, work, texts)
    shards = write_shards(records, tok, work, plan, workers=cfg.workers, labelled=labelled, total_docs=total,
                          source_name=cfg.dataset)
    n_train = len(shards) - 1
    if n_train < 1:
        raise UserError(f"{cfg.dataset} filled only the validation shard; it is too small to train on")
    if num_shards is not None and n_train < num_shards:
        raise UserError(f"{cfg.dataset} ({cfg.subset}) ran out after {n_train} training shard(s) of "
                        f"{cfg.shard_size:,} tokens, {num_shards} asked for")
    meta = {"params": params, "complete": True, "source": cfg.dataset, "tokenizer": tok.spec(),
            "n_vocab": tok.n_vocab, "vocab_size": tok.vocab_size, "labels": labelled,
            "train_shards": n_train, "shards": shards,
            "val_tokens": shards[0]["n_tokens"], "train_tokens": sum(s["n_tokens"] for s in shards[1:])}
    if labelled:
        meta.update(concepts="concepts.json", facts="facts.jsonl", corpus="corpus.jsonl")
    write_json_atomic(meta_path, meta)
    print(f"prepared {folder}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens "
          f"in {n_train} + 1 shard(s), " + (f"{tok.name}'s vocabulary ({tok.n_vocab:,} rows, the mask id inside)"
                                             if isinstance(tok, ModelTokenizer) else
                                             f"vocabulary {tok.n_vocab:,} (+[MASK], [PAD]; embedding "
                                             f"{tok.vocab_size:,})"))
    return PreparedData(folder, tok, meta)


def main(cfg: PrepareConfig) -> PreparedData:
    return prepare_dataset(cfg)


if __name__ == "__main__":
    cli.run(main, PrepareConfig)
