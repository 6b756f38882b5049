"""descriptions.jsonl: one JSON line per described feature, appended the moment it is done.

Stage 5 writes it (one part file per process under torchrun, folded in one process's order); stage 6, the
ground-truth benchmark and the delphi export read it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from core.files import atomic_path, read_jsonl, resume_jsonl
from core.locks import STAGING_SUFFIX

TOKENS = "tokens"  # the model-free explainer: a description lists the tokens a feature fires on
OLDER_TOKEN_MATCH = "token_match_all_words"  # the keyword match of older records, which read hidden words too

REDO = "delete that line and get_activation_descriptions.py describes its feature again"


def read_records(path: Path, rewrite: bool = False) -> list[dict]:
    """The finished records of descriptions.jsonl (or of a part file), none when it does not exist; read only.
    A last line cut short by a kill is left out; only this stage, the file's writer, passes `rewrite` when it
    resumes, to cut that line off the file (and describe its feature again). A damaged line before the last
    is a UserError naming the file and the line."""
    if rewrite:
        return resume_jsonl(path, remedy=REDO)
    return read_jsonl(path, appended=True, remedy=REDO) if path.exists() else []


def all_records(path: Path) -> list[dict]:
    """Read only: the records of `path` and of the part files of a torchrun job not yet folded into it."""
    return [r for p in [path, *part_files(path)] for r in read_records(p)]


def rewrite_records(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def part_path(path: Path, rank: int) -> Path:
    """Where process `rank` of a torchrun job appends its records until they are folded into `path`."""
    return path.with_name(f"{path.stem}.part{rank}{path.suffix}")


def part_files(path: Path) -> list[Path]:
    """Every process's part file of `path` (see `part_path`)."""
    return sorted(path.parent.glob(f"{path.stem}.part*{path.suffix}"))


def fold_parts(path: Path) -> None:
    """Append the records of every process's part file to `path` in one process's order (by layer, then
    feature: the order it describes them in), then remove the parts; a line cut short by a kill is dropped."""
    parts = part_files(path)
    if not parts:
        return
    new = sorted((r for p in parts for r in read_records(p)), key=lambda r: (r["layer"], r["feature"]))
    rewrite_records(path, read_records(path) + new)
    for p in parts:
        p.unlink()


def append_record(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def staging_records(path: Path) -> Path:
    """Where --overwrite writes the explainer's new records (and, under torchrun, its processes' part files)
    until they replace its old ones in `path`."""
    return path.with_name(f"{path.stem}{STAGING_SUFFIX}{path.suffix}")


def clear_records(path: Path) -> None:
    for p in [path, *part_files(path)]:
        p.unlink(missing_ok=True)


def measured_scores(record: dict) -> dict:
    """A record's scores by what they measured. Older records called the keyword match "simulation" (it has
    "words"); before it read the text as the model saw it (it has "reads"), it matched the hidden words
    too, and those are kept apart, as OLDER_TOKEN_MATCH."""
    out = {}
    for k, v in (record.get("scores") or {}).items():
        k = "token_match" if k == "simulation" and "words" in (v or {}) else k
        out[OLDER_TOKEN_MATCH if k == "token_match" and "reads" not in (v or {}) else k] = v
    return out
