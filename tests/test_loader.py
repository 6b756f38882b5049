import json

import numpy as np
import pytest
import torch

from core.files import UserError
from data.loader import ShardLoader
from data.shards import read_shard


def test_batches_are_windows_of_the_training_shards(synthetic_data):
    folder, tok, meta = synthetic_data
    train = np.concatenate([np.asarray(read_shard(folder / s["file"])) for s in meta["shards"][1:]])
    loader = ShardLoader(folder, "train", seq_len=64, batch_size=4, seed=0)
    for m in range(5):
        batch = loader.batch(m)
        assert batch.tokens.shape == (4, 64) and batch.tokens.dtype == torch.int64
        assert batch.labels is not None and batch.labels.shape == (4, 64)
        for row, w in zip(batch.tokens.numpy(), loader.window_ids(m)):
            np.testing.assert_array_equal(row, train[w * 64:(w + 1) * 64])
    # packed documents: every document starts with BOS
    assert (batch.tokens == tok.bos_id).any()


def test_deterministic_for_seed_and_step(synthetic_data):
    folder = synthetic_data.folder
    a = ShardLoader(folder, "train", 32, 3, seed=1)
    b = ShardLoader(folder, "train", 32, 3, seed=1)  # a resumed run: a new loader, same seed
    c = ShardLoader(folder, "train", 32, 3, seed=2)
    for m in (0, 1, 17, 5000):  # 5000 lies in a later epoch
        assert torch.equal(a.batch(m).tokens, b.batch(m).tokens)
    assert not torch.equal(a.batch(0).tokens, c.batch(0).tokens)


def test_ranks_are_disjoint_and_cover_an_epoch(synthetic_data):
    folder = synthetic_data.folder
    ranks = [ShardLoader(folder, "train", 64, 2, seed=0, rank=r, world_size=3) for r in range(3)]
    n = ranks[0].n_windows
    steps = n // 6
    seen = [np.concatenate([ld.window_ids(m) for m in range(steps)]) for ld in ranks]
    all_ids = np.concatenate(seen)
    assert len(np.unique(all_ids)) == len(all_ids) == steps * 6  # no window read twice within the epoch
    single = ShardLoader(folder, "train", 64, 6, seed=0)  # one process with the same global batch
    expected = np.concatenate([single.window_ids(m) for m in range(steps)])
    np.testing.assert_array_equal(np.sort(all_ids), np.sort(expected))


def test_validation_reads_the_validation_shard_only(synthetic_data):
    folder, tok, meta = synthetic_data
    val = np.asarray(read_shard(folder / meta["shards"][0]["file"]))
    loader = ShardLoader(folder, "val", 64, 4)
    rows = torch.cat([b.tokens for b in loader.sequential()]).numpy()
    np.testing.assert_array_equal(rows.reshape(-1), val[:len(rows) * 64])
    limited = list(ShardLoader(folder, "val", 64, 4).sequential(max_tokens=64 * 5))
    assert sum(len(b.tokens) for b in limited) == 5
    halves = [torch.cat([b.tokens for b in ShardLoader(folder, "val", 64, 4, rank=r, world_size=2).sequential()])
              for r in range(2)]
    assert len(halves[0]) + len(halves[1]) == len(rows)


def test_a_run_keeps_its_shards(synthetic_data):
    folder, _, meta = synthetic_data
    train = [s["file"] for s in meta["shards"] if s["split"] == "train"]
    assert ShardLoader(folder, "train", 64, 2, files=train).n_windows == ShardLoader(folder, "train", 64, 2).n_windows
    with pytest.raises(UserError, match="no longer holds"):
        ShardLoader(folder, "train", 64, 2, files=["synthetic_train_000099.bin"])


def test_loader_errors(synthetic_data, tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset"):
        ShardLoader(tmp_path, "train", 64, 1)
    with pytest.raises(UserError, match="fewer than one batch"):
        ShardLoader(synthetic_data.folder, "val", 4096, 8)
    (tmp_path / "meta.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(UserError, match="not finished"):
        ShardLoader(tmp_path, "train", 64, 1)
