"""The model's forward (one QKV matmul per layer, rotary tables computed once and shared by the layers) against
the reference it replaced: separate q/k/v projections and rotary tables recomputed in every layer."""
import pytest
import torch

from model.attention import DocMask, attend, document_ids
from model.diffusion import DiffusionLM, ModelOutput, norm
from model.rotary import Rotary, rotate
from tests.test_diffusion_model import MASK, docs_batch, randomised, tiny_cfg


def reference_rotary(inv_freq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    T = x.shape[-2]
    angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def reference_attention(att, x: torch.Tensor, mask: DocMask) -> torch.Tensor:
    B, T, D = x.shape
    split = lambda t: t.view(B, T, att.h, D // att.h).transpose(1, 2)  # noqa: E731
    q, k, v = split(att.q(x)), split(att.k(x)), split(att.v(x))
    q, k = reference_rotary(att.rotary.inv_freq, norm(q)), reference_rotary(att.rotary.inv_freq, norm(k))
    return att.out(attend(q, k, v, mask).transpose(1, 2).reshape(B, T, D))


def reference_forward(model: DiffusionLM, tokens: torch.Tensor, select: torch.Tensor | None = None,
                      attn_impl="sdpa") -> ModelOutput:
    """The forward with three q/k/v matmuls and per-layer rotary tables (the MLP modules are called, so their
    hooks see the same pairs)."""
    mask = DocMask(document_ids(tokens, model.cfg.bos_id), attn_impl)
    x = norm(model.embed(tokens))
    for block in model.blocks:
        x = x + reference_attention(block.attn, norm(x), mask)
        x = x + block.mlp(norm(x))
    x = norm(x)
    return ModelOutput(model.logits(x if select is None else x[select]), x)


def test_forward_and_gradients_equal_the_reference():
    model = randomised(DiffusionLM(tiny_cfg()))
    x = docs_batch(3, 40)
    x[2, 10:20] = MASK
    select = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.4
    weights = torch.randn(int(select.sum()), model.cfg.n_vocab, generator=torch.Generator().manual_seed(1))

    def run(forward):
        model.zero_grad()
        out = forward(model, x, select)
        ((out.logits * weights).sum() + out.hidden.square().sum()).backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters()}

    (got, got_grads), (ref, ref_grads) = run(DiffusionLM.forward), run(reference_forward)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5 * float(g.abs().max()), rtol=1e-4, msg=name)


def test_index_selection_equals_boolean_selection():
    """`select` as (N,) flat indices gives the rows a boolean mask selects, in the same order; empty: no logits."""
    model = randomised(DiffusionLM(tiny_cfg()))
    x = docs_batch(3, 40)
    select = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    by_mask = model(x, select=select).logits
    by_index = model(x, select=select.flatten().nonzero()[:, 0]).logits
    assert torch.equal(by_index, by_mask)
    none = model(x, select=torch.zeros(0, dtype=torch.long))
    assert none.logits.shape == (0, model.cfg.n_vocab) and none.hidden.shape == (3, 40, model.cfg.model_dim)


def test_one_qkv_matmul_per_layer_and_rotary_tables_once(monkeypatch):
    model = randomised(DiffusionLM(tiny_cfg(num_layers=3)))
    calls = []
    real = Rotary.tables
    monkeypatch.setattr(Rotary, "tables", lambda self, *a: calls.append(a) or real(self, *a))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(docs_batch(2, 40))
    assert len(calls) == 1
    linears = sum(e.name == "aten::linear" for e in prof.events())
    assert linears == 4 * 3 + 1  # per layer: qkv, attention out, MLP in and out; then the head


def test_rotary_alone_equals_the_reference():
    rotary = Rotary(16)
    x = torch.randn(2, 3, 10, 16)
    expected = reference_rotary(rotary.inv_freq, x)
    assert torch.equal(rotary(x), expected)
    assert torch.equal(rotate(x, rotary.tables(10, x.device)), expected)


@pytest.mark.parametrize("layers", [1, 2])
def test_state_dict_keys_and_shapes_are_unchanged(layers):
    """Checkpoints, transcoders, exports and the replacement model read the weights by these names."""
    cfg = tiny_cfg(num_layers=layers)
    d, f = cfg.model_dim, cfg.mlp_dim
    expected = {"embed.weight": (cfg.vocab_size, d), "head.weight": (cfg.vocab_size, d)}
    for i in range(layers):
        expected.update({f"blocks.{i}.attn.{n}.weight": (d, d) for n in ("q", "k", "v", "out")})
        expected.update({f"blocks.{i}.mlp.fc.weight": (f, d), f"blocks.{i}.mlp.proj.weight": (d, f)})
    state = DiffusionLM(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


@torch.no_grad()  # FlexAttention has no backward on the CPU
def test_blocks_compiled_with_flex_attention_equal_eager_sdpa():
    """Compiled CPU FlexAttention reads its inputs' strides: a value tensor that is a view into the fused qkv
    output gave wrong outputs in torch 2.13."""
    eager = randomised(DiffusionLM(tiny_cfg(model_dim=64, num_heads=4)))
    compiled = DiffusionLM(eager.cfg)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    try:
        compiled.compile_blocks(attn_impl="flex")
        x = docs_batch(4, 128)
        torch.testing.assert_close(compiled(x).hidden, eager(x, attn_impl="sdpa").hidden, atol=1e-5, rtol=1e-4)
    finally:
        torch._dynamo.reset()
