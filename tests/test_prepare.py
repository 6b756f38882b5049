import json

import numpy as np
import pytest

import data.sources
import data.writer
from core.files import UserError
from data.prepare import PrepareConfig, prepare_dataset
from data.shards import read_shard
from tests.helpers import assert_one_line_error, run_cli

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 40))) + "." for _ in range(n)]


def _decoded_docs(prepared):
    """Every document of every shard, in order, decoded back to text."""
    folder, tok, meta = prepared
    out = []
    for s in meta["shards"]:
        tokens = np.asarray(read_shard(folder / s["file"]))
        starts = list(np.flatnonzero(tokens == tok.bos_id)) + [len(tokens)]
        assert starts[0] == 0 and len(starts) - 1 == s["n_docs"]
        out += [tok.decode(tokens[a + 1:b]) for a, b in zip(starts, starts[1:])]
    return out


def _cfg(tmp_path, dataset, **kw):
    kw.setdefault("tokenizer", "bpe:300")
    return PrepareConfig(dataset=str(dataset), data_dir=str(tmp_path / "cache"), workers=1, **kw)


def test_local_text_jsonl_and_parquet(tmp_path):
    from datasets import Dataset

    docs = _docs(60)
    corpus = tmp_path / "corpus"
    (corpus / "txt").mkdir(parents=True)
    for i, d in enumerate(docs[:20]):
        (corpus / "txt" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[20:40])))
    Dataset.from_dict({"text": docs[40:], "url": ["u"] * 20}).to_parquet(str(corpus / "c.parquet"))
    prepared = prepare_dataset(_cfg(tmp_path, corpus, txt_sample_by="document"))
    # files are read grouped by type: .jsonl, .parquet, then .txt
    assert _decoded_docs(prepared) == docs[20:40] + docs[40:] + docs[:20]
    assert prepared.meta["shards"][0]["n_docs"] == 3  # 5% of 60 documents for validation


def test_txt_paragraphs_and_rerun_is_a_no_op(tmp_path):
    docs = _docs(40)
    (tmp_path / "book.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    first = prepare_dataset(_cfg(tmp_path, tmp_path / "book.txt"))
    assert [d.strip() for d in _decoded_docs(first)] == docs
    stamps = {p: p.stat().st_mtime_ns for p in first.folder.iterdir()}
    again = prepare_dataset(_cfg(tmp_path, tmp_path / "book.txt"))
    assert again.meta == first.meta and stamps == {p: p.stat().st_mtime_ns for p in again.folder.iterdir()}


def test_interrupted_preparation_resumes_to_identical_shards(tmp_path, monkeypatch):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(400)))
    kw = dict(shard_size=400)
    reference = prepare_dataset(PrepareConfig(dataset=str(tmp_path / "docs.jsonl"), data_dir=str(tmp_path / "ref"),
                                              tokenizer="bpe:300", workers=1, **kw))
    assert reference.meta["train_shards"] >= 5

    real_write, calls = data.writer.write_shard, []

    def dying_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed while writing the 4th shard
        return real_write(*args, **kwargs)

    monkeypatch.setattr(data.writer, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(_cfg(tmp_path, tmp_path / "docs.jsonl", **kw))
    monkeypatch.setattr(data.writer, "write_shard", real_write)
    folder = reference.folder.parent.parent / "cache" / reference.folder.name
    partial = folder.with_name(folder.name + ".partial")  # the dataset's name only once it is complete
    finished = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.bin")}
    assert len(finished) == 3 and not list(partial.glob(".*tmp")) and not folder.exists()  # nothing half-written
    resumed = prepare_dataset(_cfg(tmp_path, tmp_path / "docs.jsonl", **kw))
    assert all(resumed.folder.joinpath(n).stat().st_mtime_ns == t for n, t in finished.items())  # not redone
    assert resumed.meta["shards"] == reference.meta["shards"]
    for s in reference.meta["shards"]:
        assert (folder / s["file"]).read_bytes() == (reference.folder / s["file"]).read_bytes()


def _fineweb_parquet(path, docs):
    """A local file with FineWeb-edu's schema, standing in for the hub."""
    from datasets import Dataset

    n = len(docs)
    Dataset.from_dict({
        "text": docs, "id": [f"<urn:uuid:{i}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)], "file_path": ["s3://x"] * n, "language": ["en"] * n,
        "language_score": [0.9] * n, "token_count": [len(d.split()) for d in docs], "score": [3.1] * n,
        "int_score": [3] * n}).to_parquet(str(path))
    return path


def test_fineweb_path_end_to_end_on_a_local_parquet(tmp_path, monkeypatch):
    from datasets import load_dataset

    docs = _docs(300)
    parquet = _fineweb_parquet(tmp_path / "fw.parquet", docs)
    asked = []

    def local_stream(subset):
        asked.append(subset)
        return load_dataset("parquet", data_files=str(parquet), split="train", streaming=True)

    monkeypatch.setattr(data.sources, "fineweb_stream", local_stream)
    cfg = _cfg(tmp_path, "fineweb-edu", shard_size=1500, val_tokens=800, num_shards=3, subset="sample-10BT")
    prepared = prepare_dataset(cfg)
    assert asked[0] == "sample-10BT"
    assert prepared.meta["train_shards"] == 3 and prepared.meta["val_tokens"] <= 800
    assert all(s["n_tokens"] <= 1500 for s in prepared.meta["shards"])
    decoded = _decoded_docs(prepared)
    assert decoded == docs[:len(decoded)]  # in stream order, none lost or repeated

    with pytest.raises(UserError, match="ran out after .* training shard"):
        prepare_dataset(_cfg(tmp_path, "fineweb-edu", shard_size=1500, val_tokens=800, num_shards=1000))


def test_bad_inputs_raise_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .txt"):
        prepare_dataset(_cfg(tmp_path, tmp_path / "empty"))
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no 'text' field"):
        prepare_dataset(_cfg(tmp_path, tmp_path / "nofield.jsonl"))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(UserError, match="every document is empty"):
        prepare_dataset(_cfg(tmp_path, tmp_path / "blank.txt"))
    with pytest.raises(ValueError, match="nowhere does not exist"):  # refused with the flags
        _cfg(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--shard_size must be positive"):  # cli.run makes it one line
        _cfg(tmp_path, "synthetic", shard_size=0)


# The command-line contract: one line, non-zero exit, no traceback.

def test_cli_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli(["-m", "data.prepare", "--dataset", str(tmp_path / "empty"),
                                   "--data_dir", str(tmp_path)]), "no .txt")


def test_cli_not_utf8(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ok.txt").write_text("fine text", encoding="utf-8")
    (tmp_path / "c" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    proc = run_cli(["-m", "data.prepare", "--dataset", str(tmp_path / "c"), "--data_dir", str(tmp_path)])
    assert_one_line_error(proc, "latin1.txt", "not UTF-8")


def test_cli_unknown_tokenizer(tmp_path):
    proc = run_cli(["-m", "data.prepare", "--dataset", "synthetic", "--tokenizer", "word2vec",
                    "--data_dir", str(tmp_path)])
    assert_one_line_error(proc, "unknown tokenizer")
    assert not (tmp_path / "cache").exists() and not list(tmp_path.iterdir())


def test_cli_corrupt_shard_is_reported_not_overwritten(tmp_path):
    args = ["-m", "data.prepare", "--dataset", "synthetic", "--synthetic_mb", "0.05", "--data_dir", str(tmp_path),
            "--workers", "1"]
    assert run_cli(args).returncode == 0
    (folder,) = tmp_path.glob("synthetic_*")
    meta = json.loads((folder / "meta.json").read_text())
    meta["complete"] = False  # as if interrupted, so the rerun scans its shards
    (folder / "meta.json").write_text(json.dumps(meta))
    shard = folder / meta["shards"][1]["file"]
    shard.write_bytes(b"garbage" + shard.read_bytes()[7:])
    before = shard.read_bytes()
    assert_one_line_error(run_cli(args), "not a token shard")
    assert shard.read_bytes() == before


def test_cli_fineweb_offline(tmp_path):
    proc = run_cli(["-m", "data.fineweb", "--num_shards", "2", "--data_dir", str(tmp_path)],
                   env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "cannot reach", "--dataset synthetic")


@pytest.mark.slow
def test_cli_fineweb_subset_too_small(tmp_path):
    parquet = _fineweb_parquet(tmp_path / "fw.parquet", _docs(50))
    code = ("import sys, data.sources as s; from core import cli; from datasets import load_dataset; "
            f"s.fineweb_stream = lambda subset: load_dataset('parquet', data_files={str(parquet)!r}, "
            "split='train', streaming=True); from data.prepare import PrepareConfig, main; "
            "cli.run(main, PrepareConfig)")
    proc = run_cli(["-c", code, "--num_shards", "50", "--shard_size", "1_000", "--val_tokens", "500",
                    "--tokenizer", "bpe:300", "--data_dir", str(tmp_path / "cache"), "--workers", "1"])
    assert_one_line_error(proc, "ran out", "50 asked for")
