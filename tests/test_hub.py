"""The diffusion model on the Hugging Face Hub's terms: huggingface_hub's mixin round trip, the tokenizer
as a transformers fast tokenizer with [MASK] and [PAD] registered, and a model card from the run."""
import json

import torch

from experiment import load_run
from experiment.hub import HubConfig, main as export_main
from model.diffusion import DiffusionLM


def test_hub_export_round_trip(tiny_run, tmp_path):
    from transformers import AutoTokenizer

    out = export_main(HubConfig(train_folder=str(tiny_run), output=str(tmp_path / "hub")))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    config, model, tok, _ = load_run(tiny_run, "latest", "cpu")
    loaded = DiffusionLM.from_pretrained(out)
    assert loaded.cfg == model.cfg and json.loads((out / "config.json").read_text())["cfg"]["mask_id"] == tok.mask_id
    tokens = torch.randint(0, model.cfg.n_vocab, (2, 48))
    tokens[:, 5:9] = model.cfg.mask_id
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)  # the same weights, exactly
    hf = AutoTokenizer.from_pretrained(out)
    text = "The capital of France is Paris. Musicians play the violin."
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf.mask_token_id, hf.pad_token_id) == (tok.mask_id, tok.pad_id)
    ids = tok.encode("The capital of") + [tok.mask_id, tok.pad_id]
    assert hf.decode(ids) == "The capital of[MASK][PAD]"
    card = (out / "README.md").read_text()
    val = [r for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "val"]
    assert f"{val[-1]['val_nelbo']:.4f} nats/token" in card and "400 steps" in card and "synthetic" in card
    assert f"`[MASK]` = id {tok.mask_id}" in card
