"""Shared fixtures: a small prepared synthetic dataset, and a runner for the command-line contract.

Tests marked `slow` (`make test-fast` leaves them out; `make test` and CI run everything): every test that
uses one of the session's trained runs below (they train a model, its transcoders and so on, minutes on a
CPU), which the hook at the end marks by itself, and the tests marked by hand that spawn whole pipelines
or many subprocesses.
"""
from __future__ import annotations

import pytest

from tests.helpers import tiny_topk_config, tiny_train_config, tiny_transcoder_config

# The session fixtures that train or run a stage of the pipeline: a test that uses one is slow.
SLOW_FIXTURES = {"tiny_run", "tiny_transcoders", "tiny_topk", "tiny_descriptions"}


@pytest.fixture
def reference_machine(tmp_path, monkeypatch):
    """Where the reference command lines run: a machine with 8 CUDA devices, in a folder that holds the
    run folder they name (experiments/X). Flags are checked against what exists when they are parsed."""
    import torch

    (tmp_path / "experiments" / "X").mkdir(parents=True)
    (tmp_path / "experiments" / "X" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    return tmp_path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """The synthetic corpus (0.3 MB) prepared with a BPE trained on it."""
    from data.prepare import PrepareConfig, prepare_dataset

    cfg = PrepareConfig(dataset="synthetic", data_dir=str(tmp_path_factory.mktemp("data")), synthetic_mb=0.3,
                        workers=1)
    return prepare_dataset(cfg)


@pytest.fixture(scope="session")
def tiny_run(synthetic_data, tmp_path_factory):
    """A tiny model trained on the synthetic corpus (shared by the tests of every later stage)."""
    from train_diffusion import main

    cfg = tiny_train_config(tmp_path_factory.mktemp("run"), synthetic_data.folder.parent, model_dim=128, num_heads=4,
                            batch_size=16, train_steps=400, save_every=200)
    return main(cfg)


@pytest.fixture(scope="session")
def tiny_transcoders(tiny_run):
    """Transcoders for both MLPs of the session's tiny model (shared by the later stages' tests)."""
    from train_transcoders import main

    return main(tiny_transcoder_config(tiny_run))


@pytest.fixture(scope="session")
def tiny_topk(tiny_transcoders, tiny_run):
    """The top-k stage on the session's tiny model and transcoders (6 batches of 8 × 128 tokens)."""
    from get_topk_activations import main

    return main(tiny_topk_config(tiny_run))


@pytest.fixture(scope="session")
def tiny_llms(tmp_path_factory):
    """A randomly initialised tiny T5 and tiny GPT-2 with a `tokenizers`-trained tokenizer, saved with
    save_pretrained: they load through exactly the code path flan-t5-xxl would."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    texts = ["yes no Yes No", "Excerpt marked words feature fires text language model hidden describe",
             "The capital of France is Paris. The month after March is April.", "0 1 2 3 4 5 6 7 8 9"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    out = {}
    torch.manual_seed(0)
    t5 = tmp_path_factory.mktemp("tiny_t5")
    T5ForConditionalGeneration(T5Config(vocab_size=len(fast), d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                        num_decoder_layers=2, num_heads=4, decoder_start_token_id=fast.pad_token_id,
                                        pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id)
                               ).save_pretrained(t5)
    fast.save_pretrained(t5)
    out["t5"] = t5
    gpt = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                               bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)).save_pretrained(gpt)
    fast.save_pretrained(gpt)
    out["gpt2"] = gpt
    return out


@pytest.fixture(scope="session")
def tiny_descriptions(tiny_topk, tiny_run):
    """The `tokens` baseline's descriptions of every live feature of the session's tiny model."""
    from get_activation_descriptions import DescriptionsConfig, main

    return main(DescriptionsConfig(train_folder=str(tiny_run), explainer="tokens", device="cpu"))


def pytest_collection_modifyitems(config, items):
    """The `slow` marker (registered in pyproject.toml) on every test that uses a trained session run."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
