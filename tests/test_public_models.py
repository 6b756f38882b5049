"""LLaDA-8B and Dream-7B as configurations of DiffusionLM: logits equal independent references (transformers'
Llama / Qwen2 run bidirectionally, a structural copy of LLaDA's block), the loader's strictness, the released
key counts and parameter counts, the MLP hook contract and Dream's read-out shift. All on tiny folders written
by tests/public_fixtures.py (fp32, CPU)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.files import UserError
from model.attention import DocMask, attend, document_ids
from model.diffusion import DiffusionLM, ModelConfig
from model.public_models import key_map, load_public_model, public_config, public_keys
from model.rotary import Rotary, rotate
from tests.public_fixtures import (
    DREAM_7B,
    DREAM_TINY,
    DREAM_TINY_TEXT,
    LLADA_8B,
    LLADA_TINY,
    LLADA_TINY_BOS,
    LLADA_TINY_TEXT,
    read_public_tensors,
    write_public_folder,
)

T = 24


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return write_public_folder(tmp_path_factory.mktemp("llada"), "llada")


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return write_public_folder(tmp_path_factory.mktemp("dream"), "dream")


def tokens(cfg: ModelConfig, B: int = 2, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, cfg.n_text or cfg.n_vocab, (B, T), generator=torch.Generator().manual_seed(seed))
    x[:, 5:9] = cfg.mask_id
    return x


def bidirectional(B: int) -> torch.Tensor:
    """A 4-D additive mask of zeros: transformers uses a 4-D mask as it is, so nothing is causal."""
    return torch.zeros(B, 1, T, T)


# --- references -----------------------------------------------------------------------------------------------

def llama_reference(folder):
    """transformers' LlamaModel with LLaDA's weights under Llama's names, plus a linear head."""
    from transformers import LlamaConfig, LlamaModel

    c = json.loads((folder / "config.json").read_text())
    config = LlamaConfig(hidden_size=c["d_model"], intermediate_size=c["mlp_hidden_size"],
                         num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
                         num_key_value_heads=c["n_kv_heads"], rms_norm_eps=c["rms_norm_eps"],
                         rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
                         vocab_size=c["embedding_size"], attention_bias=False, mlp_bias=False,
                         tie_word_embeddings=False, max_position_embeddings=c["max_sequence_length"],
                         attn_implementation="eager")
    body = LlamaModel(config).eval()
    renames = [("model.transformer.wte.", "embed_tokens."), ("model.transformer.ln_f.", "norm."),
               ("model.transformer.blocks.", "layers."), (".attn_norm.", ".input_layernorm."),
               (".q_proj.", ".self_attn.q_proj."), (".k_proj.", ".self_attn.k_proj."),
               (".v_proj.", ".self_attn.v_proj."), (".attn_out.", ".self_attn.o_proj."),
               (".ff_norm.", ".post_attention_layernorm."), (".ff_proj.", ".mlp.gate_proj."),
               (".up_proj.", ".mlp.up_proj."), (".ff_out.", ".mlp.down_proj.")]
    state, head = {}, nn.Linear(c["d_model"], c["embedding_size"], bias=False)
    for name, t in read_public_tensors(folder).items():
        if name == "model.transformer.ff_out.weight":
            head.weight.data.copy_(t)
            continue
        for a, b in renames:
            name = name.replace(a, b)
        state[name] = t
    body.load_state_dict(state, strict=True)

    def run(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return head(body(x, attention_mask=bidirectional(len(x)) if mask is None else mask).last_hidden_state)
    return run


class GainNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LLaDABlockCopy(nn.Module):
    """LLaDA's block as docs/notes/public-diffusion-lms.md §3 describes it, with its flat children."""

    def __init__(self, c: dict) -> None:
        super().__init__()
        d, f = c["d_model"], c["mlp_hidden_size"]
        self.c, self.h = c, c["n_heads"]
        self.attn_norm, self.ff_norm = GainNorm(d, c["rms_norm_eps"]), GainNorm(d, c["rms_norm_eps"])
        self.q_proj, self.k_proj, self.v_proj, self.attn_out = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.ff_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.ff_out = nn.Linear(f, d, bias=False)

    def rope(self, x):  # (B, H, T, Dh), in float32, halves rotated as LLaDA views them: (..., 2, Dh/2)
        dh = x.shape[-1]
        inv = 1.0 / self.c["rope_theta"] ** (torch.arange(0, dh, 2, dtype=torch.float) / dh)
        freqs = torch.outer(torch.arange(x.shape[-2], dtype=torch.float), inv)
        emb = torch.cat([freqs, freqs], -1)
        x1, x2 = x.float().unflatten(-1, (2, dh // 2)).unbind(-2)
        return (x.float() * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()).to(x.dtype)

    def forward(self, x):
        B, L, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, L, self.h, D // self.h).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=False)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, L, D))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDACopy(nn.Module):
    """model.transformer.{wte, blocks, ln_f, ff_out}: loads the released names as they are."""

    def __init__(self, c: dict) -> None:
        super().__init__()
        t = nn.Module()
        t.wte = nn.Embedding(c["embedding_size"], c["d_model"])
        t.blocks = nn.ModuleList(LLaDABlockCopy(c) for _ in range(c["n_layers"]))
        t.ln_f = GainNorm(c["d_model"], c["rms_norm_eps"])
        t.ff_out = nn.Linear(c["d_model"], c["embedding_size"], bias=False)
        self.model = nn.Module()
        self.model.transformer = t

    def forward(self, x):
        t = self.model.transformer
        h = t.wte(x)
        for block in t.blocks:
            h = block(h)
        return t.ff_out(t.ln_f(h))


def qwen2_reference(folder):
    """transformers' Qwen2ForCausalLM (Dream's exact module names), bidirectional, its logits shifted as Dream's
    sampler shifts them."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = json.loads((folder / "config.json").read_text())
    config = Qwen2Config(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                         num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                         num_key_value_heads=c["num_key_value_heads"], rms_norm_eps=c["rms_norm_eps"],
                         rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
                         vocab_size=c["vocab_size"], tie_word_embeddings=False, use_sliding_window=False,
                         max_position_embeddings=c["max_position_embeddings"], attn_implementation="eager")
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict(read_public_tensors(folder), strict=True)

    def run(x: torch.Tensor, shift: bool = True) -> torch.Tensor:
        with torch.no_grad():
            logits = model(x, attention_mask=bidirectional(len(x))).logits
        return torch.cat([logits[:, :1], logits[:, :-1]], 1) if shift else logits
    return run


# --- logits against the references ----------------------------------------------------------------------------

def assert_bidirectional(run, x: torch.Tensor, cfg: ModelConfig) -> None:
    later = x.clone()
    later[:, -1] = (later[:, -1] + 1) % cfg.n_text
    assert not torch.allclose(run(x)[:, :T // 2], run(later)[:, :T // 2])  # a later token moved earlier outputs


@torch.no_grad()
def test_llada_logits_equal_transformers_llama_run_bidirectionally(llada):
    model, run = load_public_model(llada), llama_reference(llada)
    x = tokens(model.cfg)
    assert_bidirectional(run, x, model.cfg)
    torch.testing.assert_close(model(x).logits, run(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_llada_logits_equal_a_structural_copy_of_its_block(llada):
    model = load_public_model(llada)
    copy = LLaDACopy(json.loads((llada / "config.json").read_text()))
    copy.load_state_dict(read_public_tensors(llada), strict=True)
    x = tokens(model.cfg, seed=1)
    torch.testing.assert_close(model(x).logits, copy(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_dream_logits_equal_transformers_qwen2_bidirectional_and_shifted(dream):
    model, run = load_public_model(dream), qwen2_reference(dream)
    x = tokens(model.cfg)
    assert_bidirectional(lambda t: run(t, shift=False), x, model.cfg)
    torch.testing.assert_close(model(x).logits, run(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_key_mask_equals_an_additive_padding_mask_on_the_keys(llada):
    """LLaDA's padding form: padded keys get finfo.min added; padded query rows are still computed."""
    model, run = load_public_model(llada), llama_reference(llada)
    x = tokens(model.cfg, B=3)
    keys = torch.ones(3, T, dtype=torch.bool)
    keys[1, :4] = False  # left padding
    keys[2, -7:] = False  # right padding
    additive = torch.zeros(3, 1, T, T).masked_fill(~keys[:, None, None, :], torch.finfo(torch.float32).min)
    got = model(x, key_mask=keys).logits
    torch.testing.assert_close(got, run(x, additive), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], model(x[:1]).logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[1], model(x[1:2]).logits[0])


@torch.no_grad()
def test_flex_attention_equals_sdpa_with_grouped_heads_full_rows_and_key_masks(dream):
    model = load_public_model(dream)
    g = torch.Generator().manual_seed(0)
    for length in (40, 128, 150):
        x = torch.randint(0, model.cfg.n_text, (2, length), generator=g)
        keys = torch.rand(2, length, generator=g) < 0.7
        keys[:, 0] = True
        if length > 130:
            keys[1, :130] = False  # a whole key block masked
        keys[1, -1] = True
        for key_mask in (None, keys):
            torch.testing.assert_close(model(x, attn_impl="flex", key_mask=key_mask).logits,
                                       model(x, attn_impl="sdpa", key_mask=key_mask).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # compiles a block (about 45 s on one CPU core)
@torch.no_grad()  # FlexAttention has no backward on the CPU
def test_compiled_blocks_with_flex_attention_equal_eager_sdpa_for_dream(dream):
    eager, compiled = load_public_model(dream), load_public_model(dream)
    torch._dynamo.reset()
    try:
        compiled.compile_blocks(attn_impl="flex")
        x = torch.randint(0, compiled.cfg.n_text, (2, 128), generator=torch.Generator().manual_seed(5))
        keys = torch.rand(2, 128, generator=torch.Generator().manual_seed(6)) < 0.8
        keys[:, 0] = True
        for key_mask in (None, keys):
            torch.testing.assert_close(compiled(x, key_mask=key_mask).logits,
                                       eager(x, attn_impl="sdpa", key_mask=key_mask).logits, atol=1e-5, rtol=1e-4)
    finally:
        torch._dynamo.reset()


@torch.no_grad()
def test_attend_with_documents_and_key_masks_flex_equals_sdpa():
    """(On the CPU FlexAttention applies the mask_mod to full blocks too; the block layout itself is checked
    against create_block_mask below.)"""
    g = torch.Generator().manual_seed(2)
    for length in (64, 256, 300):
        tok = torch.where(torch.rand(2, length, generator=g) < 0.02, 0, 1)
        tok[:, 0] = 0
        doc = document_ids(tok, 0)
        keys = (torch.rand(2, length, generator=g) < 0.5) | (tok == 0)  # every document keeps a key
        keys[0, 128:256] = tok[0, 128:256] == 0
        q = torch.randn(2, 6, length, 8, generator=g)
        k, v = torch.randn(2, 2, 2, length, 8, generator=g).unbind(0)
        for d in (doc, None):
            sdpa = attend(q, k, v, DocMask(d, "sdpa", keys))
            torch.testing.assert_close(attend(q, k, v, DocMask(d, "flex", keys)), sdpa, atol=1e-5, rtol=1e-4)
            masked = attend(q, k.masked_fill(~keys[:, None, :, None], 1e4), v.masked_fill(~keys[:, None, :, None], 1e4),
                            DocMask(d, "sdpa", keys))
            torch.testing.assert_close(masked, sdpa)  # masked keys and values are never read


@torch.no_grad()
def test_llada_in_bf16_equals_the_copy_bit_for_bit_with_its_float32_rotation(llada):
    model = load_public_model(llada, dtype=torch.bfloat16)
    copy = LLaDACopy(json.loads((llada / "config.json").read_text()))
    copy.load_state_dict(read_public_tensors(llada), strict=True)
    x = tokens(model.cfg)
    expected = copy.bfloat16()(x).float()
    assert torch.equal(model(x).logits, expected)
    for block in model.blocks:
        block.attn.rope_fp32 = False  # rotated in bf16 instead: no longer the released model
    assert not torch.equal(model(x).logits, expected)


def test_weighted_rms_norm_equals_llama_rms_norm_in_bf16():
    """Normalise in float32, cast back, then multiply by the weight, bit for bit as transformers' LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from model.diffusion import RMSNorm

    g = torch.Generator().manual_seed(0)
    llama, ours = LlamaRMSNorm(256, eps=1e-5), RMSNorm(256, 1e-5, gain=True)
    weight = torch.randn(256, generator=g).bfloat16()
    llama.weight.data, ours.weight.data = weight.clone(), weight.clone()
    x = (3 * torch.randn(64, 256, generator=g)).bfloat16()
    assert torch.equal(ours(x), llama(x))
    assert not torch.equal(ours(x), (F.rms_norm(x.float(), (256,), eps=1e-5) * weight.float()).bfloat16())


def test_public_inverse_frequencies_are_the_released_ones_bit_for_bit(llada, dream):
    """1/θ^(2j/Dh) as transformers (and LLaDA's code) compute it; this project's own form differs in the last bits."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for folder in (llada, dream):
        cfg = public_config(folder)
        with torch.device("meta"):
            rotary = DiffusionLM(cfg).block(0).attn.rotary
        llama = LlamaRotaryEmbedding(LlamaConfig(hidden_size=cfg.head_dim, num_attention_heads=1, rope_parameters={
            "rope_type": "default", "rope_theta": cfg.rope_theta}))
        assert torch.equal(rotary.inv_freq, llama.inv_freq)
        assert not torch.equal(Rotary(cfg.head_dim, cfg.rope_theta).inv_freq, llama.inv_freq)


def test_key_block_mask_equals_create_block_mask():
    """Built from the document ids and the key mask with tensor ops: the partial and full blocks
    create_block_mask finds evaluating the mask position by position."""
    from torch.nn.attention.flex_attention import create_block_mask

    from model.attention import key_block_mask

    g = torch.Generator().manual_seed(4)
    for trial in range(24):
        B, length = 2, (100, 128, 256, 300, 384, 500)[trial % 6]
        tok = torch.where(torch.rand(B, length, generator=g) < (0.0, 0.003, 0.05)[trial % 3], 0, 1)
        doc = document_ids(tok, 0)
        keys = torch.rand(B, length, generator=g) < (0.5, 0.97, 1.0, 0.0)[trial % 4]
        keys[0, :min(length, 128)] = trial % 2 == 0  # a key block all False or all True
        ref = create_block_mask(lambda b, h, q, k: (doc[b, q] == doc[b, k]) & keys[b, k], B, None, length, length,
                                device="cpu")
        got = key_block_mask(doc, keys)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            a, b = getattr(got, name), getattr(ref, name)
            assert a.dtype == b.dtype and torch.equal(a, b), (trial, name)


def test_rotation_in_float32_differs_from_bf16_and_is_cast_back():
    rotary = Rotary(64, 500000.0, reciprocal=True)
    x = torch.randn(1, 2, 300, 64).bfloat16()
    tables = rotary.tables(300, x.device)
    fp32 = rotate(x, tables, fp32=True)
    assert fp32.dtype == torch.bfloat16 and torch.equal(fp32, rotate(x.float(), tables).bfloat16())
    assert not torch.equal(fp32, rotate(x, tables))


# --- configs, keys, counts ------------------------------------------------------------------------------------

def config_only(tmp_path, config: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_public_configs_take_every_value_from_the_files(llada, dream):
    a = public_config(llada)
    assert (a.family, a.model_dim, a.num_layers, a.num_heads, a.kv_heads, a.mlp_dim) == ("llada", 64, 2, 4, 4, 192)
    assert (a.n_vocab, a.vocab_size, a.n_text, a.mask_id, a.pad_id, a.bos_id) == (160, 160, LLADA_TINY_TEXT, 150, 141,
                                                                                   LLADA_TINY_BOS)
    assert (a.rope_theta, a.rope_fp32, a.norm_eps, a.qkv_bias, a.logit_shift) == (500000.0, True, 1e-5, False, 0)
    b = public_config(dream)
    assert (b.family, b.model_dim, b.num_layers, b.num_heads, b.kv_heads, b.mlp_dim) == ("dream", 112, 2, 14, 2, 296)
    assert (b.n_vocab, b.n_text, b.mask_id, b.pad_id, b.bos_id) == (192, DREAM_TINY_TEXT, 178, 171, 171)
    assert (b.rope_theta, b.rope_fp32, b.norm_eps, b.qkv_bias, b.logit_shift) == (1e6, False, 1e-6, True, 1)
    for c in (a, b):
        assert (c.mlp_kind, c.norm_weights, c.embed_norm, c.qk_norm, c.attention, c.logit_softcap,
                c.specials_in_vocab) == ("swiglu", True, False, False, "full", 0.0, True)


def test_n_text_without_tokenizer_files_is_the_config_vocab_size(tmp_path):
    llada = public_config(config_only(tmp_path / "a", LLADA_8B))
    assert llada.n_text == llada.n_vocab == 126464
    assert llada.bos_id == 126080  # LLaDA's <|startoftext|> when no generation_config.json says
    assert public_config(config_only(tmp_path / "b", DREAM_TINY)).n_text == DREAM_TINY["vocab_size"]


def test_never_predicted(llada, dream):
    assert public_config(llada).never_predicted() == [LLADA_TINY_BOS, 150, *range(LLADA_TINY_TEXT, 160)]
    assert public_config(dream).never_predicted() == [178, *range(DREAM_TINY_TEXT, 192)]  # BOS = pad: predictable
    own = ModelConfig(n_vocab=96, vocab_size=128, mask_id=96, pad_id=97, bos_id=0)
    assert own.never_predicted() == [0]


@pytest.mark.parametrize("family,config,count,params", [("llada", LLADA_8B, 291, 8_015_581_184),
                                                        ("dream", DREAM_7B, 339, 7_615_616_512)])
def test_released_key_counts_and_parameter_counts_on_the_meta_device(tmp_path, family, config, count, params):
    cfg = public_config(config_only(tmp_path, config))
    keys = public_keys(cfg)
    assert len(keys) == len(set(keys)) == count == cfg.num_layers * (9 if family == "llada" else 12) + 3
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert model.n_params() == params
    assert sorted(key_map(cfg).values()) == sorted(model.state_dict())


def test_loaded_weights_are_the_files_and_nothing_is_left_on_meta(llada, tmp_path):
    model = load_public_model(llada)
    files = read_public_tensors(llada)
    state = model.state_dict()
    for public, ours in key_map(model.cfg).items():
        assert torch.equal(state[ours], files[public]), public
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    half = load_public_model(llada, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    single = write_public_folder(tmp_path / "single", "llada", shards=0)
    x = tokens(model.cfg)
    assert torch.equal(load_public_model(single)(x).logits, model(x).logits)


# --- strictness -----------------------------------------------------------------------------------------------

def one_line_error(call, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_extra_and_misshapen_weights_are_refused(llada, tmp_path):
    files = read_public_tensors(llada)
    first = "model.transformer.blocks.0.attn_norm.weight"
    missing = {k: v for k, v in files.items() if k not in (first, "model.transformer.ln_f.weight")}
    one_line_error(lambda: load_public_model(write_public_folder(tmp_path / "m", "llada", tensors=missing)),
                   f"2 weight\\(s\\) missing, the first {first}")
    extra = {**files, "model.transformer.blocks.0.rotary.inv_freq": torch.ones(8)}
    one_line_error(lambda: load_public_model(write_public_folder(tmp_path / "e", "llada", tensors=extra)),
                   "1 unexpected weight\\(s\\), the first model.transformer.blocks.0.rotary.inv_freq")
    wrong = {**files, "model.transformer.blocks.1.up_proj.weight": torch.zeros(191, 64)}
    one_line_error(lambda: load_public_model(write_public_folder(tmp_path / "w", "llada", tensors=wrong)),
                   r"1 weight\(s\) of the wrong shape, the first model.transformer.blocks.1.up_proj.weight "
                   r"\[191, 64\] \(config.json implies \[192, 64\]\)")


def test_missing_shard_folder_and_index_are_refused(dream, tmp_path):
    folder = write_public_folder(tmp_path / "d", "dream")
    (folder / "model-00002-of-00003.safetensors").unlink()
    one_line_error(lambda: load_public_model(folder), "model-00002-of-00003.safetensors does not exist")
    one_line_error(lambda: load_public_model(tmp_path / "nowhere"), "is no folder here")
    one_line_error(lambda: load_public_model(config_only(tmp_path / "c", DREAM_TINY)), "holds neither")
    odd = config_only(tmp_path / "t", DREAM_TINY)
    (odd / "tokenizer.json").write_text('{"model": null}')  # valid JSON, not a tokenizer's
    one_line_error(lambda: public_config(odd), "are not a tokenizer's")


@pytest.mark.parametrize("family,key,value", [
    ("llada", "alibi", True), ("llada", "rope", False), ("llada", "attention_layer_norm", True),
    ("llada", "include_bias", True), ("llada", "include_qkv_bias", True), ("llada", "block_type", "sequential"),
    ("llada", "activation_type", "swiglu"), ("llada", "scale_logits", True), ("llada", "input_emb_norm", True),
    ("llada", "weight_tying", True), ("llada", "layer_norm_type", "default"), ("llada", "clip_qkv", 8.0),
    ("dream", "use_sliding_window", True), ("dream", "rope_scaling", {"type": "linear", "factor": 2.0}),
    ("dream", "tie_word_embeddings", True), ("dream", "use_mrope", True), ("dream", "hidden_act", "gelu")])
def test_unsupported_config_flags_are_refused_naming_the_key(tmp_path, family, key, value):
    base = LLADA_TINY if family == "llada" else DREAM_TINY
    folder = config_only(tmp_path, {**base, key: value})
    one_line_error(lambda: public_config(folder), f"{key} = .* is not supported")


@pytest.mark.parametrize("family,key", [("llada", "rope_theta"), ("llada", "weight_tying"), ("llada", "d_model"),
                                        ("dream", "rms_norm_eps"), ("dream", "mask_token_id")])
def test_absent_config_values_are_refused_not_defaulted(tmp_path, family, key):
    base = dict(LLADA_TINY if family == "llada" else DREAM_TINY)
    del base[key]
    one_line_error(lambda: public_config(config_only(tmp_path, base)), f"has no '{key}'")


def test_other_model_types_and_impossible_shapes_are_refused(tmp_path):
    one_line_error(lambda: public_config(config_only(tmp_path / "a", {**DREAM_TINY, "model_type": "qwen2"})),
                   "model_type 'qwen2' is not supported")
    one_line_error(lambda: public_config(config_only(tmp_path / "b", {**DREAM_TINY, "num_key_value_heads": 3})),
                   "not a multiple of num_kv_heads 3")
    one_line_error(lambda: public_config(config_only(tmp_path / "c", {**DREAM_TINY, "rope_theta": "big"})),
                   "cannot build")
    one_line_error(lambda: public_config(config_only(tmp_path / "d", {**LLADA_8B, "mask_token_id": 126464})),
                   "inside the embedding")


# --- the project's default is unchanged -----------------------------------------------------------------------

def test_an_old_config_dict_builds_todays_model():
    old = dict(n_vocab=96, vocab_size=128, mask_id=96, pad_id=97, bos_id=0, num_layers=2, num_heads=2,
               model_dim=32, mlp_ratio=4.0, logit_softcap=15.0)
    model = DiffusionLM(old)
    cfg = model.cfg
    assert (cfg.family, cfg.mlp_kind, cfg.attention, cfg.logit_shift, cfg.mlp_dim, cfg.kv_heads) == (
        "diffusionlm", "relu2", "documents", 0, 128, 2)
    assert not any("norm" in k for k in model.state_dict())
    z = torch.linspace(-40, 40, 9)
    assert torch.equal(model.soft_cap(z), 15 * torch.tanh(z / 15))


# --- hooks and the shift --------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["llada", "dream"])
@torch.no_grad()
def test_a_hook_on_the_mlp_sees_what_is_added_to_the_residual(which, llada, dream):
    model = load_public_model(llada if which == "llada" else dream)
    seen: dict[str, torch.Tensor] = {}
    block = model.block(1)
    hooks = [block.register_forward_pre_hook(lambda m, a: seen.update(start=a[0])),
             block.attn.register_forward_hook(lambda m, a, o: seen.update(attn=o)),
             block.mlp.register_forward_hook(lambda m, a, o: seen.update(mlp_in=a[0], mlp_out=o)),
             block.register_forward_hook(lambda m, a, o: seen.update(end=o))]
    model(tokens(model.cfg))
    for h in hooks:
        h.remove()
    mid = seen["start"] + seen["attn"]
    torch.testing.assert_close(seen["mlp_in"], block.mlp_norm(mid))
    assert not torch.allclose(seen["mlp_in"], F.rms_norm(mid, (mid.shape[-1],)))  # the gain is applied
    torch.testing.assert_close(seen["mlp_out"], block.mlp(seen["mlp_in"]))
    torch.testing.assert_close(seen["end"], mid + seen["mlp_out"])


@torch.no_grad()
def test_dream_reads_position_i_from_the_hidden_state_at_i_minus_1(dream):
    model = load_public_model(dream)
    x = tokens(model.cfg)
    out = model(x)
    head = model.head(out.hidden)  # unshifted
    torch.testing.assert_close(out.logits[:, 1:], head[:, :-1])
    torch.testing.assert_close(out.logits[:, 0], head[:, 0])
    assert not torch.allclose(out.logits[:, 1:], head[:, 1:])
    assert torch.equal(model.readout_rows(torch.tensor([0, 1, 5])), torch.tensor([0, 0, 4]))
    select = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    select[:, 0] = True
    assert torch.equal(model(x, select=select).logits, out.logits[select])
    assert torch.equal(model(x, select=select.flatten().nonzero()[:, 0]).logits, out.logits[select])


def test_llada_has_no_shift_and_uncapped_logits(llada):
    model = load_public_model(llada)
    with torch.no_grad():
        out = model(tokens(model.cfg))
    assert torch.equal(out.logits, model.head(out.hidden))
    assert model.readout_rows(torch.tensor([0, 3])).tolist() == [0, 3]
    assert out.logits.shape[-1] == model.cfg.vocab_size and math.isclose(model.cfg.logit_softcap, 0)
