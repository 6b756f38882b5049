"""The local replacement model and the attribution graph on the three architectures DiffusionLM builds: this
project's own (weightless norms, QK-norm, document masks, ReLU², soft cap), LLaDA (learned norm gains, raw
embedding, full attention, SiLU-gated MLP, no cap) and Dream (the same plus q/k/v biases, grouped-query
attention and the read-out shift), with random weights and random transcoders (nonzero decoder biases, a skip
connection on one layer, a layer without a transcoder), checked against the real model and against autograd
through a frozen forward pass written here from the model's weights."""
import copy

import pytest
import torch

from interp.explanations.graph import build_graph, total_effects
from interp.explanations.interventions import run_step
from interp.explanations.replacement import freeze, linear_forward, target_cotangents
from model.diffusion import DiffusionLM, ModelConfig
from model.hooks import capture_mlps, replace_mlps
from model.public_models import load_public_model
from model.transcoder import Transcoder, TranscoderConfig
from tests.public_fixtures import write_public_folder
from tests.test_graph import assert_graph_adds_up

ARCHS = ["diffusionlm", "llada", "dream"]
# per architecture: the step's input, the committed positions and tokens, and which layers have a transcoder
# (True: with a skip connection). Two BOS in a row: full attention must not split it into documents.
STEPS = {
    "diffusionlm": ([0, 5, 7, 9, 60, 60, 12, 0, 60, 3], [4, 5, 8], [11, 13, 2], {0: False, 2: True}),
    "llada": ([140, 5, 7, 150, 150, 12, 140, 150, 141, 3], [3, 4, 7], [11, 141, 2], {1: True}),
    "dream": ([171, 5, 178, 9, 178, 12, 171, 178, 7, 3], [0, 2, 4, 7], [8, 13, 171, 2], {0: False, 1: True}),
}


def random_transcoders(d: int, layers: dict[int, bool], seed: int) -> dict[int, Transcoder]:
    torch.manual_seed(seed)
    tcs = {layer: Transcoder(TranscoderConfig(d, 4 * d, 6, skip_connection=skip)) for layer, skip in layers.items()}
    with torch.no_grad():
        for tc in tcs.values():
            for p in tc.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # nonzero encoder and decoder biases, a random skip
    return tcs


def tiny_model(arch: str, tmp_path_factory, dtype: torch.dtype = torch.float32) -> DiffusionLM:
    """A tiny model of the architecture with random weights, frozen: this project's (every weight drawn, the
    zero-initialised projections too), or a released-style LLaDA / Dream folder loaded in `dtype`."""
    if arch == "diffusionlm":
        torch.manual_seed(0)
        model = DiffusionLM(ModelConfig(n_vocab=60, vocab_size=64, mask_id=60, pad_id=61, bos_id=0, num_layers=3,
                                        num_heads=2, model_dim=32))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
    else:
        model = load_public_model(write_public_folder(tmp_path_factory.mktemp(arch), arch), "cpu", dtype)
    return model.requires_grad_(False)


@pytest.fixture(scope="module", params=ARCHS)
def step(request, tmp_path_factory):
    arch = request.param
    model = tiny_model(arch, tmp_path_factory)
    tokens, positions, targets, layers = STEPS[arch]
    return model, random_transcoders(model.cfg.model_dim, layers, 1), torch.tensor(tokens), positions, targets


def gain(module) -> torch.Tensor | float:
    return 1.0 if module.weight is None else module.weight


def reference_forward(model, tcs, fz, embed, errors, factors, attn_bias, dec_bias, stop: int | None = None):
    """The frozen model from the model's own weights, with every feature's value a constant (times `factors`)
    and each layer's value bias and decoder bias times a scalar: autograd's gradients times the values are the
    direct effects. `stop`: return the residual entering that layer's MLP."""
    cfg, r = model.cfg, embed
    T, h, h_kv, dh = len(embed), cfg.num_heads, cfg.kv_heads, cfg.head_dim
    for layer, block in enumerate(model.blocks):
        att = block.attn
        a = r * fz.attn_inv[layer] * gain(block.attn_norm)
        v = a @ att.v.weight.T
        if att.v.bias is not None:
            v = v + attn_bias[layer] * att.v.bias
        v = v.view(T, h_kv, dh).transpose(0, 1).repeat_interleave(h // h_kv, 0)  # (H, T, Dh)
        r = r + (fz.probs[layer] @ v).transpose(0, 1).reshape(T, h * dh) @ att.out.weight.T
        if layer == stop:
            return r
        m = r * fz.mlp_inv[layer] * gain(block.mlp_norm)
        out = errors[layer]
        if layer in tcs:
            tc = tcs[layer]
            out = out + ((fz.acts[layer] * factors[layer])[..., None] * tc.W_dec[fz.idx[layer]]).sum(1)
            out = out + dec_bias[layer] * tc.b_dec
            if tc.W_skip is not None:
                out = out + m @ tc.W_skip.T
        r = r + out
    return r


def demeaned(model, z: torch.Tensor) -> torch.Tensor:
    """Pre-cap logits (..., n_vocab) minus their mean over the ids outside never_predicted()."""
    keep = torch.ones(z.shape[-1], dtype=torch.bool)
    keep[model.cfg.never_predicted()] = False
    return z - z[..., keep].mean(-1, keepdim=True)


def test_the_mlps_are_functions_of_what_the_hooks_see(step):
    model, tcs, tokens, _, _ = step
    layers = list(range(model.cfg.num_layers))
    with torch.no_grad(), capture_mlps(model, layers) as seen:
        real = model(tokens[None]).logits
    for layer in layers:
        x, y = seen[layer]
        torch.testing.assert_close(model.block(layer).mlp(x), y, atol=1e-6, rtol=1e-6)
    copies = {layer: copy.deepcopy(model.block(layer).mlp) for layer in layers}  # the hooked module's own call recurses
    with torch.no_grad(), replace_mlps(model, copies):
        torch.testing.assert_close(model(tokens[None]).logits, real, atol=1e-6, rtol=1e-6)
    # the frozen step's MLP input is the hooks' (the MLP norm's output, its gain included)
    fz = freeze(model, tcs, tokens)
    for layer, tc in tcs.items():
        x, y = seen[layer][0][0], seen[layer][1][0]
        enc = tc.encode(x)
        assert torch.equal(enc.indices.sort(-1).values, fz.idx[layer].sort(-1).values)
        torch.testing.assert_close(fz.error[layer], y - tc.decode(enc.acts, enc.indices, x), atol=1e-4, rtol=1e-4)


def test_the_frozen_step_reproduces_the_model(step):
    model, tcs, tokens, positions, targets = step
    with torch.no_grad():
        out = model(tokens[None])
    fz = freeze(model, tcs, tokens)
    torch.testing.assert_close(fz.logits, out.logits[0], atol=1e-5, rtol=1e-5)
    r = linear_forward(model, tcs, fz)
    torch.testing.assert_close(r, fz.residual, atol=1e-5, rtol=1e-5)
    rows = model.readout_rows(torch.arange(len(tokens)))
    torch.testing.assert_close(model.logits(r * fz.final_inv * gain(model.final_norm))[rows], out.logits[0],
                               atol=1e-5, rtol=1e-5)
    # the targets are the model's own demeaned pre-cap logits, read where the model reads each position
    _, values = target_cotangents(model, fz, positions, targets)
    z = model.raw_logits(out.hidden[0])[rows[positions]]
    torch.testing.assert_close(values, demeaned(model, z)[torch.arange(len(targets)), targets], atol=1e-5, rtol=1e-5)


def test_the_batched_backward_equals_autograd(step):
    """Every target row and a last-layer feature's row of the graph against autograd through
    `reference_forward`: features, errors, embeddings and the bias terms (decoder and value biases); the
    features' total effects against autograd through linear_forward."""
    model, tcs, tokens, positions, targets = step
    g, fz = build_graph(model, tcs, tokens, positions, targets, batch_size=5)
    L, T = fz.num_layers, len(tokens)
    embed = fz.embed.clone().requires_grad_(True)
    errors = [e.clone().requires_grad_(True) for e in fz.error]
    factors = {lay: torch.ones_like(fz.acts[lay]).requires_grad_(True) for lay in tcs}
    attn_bias = [torch.ones((), requires_grad=True) for _ in range(L)]
    dec_bias = [torch.ones((), requires_grad=True) for _ in range(L)]
    sources = [embed, *errors, *factors.values(), *attn_bias, *dec_bias]

    def check(i: int, value: torch.Tensor, upto: int) -> None:
        """Node i's row of the graph against autograd on its value; no bias input from layers above `upto`."""
        row = g.adjacency[i]
        grads = torch.autograd.grad(value, sources, retain_graph=True, allow_unused=True, materialize_grads=True)
        ge, gerr = grads[0], grads[1:1 + L]
        gf = dict(zip(factors, grads[1 + L:1 + L + len(factors)]))
        gb = [a + d for a, d in zip(grads[-2 * L:-L], grads[-L:])]
        torch.testing.assert_close(row[g.embed_start:g.target_start], (ge * fz.embed).sum(-1), atol=1e-5, rtol=1e-4)
        for lay in range(L):
            got = row[g.error_start + lay * T:g.error_start + (lay + 1) * T]
            torch.testing.assert_close(got, (gerr[lay] * fz.error[lay]).sum(-1), atol=1e-5, rtol=1e-4)
        for lay, grad in gf.items():
            in_layer = g.feature_nodes[:, 0] == lay
            torch.testing.assert_close(row[:g.n_features][in_layer], grad[fz.acts[lay] > 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g.bias_inputs[i], torch.stack(gb), atol=1e-5, rtol=1e-4)
        assert not g.bias_inputs[i, upto + 1:].any()

    rows = model.readout_rows(torch.tensor(positions))
    with torch.enable_grad():
        final = reference_forward(model, tcs, fz, embed, errors, factors, attn_bias, dec_bias)
        h = final[rows] * fz.final_inv[rows] * gain(model.final_norm)
        values = demeaned(model, model.raw_logits(h))[torch.arange(len(targets)), targets]
        for t in range(len(targets)):
            i = g.target_start + t
            torch.testing.assert_close(g.target_values[t], values[t], atol=1e-5, rtol=1e-5)
            check(i, values[t], L)
        # total effects (all paths, features live): autograd through linear_forward itself
        grads, _ = target_cotangents(model, fz, positions, targets)
        total = (linear_forward(model, tcs, fz, factors)[rows] * grads).sum(-1)
        effects = total_effects(g)
        for t in range(len(targets)):
            gt = torch.autograd.grad(total[t], list(factors.values()), retain_graph=True)
            for (lay, grad) in zip(factors, gt):
                in_layer = g.feature_nodes[:, 0] == lay
                torch.testing.assert_close(effects[t, :g.n_features][in_layer], grad[fz.acts[lay] > 0], atol=1e-5,
                                           rtol=1e-4)
        # a feature of the last layer with a transcoder: its pre-activation's direct inputs
        top = max(tcs)
        i = int((g.feature_nodes[:, 0] == top).nonzero()[0, 0])
        _, pos, f = g.feature_nodes[i].tolist()
        mid = reference_forward(model, tcs, fz, embed, errors, factors, attn_bias, dec_bias, stop=top)
        m = mid[pos] * fz.mlp_inv[top][pos] * gain(model.block(top).mlp_norm)
        pre = m @ tcs[top].encoder.weight[f] + tcs[top].encoder.bias[f]
        torch.testing.assert_close(pre, g.activations[i], atol=1e-5, rtol=1e-5)
        check(i, pre, top)


def test_the_graphs_parts_add_up_to_each_target(step):
    model, tcs, tokens, positions, targets = step
    g, fz = build_graph(model, tcs, tokens, positions, targets)
    assert_graph_adds_up(g)
    assert g.n_features > 0 and set(g.feature_nodes[:, 0].tolist()) == set(tcs)
    # log p over the ids a step can commit, as the model gives them; uniform over as many
    never = model.cfg.never_predicted()
    assert g.n_choices == model.cfg.n_vocab - len(never)
    with torch.no_grad():
        logits = model(tokens[None]).logits[0, positions]
    logits[:, never] = float("-inf")
    expected = torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets]
    torch.testing.assert_close(g.logprobs, expected, atol=1e-5, rtol=1e-5)


def test_an_intervention_equals_editing_the_mlp_output(step):
    """Doubling a feature's activation through interventions.py against adding its decoder row by hand to the
    MLP's output; in the frozen model the same change moves each target by exactly its total effect."""
    model, tcs, tokens, positions, targets = step
    g, fz = build_graph(model, tcs, tokens, positions, targets)
    i = int(g.activations.argmax())
    layer, pos, f = g.feature_nodes[i].tolist()
    a = float(g.activations[i])
    base = run_step(model, tcs, fz, positions, targets)
    torch.testing.assert_close(base.value, g.target_values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_step(model, tcs, fz, positions, targets, replacement=True).value, base.value,
                               atol=1e-5, rtol=1e-5)
    run = run_step(model, tcs, fz, positions, targets, {(layer, pos, f): 2 * a})

    def edit(module, args, out):
        out = out.clone()
        out[:, pos] += a * tcs[layer].W_dec[f]
        return out

    handle = model.block(layer).mlp.register_forward_hook(edit)
    try:
        with torch.no_grad():
            edited = model(tokens[None])
    finally:
        handle.remove()
    rows = model.readout_rows(torch.tensor(positions))  # Dream: the prediction for p is read from row p − 1
    value = demeaned(model, model.raw_logits(edited.hidden[0, rows]))[torch.arange(len(targets)), targets]
    torch.testing.assert_close(run.value, value, atol=1e-5, rtol=1e-5)
    logits = edited.logits[0, positions]
    logits[:, model.cfg.never_predicted()] = float("-inf")
    logp = torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets]
    torch.testing.assert_close(run.logp, logp, atol=1e-5, rtol=1e-5)
    assert (run.value - base.value).abs().max() > 1e-3  # the edit does move the targets
    # the frozen model: scaling the feature by 2 moves each target by its total effect
    slot = int(((fz.idx[layer][pos] == f) & (fz.acts[layer][pos] > 0)).nonzero()[0, 0])
    factor = torch.ones_like(fz.acts[layer])
    factor[pos, slot] = 2
    grads, _ = target_cotangents(model, fz, positions, targets)
    moved = ((linear_forward(model, tcs, fz, {layer: factor}) - fz.residual)[rows] * grads).sum(-1)
    torch.testing.assert_close(moved, total_effects(g)[:, i], atol=1e-5, rtol=1e-4)
