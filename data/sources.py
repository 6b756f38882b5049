"""Where documents come from: FineWeb-edu (streamed from the hub), local text files, the synthetic corpus.

`datasets` is imported lazily: the GPU image used for benchmarks does not have it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from core.files import UserError, write_json_atomic, write_text_atomic
from data.synthetic import concept_table, fact_prompts, generate_documents

FINEWEB_REPO = "HuggingFaceFW/fineweb-edu"
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
OFFLINE_HINT = ("offline, use --dataset synthetic (the built-in corpus) or --dataset PATH "
                "(a .txt/.jsonl/.parquet file or folder)")


def fineweb_stream(subset: str) -> Any:
    """FineWeb-edu as a streaming `datasets.IterableDataset` (the only call that needs the hub)."""
    from datasets import load_dataset

    return load_dataset(FINEWEB_REPO, name=subset, split="train", streaming=True)


def open_fineweb(subset: str) -> Any:
    """The stream with its failures turned into one line; tests replace `fineweb_stream` only."""
    try:
        ds = fineweb_stream(subset)
    except (ConnectionError, OSError, TimeoutError) as e:
        raise UserError(f"cannot reach {FINEWEB_REPO} on the Hugging Face hub ({type(e).__name__}); "
                        + OFFLINE_HINT) from None
    except ValueError as e:  # an unknown config name
        raise UserError(f"{FINEWEB_REPO} has no subset {subset!r}: {str(e).splitlines()[0][:200]}") from None
    if "text" not in (ds.column_names or ["text"]):
        raise UserError(f"{FINEWEB_REPO}/{subset} has no 'text' column (columns: {ds.column_names})")
    return ds


def local_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"dataset path {p} does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
    if not files:
        raise UserError(f"{p} holds no .txt, .jsonl or .parquet files")
    bad = [f for f in files if f.suffix not in LOCAL_SUFFIXES]
    if bad:
        raise UserError(f"{bad[0]} is not a .txt, .jsonl or .parquet file")
    return files


def local_key(files: list[Path]) -> str:
    """A short hash that changes when any file of the corpus changes (name, size or time)."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:8]


def _first_non_utf8(files: list[Path]) -> Path | None:
    for f in files:
        if f.suffix == ".parquet":
            continue
        try:
            with open(f, encoding="utf-8") as fh:
                while fh.read(1 << 20):
                    pass
        except UnicodeDecodeError:
            return f
    return None


def open_local(files: list[Path], cache_dir: Path, txt_sample_by: str) -> Any:
    """All files as one `datasets.Dataset` with a single 'text' column, through datasets' own loaders."""
    from datasets import concatenate_datasets, load_dataset

    bad = _first_non_utf8(files)
    if bad is not None:
        raise UserError(f"{bad} is not UTF-8 text; convert it (for example with iconv) or leave it out")
    parts = []
    for suffix in sorted({f.suffix for f in files}):
        builder = LOCAL_SUFFIXES[suffix]
        group = [str(f) for f in files if f.suffix == suffix]
        kwargs = {"sample_by": txt_sample_by} if builder == "text" else {}
        try:
            ds = load_dataset(builder, data_files=group, split="train", cache_dir=str(cache_dir), **kwargs)
        except Exception as e:  # datasets wraps parse errors in its own types
            cause = e.__cause__ or e
            raise UserError(f"could not read the {suffix} files under {Path(group[0]).parent}: "
                            f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}"
                            ) from None
        if "text" not in ds.column_names:
            raise UserError(f"the {suffix} files ({group[0]}, ...) have no 'text' field; columns: {ds.column_names}")
        parts.append(ds.select_columns(["text"]))
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    ds = ds.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(ds) == 0:
        raise UserError(f"no text in {files[0] if len(files) == 1 else files[0].parent}: every document is empty")
    return ds


def write_synthetic(out_dir: Path, size_mb: float, seed: int) -> list[tuple[str, list]]:
    """Generate the corpus; write it (with concept spans), the concept table and the fact prompts."""
    docs = list(generate_documents(int(size_mb * 1e6), seed))
    write_text_atomic(out_dir / "corpus.jsonl", "".join(
        json.dumps({"text": d.text, "spans": d.spans}) + "\n" for d in docs))
    write_json_atomic(out_dir / "concepts.json",
                      [{"id": i + 1, "category": c, "entity": e} for i, (c, e) in enumerate(concept_table())])
    write_text_atomic(out_dir / "facts.jsonl", "".join(json.dumps(f) + "\n" for f in fact_prompts()))
    return [(d.text, d.spans) for d in docs]
