"""Attribution of a committed token's log-probability to transcoder features, layer by layer.

The replacement forward pass: each layer's MLP output becomes its transcoder's output plus a frozen
error term (the true MLP output minus the transcoder's, from a clean pass), so the forward pass is
exact (tested: the logits equal the base model's). Gradients flow through everything else, encoders
included. A feature's attribution is activation × ∂(log p(token))/∂activation (its direction through
the decoder), summed over positions; each error term gets error · gradient, and the decoder bias
(with the skip connection, if any) its own term, so the share the features explain is known. To
first order, removing a fraction ε of a feature changes log p by −ε × its attribution (tested).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch

from model.diffusion import DiffusionLM
from model.hooks import capture_mlps
from model.transcoder import Transcoder


class LayerAttribution(NamedTuple):
    features: torch.Tensor  # (M,) attribution per feature, summed over positions
    activations: torch.Tensor  # (M,) the feature's largest activation in the input
    error: float  # error term · gradient
    other: float  # decoder bias (+ skip) · gradient


@contextlib.contextmanager
def replacement(model: DiffusionLM, transcoders: dict[int, Transcoder], tokens: torch.Tensor,
                scale: dict[tuple[int, int], float] | None = None) -> Iterator[dict]:
    """Inside: forward passes of `model` on `tokens` run the replacement model. Yields a dict that each
    pass fills with, per layer, (acts (N, k), indices (N, k), output (N, D), error (N, D)).
    `scale[(layer, feature)]` multiplies that feature's activation (for ablations)."""
    with torch.no_grad(), capture_mlps(model, list(transcoders)) as seen:
        model(tokens, select=torch.zeros_like(tokens, dtype=torch.bool))
    errors = {}
    with torch.no_grad():
        for layer, tc in transcoders.items():
            x, y = seen[layer]
            errors[layer] = y.reshape(-1, y.shape[-1]).float() - tc(x.reshape(-1, x.shape[-1]).float())
    record: dict = {}
    handles = []
    for layer, tc in transcoders.items():
        def hook(module, args, output, layer=layer, tc=tc):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            enc = tc.encode(x)
            acts = enc.acts
            if scale:
                factor = torch.ones_like(acts)
                for (lay, feat), s in scale.items():
                    if lay == layer:
                        factor = torch.where(enc.indices == feat, torch.full_like(factor, s), factor)
                acts = acts * factor
            out = tc.decode(acts, enc.indices, x) + errors[layer]
            record[layer] = (acts, enc.indices, out, errors[layer])
            return out.reshape(output.shape).to(output.dtype)
        handles.append(model.blocks[layer].mlp.register_forward_hook(hook))
    # the embedding's output requires grad, so gradients reach every encoder downstream of it
    handles.append(model.embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True)))
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


def token_logprobs(model: DiffusionLM, tokens: torch.Tensor, positions: list[int], targets: list[int],
                   transcoders: dict[int, Transcoder] | None = None, scale=None) -> torch.Tensor:
    """log p(target) at each position (a (1, T) input), through the replacement model when given."""
    ctx = replacement(model, transcoders, tokens, scale) if transcoders else contextlib.nullcontext()
    with ctx, torch.no_grad():
        logits = model(tokens).logits[0]
    wanted = torch.tensor(targets, device=logits.device)[:, None]
    return torch.log_softmax(logits[positions], -1).gather(-1, wanted)[:, 0]


def attribute_tokens(model: DiffusionLM, transcoders: dict[int, Transcoder], tokens: torch.Tensor,
                     positions: list[int], targets: list[int]) -> list[dict[int, LayerAttribution]]:
    """For each (position, target) token: per layer, every feature's attribution to log p(target)."""
    model.requires_grad_(False)
    with replacement(model, transcoders, tokens) as rec, torch.enable_grad():
        logits = model(tokens).logits[0]  # (T, n_vocab)
        logp = torch.log_softmax(logits[positions], -1)
        layers = sorted(rec)
        results = []
        for i, target in enumerate(targets):
            inputs = [rec[layer][0] for layer in layers] + [rec[layer][2] for layer in layers]
            grads = torch.autograd.grad(logp[i, target], inputs, retain_graph=True, allow_unused=True)
            per_layer = {}
            for j, layer in enumerate(layers):
                acts, idx, out, err = rec[layer]
                g_acts = grads[j] if grads[j] is not None else torch.zeros_like(acts)
                g_out = grads[len(layers) + j] if grads[len(layers) + j] is not None else torch.zeros_like(out)
                M = transcoders[layer].cfg.num_latents
                feats = torch.zeros(M, device=acts.device).index_add_(0, idx.reshape(-1),
                                                                      (acts.detach() * g_acts).reshape(-1))
                peak = torch.zeros(M, device=acts.device).scatter_reduce_(0, idx.reshape(-1), acts.detach().reshape(-1),
                                                                          "amax")
                error = float((err * g_out).sum())
                features_total = float(feats.sum())
                # what the output owes to neither features nor error: decoder bias and skip
                other = float((out.detach() * g_out).sum()) - features_total - error
                per_layer[layer] = LayerAttribution(feats, peak, error, other)
            results.append(per_layer)
    return results
