"""Token shards: a 128-byte header, then the tokens as uint16 (uint32 when the vocabulary needs it).

Header: 16 little-endian int64 words
    0 magic   1 version   2 token count   3 bytes per token   4 first document   5 document count
    6 vocabulary size (embedding rows)    7..15 reserved (0)
The document range lets an interrupted preparation resume after the last finished shard.
A labels shard (`*.labels.bin`, same format) holds one concept id per token for the synthetic corpus.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.files import UserError, atomic_path

MAGIC = 0x4D444C4D_53484431  # "MDLMSHD1"
VERSION = 1
HEADER_WORDS = 16
HEADER_BYTES = HEADER_WORDS * 8


class ShardError(UserError):
    """A shard file that is missing, truncated or not one of ours."""


@dataclass(frozen=True)
class ShardHeader:
    n_tokens: int
    itemsize: int
    first_doc: int
    n_docs: int
    vocab_size: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.itemsize == 2 else np.uint32)


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int, first_doc: int, n_docs: int) -> None:
    """Write atomically: the shard exists whole under its name, or not at all."""
    dtype = dtype_for(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_WORDS, dtype="<i8")
    header[:7] = [MAGIC, VERSION, tokens.size, dtype.itemsize, first_doc, n_docs, vocab_size]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())


def read_header(path: str | os.PathLike) -> ShardHeader:
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"shard {path} is truncated ({len(raw)} bytes, shorter than its header)")
    words = np.frombuffer(raw, dtype="<i8")
    if int(words[0]) != MAGIC:
        raise ShardError(f"{path} is not a token shard (wrong magic number)")
    if int(words[1]) != VERSION:
        raise ShardError(f"shard {path} has format version {int(words[1])}; this code reads version {VERSION}")
    header = ShardHeader(*(int(w) for w in words[2:7]))
    if header.itemsize not in (2, 4):
        raise ShardError(f"shard {path} declares {header.itemsize} bytes per token (expected 2 or 4)")
    expected = HEADER_BYTES + header.n_tokens * header.itemsize
    if path.stat().st_size != expected:
        raise ShardError(f"shard {path} has {path.stat().st_size} bytes, its header promises {expected}: "
                         "truncated or corrupt, delete it and prepare again")
    return header


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a shard as a read-only memory map (nothing is loaded until used)."""
    header = read_header(path)
    if header.n_tokens == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES,
                     shape=(header.n_tokens,))
