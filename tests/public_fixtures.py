"""Folders laid out like the released LLaDA-8B and Dream-7B on the Hub, at a tiny size: the public-style
config.json (every flag of the release, tiny shapes with the release's ratios), tokenizer files, and random
weights (norm gains included) under the released tensor names, sharded with an index. Any test that needs a
public model writes one with `write_public_folder`.

The full-size config.json values are model/released_configs.py's (docs/notes/public-diffusion-lms.md §1).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.diffusion import DiffusionLM
from model.public_models import key_map, public_config
from model.released_configs import DREAM_7B, LLADA_8B

# tiny shapes with the release's flags: LLaDA plain multi-head, Dream 7 query heads per key/value head
LLADA_TINY = {**LLADA_8B, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 192,
              "vocab_size": 160, "embedding_size": 160, "mask_token_id": 150, "eos_token_id": 141,
              "pad_token_id": 141, "max_sequence_length": 64}
LLADA_TINY_BOS, LLADA_TINY_TEXT = 140, 153  # generation_config.json's BOS; the tokenizer's size
DREAM_TINY = {**DREAM_7B, "hidden_size": 112, "num_hidden_layers": 2, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 296, "vocab_size": 192, "mask_token_id": 178,
              "bos_token_id": 171, "eos_token_id": 171, "pad_token_id": 171, "max_position_embeddings": 64}
DREAM_TINY_TEXT = 179  # vocab.json 0..170, added tokens 171..178
TINY = {"llada": LLADA_TINY, "dream": DREAM_TINY}


def write_tokenizer_files(folder: Path, family: str) -> None:
    """LLaDA: a word-level tokenizer.json with LLADA_TINY_TEXT ids; Dream: vocab.json + added_tokens.json with
    DREAM_TINY_TEXT ids (the released Dream folder has no tokenizer.json)."""
    if family == "llada":
        from tokenizers import Tokenizer, models, pre_tokenizers

        special = {LLADA_TINY_BOS: "<|startoftext|>", LLADA_TINY["eos_token_id"]: "<|endoftext|>",
                   LLADA_TINY["mask_token_id"]: "<|mdm_mask|>"}
        vocab = {special.get(i, f"w{i}"): i for i in range(LLADA_TINY_TEXT)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(folder / "tokenizer.json"))
    else:
        eos = DREAM_TINY["eos_token_id"]
        (folder / "vocab.json").write_text(json.dumps({f"w{i}": i for i in range(eos)}))
        added = {"<|endoftext|>": eos, **{f"<|extra_{i}|>": i for i in range(eos + 1, DREAM_TINY_TEXT - 2)},
                 "<|beginoftext|>": DREAM_TINY_TEXT - 2, "<|mask|>": DREAM_TINY["mask_token_id"]}
        (folder / "added_tokens.json").write_text(json.dumps(added))


def random_public_weights(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors of every released name for the folder's config.json (norm gains around 1, never
    exactly 1; biases nonzero)."""
    cfg = public_config(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiffusionLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for public, ours in key_map(cfg).items():
        shape = shapes[ours]
        if ours.endswith("norm.weight"):
            out[public] = 1 + 0.3 * torch.randn(shape, generator=g)
        elif ours == "embed.weight":
            out[public] = torch.randn(shape, generator=g)
        else:
            out[public] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return out


def write_public_folder(folder: Path, family: str, config: dict | None = None, shards: int = 3, seed: int = 0,
                        tensors: dict[str, torch.Tensor] | None = None, tokenizer: bool = True) -> Path:
    """A released-style model folder: config.json (default: the tiny one of `family`), generation_config.json
    (LLaDA's BOS), tokenizer files, and the weights (default: random) in `shards` safetensors files placed
    round-robin (so a layer's tensors spread over files, as in the release) with model.safetensors.index.json;
    shards=0 writes a single model.safetensors instead."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY[family] if config is None else config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if family == "llada":
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": LLADA_TINY_BOS}))
    if tokenizer:
        write_tokenizer_files(folder, family)
    tensors = random_public_weights(folder, seed) if tensors is None else tensors
    if shards == 0:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = list(tensors)
    files = [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)]
    weight_map = {name: files[i % shards] for i, name in enumerate(names)}
    for file in files:
        save_file({n: tensors[n].contiguous() for n in names if weight_map[n] == file}, str(folder / file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def read_public_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder written by write_public_folder, by its released name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out
