"""experiment.init_base: a run folder made from a released-style LLaDA or Dream folder (tiny, random weights,
a real byte-level BPE tokenizer), opened by the stages' functions; the model's own tokenizer (ModelTokenizer);
the one-line refusals."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from core import cli
from core.files import UserError
from data.shards import read_shard
from data.tokenizer import ModelTokenizer, load_tokenizer
from experiment.init_base import InitBaseConfig, check_tokenizer, main
from experiment.paths import RELEASED, StagePaths, resolve_checkpoint
from experiment.runs import load_run, open_base_run, open_data, run_seq_len
from model.public_models import load_public_model, public_config
from tests.public_fixtures import write_public_folder
from tests.public_tokenizers import BPE_SIZE, CORPUS, ROWS, TEXT_SIZE, write_bpe_public_folder

TEXT = "Hello wörld: the capital of France <|endoftext|> 東京 🙂 3.14"
FAMILIES = ["llada", "dream"]


def init(tmp_path: Path, model: Path, **flags) -> Path:
    cfg = InitBaseConfig(model=str(model), dataset="synthetic", synthetic_mb=0.02, workers=1,
                         data_dir=str(tmp_path / "data"), experiments_dir=str(tmp_path / "exp"), **flags)
    return main(cfg)


@pytest.fixture(scope="module", params=FAMILIES)
def made(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, model folder, run folder) of one init_base on the synthetic corpus."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = write_bpe_public_folder(tmp / "model", request.param)
    return request.param, model, init(tmp, model)


def test_run_folder_records_the_model_its_tokenizer_and_data(made):
    family, model, run = made
    config = json.loads((run / "config.json").read_text())
    assert config["base_model"] == {"source": str(model), "folder": str(model.resolve()), "max_seq_len": 64}
    assert run_seq_len(config) == 64  # the tiny configs' max_sequence_length / max_position_embeddings
    assert config["model"] == asdict(public_config(model)) and config["model"]["family"] == family
    assert config["tokenizer"]["kind"] == "hf" and (run / "tokenizer.json").is_file()
    assert not list(run.glob("*.safetensors")) and not list(run.glob("*.pt"))  # no weights copied
    assert Path(config["data"]["folder"]).is_dir() and config["data"]["train_files"]
    assert run.name.endswith(family)


def test_load_run_gives_the_released_model_and_its_tokenizer(made):
    family, model, run = made
    config, loaded, tok, ckpt = load_run(run, "latest", "cpu")
    assert ckpt == run / RELEASED and StagePaths(run, ckpt.name).transcoders == run / "transcoders" / RELEASED
    reference = load_public_model(model)
    tokens = torch.randint(0, ROWS, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, reference(tokens).logits)
    assert loaded.embed.weight.dtype == torch.float32 and not loaded.training
    assert tok.spec() == ModelTokenizer.from_model_folder(model).spec() == config["tokenizer"]
    assert (tok.n_vocab, tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id) == (
        loaded.cfg.n_vocab, loaded.cfg.vocab_size, loaded.cfg.mask_id, loaded.cfg.pad_id, loaded.cfg.bos_id)


def test_open_base_run_freezes_the_released_model(made):
    _, _, run = made

    class Flags:
        train_folder, checkpoint_name = str(run), RELEASED

        def shape_flags(self) -> dict:
            return {}

    folder, _, ckpt, model = open_base_run(Flags(), "cpu")
    assert folder == run and ckpt.name == RELEASED
    assert not any(p.requires_grad for p in model.parameters())


def test_tokenizer_round_trips_with_the_models_ids(made):
    family, model, run = made
    _, _, tok, _ = load_run(run, RELEASED, "cpu")
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert b"".join(tok.token_bytes(i) for i in ids) == TEXT.encode()
    assert all(i < BPE_SIZE for i in ids)  # special-token text in a document stays text
    assert tok.n_text == TEXT_SIZE[family] and tok.vocab_size == tok.n_vocab == ROWS
    assert tok.pad_id == tok.eos_id and tok.mask_id < tok.n_text
    assert tok.decode([*ids[:2], tok.mask_id, ROWS - 1, *ids[2:]], mask_text="?") == \
        tok.decode(ids[:2]) + "?" + tok.decode(ids[2:])  # the mask shows as mask_text, unused rows as nothing
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"  # EOS = PAD is a real token
    plain = "The capital of France is"
    typed = "<|endoftext|>" + plain  # a prompt that types a special token (a chat template, BOS)
    assert tok.encode_prompt(typed) == [tok.eos_id, *tok.encode(plain)]  # read as the token itself
    assert tok.eos_id not in tok.encode(typed)  # in a document, the same text stays text


def test_prepared_data_holds_the_model_tokenizers_ids(made):
    family, model, run = made
    config = json.loads((run / "config.json").read_text())
    data = open_data(config)
    assert str(data.folder) == config["data"]["folder"] and data.meta["tokenizer"] == config["tokenizer"]
    tok = ModelTokenizer.from_model_folder(model)
    docs = [json.loads(line)["text"] for line in (data.folder / "corpus.jsonl").read_text().splitlines()]
    shard = data.meta["shards"][0]
    want = np.concatenate([[tok.bos_id, *tok.encode(text)] for text in
                           docs[shard["first_doc"]:shard["first_doc"] + shard["n_docs"]]])
    assert np.array_equal(np.asarray(read_shard(data.folder / shard["file"])), want)


def test_another_tokenizer_gets_its_own_prepared_data(tmp_path):
    llada = write_bpe_public_folder(tmp_path / "llada", "llada")
    other = write_bpe_public_folder(tmp_path / "other", "llada", corpus=[t[::-1] for t in CORPUS])
    dream = write_bpe_public_folder(tmp_path / "dream", "dream")
    folders = [json.loads((init(tmp_path, m) / "config.json").read_text())["data"]["folder"]
               for m in (llada, other, dream, llada)]
    assert len(set(folders[:3])) == 3 and folders[3] == folders[0]  # the same tokenizer reuses its data
    specs = [json.loads((Path(f) / "meta.json").read_text())["tokenizer"] for f in folders[:3]]
    assert len({s["name"] for s in specs}) == 3


def test_dream_tokenizer_reads_vocab_merges_and_added_tokens(tmp_path):
    model = write_bpe_public_folder(tmp_path / "dream", "dream")
    assert not (model / "tokenizer.json").exists()
    tok = ModelTokenizer.from_model_folder(model)
    assert [tok.tok.id_to_token(i) for i in (BPE_SIZE, tok.mask_id)] == ["<|endoftext|>", "<|mask|>"]
    tok.save(tmp_path)
    again = load_tokenizer(tok.spec(), tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT) and again.spec() == tok.spec()
    added = json.loads((model / "added_tokens.json").read_text())
    added["<|mask|>"] += 1  # no longer right after the tokens before it
    (model / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(UserError, match="added_tokens.json puts '<|mask|>' at id"):
        ModelTokenizer.from_model_folder(model)


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(main, InitBaseConfig, ["--model", str(tmp_path / "nowhere" / "model"), "--dataset", "synthetic",
                                       "--experiments_dir", str(tmp_path / "exp")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is no folder here" in err
    assert not (tmp_path / "exp").exists()


def test_unsupported_config_is_refused_before_anything_is_written(tmp_path):
    model = write_bpe_public_folder(tmp_path / "model", "llada")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "alibi": True}))
    with pytest.raises(UserError, match="alibi = true is not supported"):
        init(tmp_path, model)
    assert not (tmp_path / "exp").exists() and not (tmp_path / "data").exists()


def test_missing_weight_is_refused(tmp_path):
    model = write_bpe_public_folder(tmp_path / "model", "dream")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="1 weight.s. missing, the first model.norm.weight"):
        init(tmp_path, model)


def test_folder_without_tokenizer_files_is_refused(tmp_path):
    model = write_public_folder(tmp_path / "model", "dream", tokenizer=False)
    with pytest.raises(UserError, match="has no tokenizer files"):
        init(tmp_path, model)


def test_other_checkpoint_names_are_refused(made):
    _, _, run = made
    assert resolve_checkpoint(run, "latest") == resolve_checkpoint(run, RELEASED) == run / RELEASED
    for name in ("state_step000100.pt", "released.pt"):
        with pytest.raises(UserError, match="its one checkpoint is 'released'"):
            resolve_checkpoint(run, name)
        with pytest.raises(UserError, match="its one checkpoint is 'released'"):
            load_run(run, name, "cpu")


def test_a_changed_model_folder_is_refused(tmp_path):
    model = write_bpe_public_folder(tmp_path / "model", "llada")
    run = init(tmp_path, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 10000.0}))
    with pytest.raises(UserError, match="no longer the one this run was made from"):
        load_run(run, RELEASED, "cpu")


def test_tokenizer_ids_must_be_the_models(tmp_path):
    model = write_bpe_public_folder(tmp_path / "model", "llada")
    tok, cfg = ModelTokenizer.from_model_folder(model), public_config(model)
    check_tokenizer(tok, cfg, model)
    moved = ModelTokenizer(tok.tok, {**tok.spec(), "bos_id": tok.bos_id + 2}, tok.name)
    with pytest.raises(UserError, match="the tokenizer's bos_id is 302, the model's 300"):
        check_tokenizer(moved, cfg, model)
    with pytest.raises(UserError, match="mask id 320 is not a token of its tokenizer"):
        ModelTokenizer(tok.tok, {**tok.spec(), "n_vocab": 400, "mask_id": 320}, tok.name)


def test_damaged_tokenizer_file_is_one_line(tmp_path):
    model = write_bpe_public_folder(tmp_path / "model", "llada")
    (model / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json is not valid JSON"):
        init(tmp_path, model)
    (model / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    with pytest.raises(UserError, match="tokenizer.json is not a valid tokenizer.json"):
        init(tmp_path, model)
