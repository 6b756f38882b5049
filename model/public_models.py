"""The released LLaDA-8B (Base, Instruct, 1.5) and Dream-7B (Base, Instruct) as configurations of DiffusionLM,
loaded from their own config.json and safetensors (no remote code, nothing of transformers).

`public_config(folder)` maps the model's config.json to a ModelConfig, every value read from the file (the
released code's defaults differ from the released configs, so none of them is assumed), and refuses in one
line whatever the implementation does not do. `public_keys(cfg)` is the released checkpoint's full list of
tensor names, `key_map(cfg)` maps each to its DiffusionLM name. `load_public_model(source)` builds the model on
the meta device and assigns the tensors read straight onto the device: nothing is allocated twice.

n_text (the ids the tokenizer knows; rows above are unused) comes from the folder's tokenizer: tokenizer.json
(its vocabulary and added tokens), else vocab.json with added_tokens.json; without either, the config's
vocab_size.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from core.files import UserError, read_json
from model.diffusion import DiffusionLM, ModelConfig
from model.safetensors_folder import read_tensors, tensor_files, tensor_shapes

LLADA_BOS = 126080  # <|startoftext|>: in LLaDA's generation_config.json, not its config.json
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "merges.txt"]


class _Config:
    """config.json's dict, read with one-line refusals naming the key."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, read_json(path)
        if not isinstance(self.data, dict):
            raise UserError(f"{path} is not a JSON object")

    def need(self, key: str) -> Any:
        if self.data.get(key) is None:
            raise UserError(f"{self.path} has no {key!r}")
        return self.data[key]

    def require(self, key: str, allowed: Any, absent_ok: bool = False) -> Any:
        """The flag's value, refused unless it is `allowed`; an absent flag is refused unless absent_ok (the
        released code's default for it may differ from the release)."""
        if key not in self.data and absent_ok:
            return None
        if key not in self.data:
            raise UserError(f"{self.path} has no {key!r} (this loader implements {key} = {json.dumps(allowed)})")
        if self.data[key] != allowed:
            raise UserError(f"{self.path}: {key} = {json.dumps(self.data[key])} is not supported (this loader "
                            f"implements {json.dumps(allowed)})")
        return self.data[key]


def tokenizer_size(folder: Path) -> int | None:
    """1 + the largest id the folder's tokenizer files define, or None without tokenizer files."""
    ids: list[int] = []
    if (folder / "tokenizer.json").is_file():
        tok = read_json(folder / "tokenizer.json")
        vocab = tok.get("model", {}).get("vocab", {})
        ids += list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in tok.get("added_tokens", [])]
    elif (folder / "vocab.json").is_file():
        ids += list(read_json(folder / "vocab.json").values())
        if (folder / "added_tokens.json").is_file():
            ids += list(read_json(folder / "added_tokens.json").values())
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else None


def _llada(cfg: _Config, folder: Path) -> dict:
    flags: dict[str, Any] = {"alibi": False, "rope": True, "attention_layer_norm": False, "include_bias": False,
                             "include_qkv_bias": False, "block_type": "llama", "activation_type": "silu",
                             "scale_logits": False, "input_emb_norm": False, "weight_tying": False,
                             "layer_norm_type": "rms", "layer_norm_with_affine": True}
    for key, allowed in flags.items():
        cfg.require(key, allowed)
    if cfg.data.get("bias_for_layer_norm") is not None:
        cfg.require("bias_for_layer_norm", False)
    for key, allowed in (("clip_qkv", None), ("block_group_size", 1)):
        cfg.require(key, allowed, absent_ok=True)
    heads = cfg.need("n_heads")
    kv_heads = cfg.data.get("n_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if cfg.data.get("multi_query_attention") else heads
    rows = cfg.data.get("embedding_size") or cfg.need("vocab_size")
    generation = folder / "generation_config.json"
    bos = cfg.data.get("bos_token_id")
    if bos is None and generation.is_file():
        bos = read_json(generation).get("bos_token_id")
    pad = cfg.data.get("pad_token_id")
    return dict(family="llada", model_dim=cfg.need("d_model"), num_layers=cfg.need("n_layers"), num_heads=heads,
                num_kv_heads=kv_heads, mlp_width=cfg.need("mlp_hidden_size"), vocab_size=rows, n_vocab=rows,
                n_text=cfg.need("vocab_size"), mask_id=cfg.need("mask_token_id"),
                pad_id=cfg.need("eos_token_id") if pad is None else pad, bos_id=LLADA_BOS if bos is None else bos,
                rope_theta=float(cfg.need("rope_theta")), rope_fp32=bool(cfg.need("rope_full_precision")),
                norm_eps=float(cfg.need("rms_norm_eps")), qkv_bias=False, logit_shift=0)


def _dream(cfg: _Config, folder: Path) -> dict:
    cfg.require("hidden_act", "silu")
    cfg.require("tie_word_embeddings", False)
    for key, allowed in (("use_sliding_window", False), ("use_mrope", False), ("rope_scaling", None)):
        cfg.require(key, allowed, absent_ok=True)
    d, heads = cfg.need("hidden_size"), cfg.need("num_attention_heads")
    if cfg.data.get("head_dim") not in (None, d // heads):
        raise UserError(f"{cfg.path}: head_dim = {cfg.data['head_dim']} is not supported (this loader implements "
                        f"hidden_size / num_attention_heads = {d // heads})")
    rows = cfg.need("vocab_size")
    return dict(family="dream", model_dim=d, num_layers=cfg.need("num_hidden_layers"), num_heads=heads,
                num_kv_heads=cfg.need("num_key_value_heads"), mlp_width=cfg.need("intermediate_size"),
                vocab_size=rows, n_vocab=rows, n_text=rows, mask_id=cfg.need("mask_token_id"),
                pad_id=cfg.need("pad_token_id"), bos_id=cfg.need("bos_token_id"),
                rope_theta=float(cfg.need("rope_theta")), rope_fp32=False, norm_eps=float(cfg.need("rms_norm_eps")),
                qkv_bias=True, logit_shift=1)


FAMILY_OF_MODEL_TYPE: dict[str, Callable[[_Config, Path], dict]] = {"llada": _llada, "Dream": _dream}


def public_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a released LLaDA or Dream folder, from its config.json (and tokenizer files)."""
    folder = Path(folder)
    cfg = _Config(folder / "config.json")
    model_type = cfg.need("model_type")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise UserError(f"{cfg.path}: model_type {model_type!r} is not supported (this loader reads "
                        f"{' and '.join(repr(k) for k in FAMILY_OF_MODEL_TYPE)})")
    try:
        n_text = tokenizer_size(folder)
    except (AttributeError, TypeError, KeyError) as e:  # valid JSON of another shape
        raise UserError(f"{folder}'s tokenizer files are not a tokenizer's: {type(e).__name__}: {e}") from None
    try:
        values = FAMILY_OF_MODEL_TYPE[model_type](cfg, folder)
        if n_text is not None:
            if n_text > values["n_vocab"]:
                raise UserError(f"{folder}'s tokenizer has {n_text} ids, more than the {values['n_vocab']} "
                                "embedding rows")
            values["n_text"] = n_text
        return ModelConfig(**values, mlp_kind="swiglu", norm_weights=True, embed_norm=False, qk_norm=False,
                           attention="full", logit_softcap=0.0, specials_in_vocab=True,
                           mlp_ratio=values["mlp_width"] / values["model_dim"])
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a value of the wrong type or range
        raise UserError(f"{cfg.path} describes a model this code cannot build: {e}") from None


# (released name, DiffusionLM name) per layer ({i}: the layer) and for the whole model
LLADA_LAYER = [("model.transformer.blocks.{i}." + a, "blocks.{i}." + b) for a, b in (
    ("attn_norm.weight", "attn_norm.weight"), ("q_proj.weight", "attn.q.weight"), ("k_proj.weight", "attn.k.weight"),
    ("v_proj.weight", "attn.v.weight"), ("attn_out.weight", "attn.out.weight"), ("ff_norm.weight", "mlp_norm.weight"),
    ("ff_proj.weight", "mlp.gate.weight"), ("up_proj.weight", "mlp.up.weight"), ("ff_out.weight", "mlp.proj.weight"))]
LLADA_GLOBAL = [("model.transformer." + a, b) for a, b in (
    ("wte.weight", "embed.weight"), ("ln_f.weight", "final_norm.weight"), ("ff_out.weight", "head.weight"))]
DREAM_LAYER = [("model.layers.{i}." + a, "blocks.{i}." + b) for a, b in (
    ("input_layernorm.weight", "attn_norm.weight"),
    *((f"self_attn.{x}_proj.{p}", f"attn.{x}.{p}") for x in "qkv" for p in ("weight", "bias")),
    ("self_attn.o_proj.weight", "attn.out.weight"), ("post_attention_layernorm.weight", "mlp_norm.weight"),
    ("mlp.gate_proj.weight", "mlp.gate.weight"), ("mlp.up_proj.weight", "mlp.up.weight"),
    ("mlp.down_proj.weight", "mlp.proj.weight"))]
DREAM_GLOBAL = [("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "final_norm.weight"),
                ("lm_head.weight", "head.weight")]
NAMES = {"llada": (LLADA_LAYER, LLADA_GLOBAL), "dream": (DREAM_LAYER, DREAM_GLOBAL)}


def key_map(cfg: ModelConfig) -> dict[str, str]:
    """Every tensor name of the released checkpoint → its DiffusionLM state-dict name (layers in order, then
    the embedding, final norm and head)."""
    if cfg.family not in NAMES:
        raise UserError(f"no released checkpoint layout for the family {cfg.family!r}")
    layer, whole = NAMES[cfg.family]
    names = {a.format(i=i): b.format(i=i) for i in range(cfg.num_layers) for a, b in layer}
    return {**names, **dict(whole)}


def public_keys(cfg: ModelConfig) -> list[str]:
    """The released checkpoint's tensor names for `cfg`."""
    return list(key_map(cfg))


def _check(files: dict[str, Path], names: dict[str, str], model: DiffusionLM, folder: Path) -> None:
    missing = [k for k in names if k not in files]
    if missing:
        raise UserError(f"{folder}: {len(missing)} weight(s) missing, the first {missing[0]}")
    extra = sorted(k for k in files if k not in names)
    if extra:
        raise UserError(f"{folder}: {len(extra)} unexpected weight(s), the first {extra[0]}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = tensor_shapes(files)
    wrong = [k for k in names if shapes[k] != expected[names[k]]]
    if wrong:
        k = wrong[0]
        raise UserError(f"{folder}: {len(wrong)} weight(s) of the wrong shape, the first {k} "
                        f"{list(shapes[k])} (config.json implies {list(expected[names[k]])})")


def resolve(source: str | Path) -> Path:
    """A local folder as it is; otherwise a Hub id ("owner/name"), downloaded (weights, configs, tokenizer)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{source} is a file, not a model folder")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) or str(source).startswith("."):
        raise UserError(f"{source} is no folder here, nor a Hugging Face Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(source), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repository, gated model, …
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise UserError(f"{source} is no folder here, and the Hub download failed: {type(e).__name__}: {first}") \
            from None


def load_public_model(source: str | Path, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> DiffusionLM:
    """A released LLaDA or Dream model (a local folder or a Hub id) as a DiffusionLM in eval mode, on `device`
    in `dtype` (default: bfloat16 on CUDA, float32 elsewhere). Strict both ways: every tensor the config implies
    must be there with its shape, and nothing else."""
    folder = resolve(source)
    cfg = public_config(folder)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    names = key_map(cfg)
    files = tensor_files(folder)
    _check(files, names, model, folder)
    model.load_state_dict(read_tensors(files, names, device, dtype), strict=True, assign=True)
    return model.eval()
