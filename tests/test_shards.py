import numpy as np
import pytest

from core.files import atomic_path
from data.shards import HEADER_BYTES, ShardError, read_header, read_shard, write_shard


@pytest.mark.parametrize("vocab_size,dtype", [(1344, np.uint16), (65536, np.uint16), (100_352, np.uint32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=10_001)
    write_shard(tmp_path / "s.bin", tokens, vocab_size, first_doc=7, n_docs=3)
    h = read_header(tmp_path / "s.bin")
    assert (h.n_tokens, h.first_doc, h.n_docs, h.vocab_size, h.dtype) == (10_001, 7, 3, vocab_size, dtype)
    np.testing.assert_array_equal(read_shard(tmp_path / "s.bin"), tokens)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 10_001 * np.dtype(dtype).itemsize


def test_out_of_range_ids_are_refused(tmp_path):
    with pytest.raises(ValueError):
        write_shard(tmp_path / "s.bin", np.array([0, 70_000]), 65_536, 0, 1)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_headers(tmp_path):
    write_shard(tmp_path / "good.bin", np.arange(100), 128, 0, 1)
    raw = (tmp_path / "good.bin").read_bytes()
    cases = {"magic": b"\0" * 8 + raw[8:], "truncated": raw[:-2], "short": raw[:50],
             "version": raw[:8] + (99).to_bytes(8, "little") + raw[16:]}
    messages = {"magic": "not a token shard", "truncated": "truncated or corrupt", "short": "shorter than its header",
                "version": "format version 99"}
    for name, data in cases.items():
        (tmp_path / f"{name}.bin").write_bytes(data)
        with pytest.raises(ShardError, match=messages[name]):
            read_shard(tmp_path / f"{name}.bin")
    with pytest.raises(ShardError, match="does not exist"):
        read_shard(tmp_path / "missing.bin")


def test_atomic_path_leaves_old_file_or_nothing(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
