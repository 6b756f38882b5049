"""The local replacement model of one denoising step, and its exact linear backward pass.

One real forward pass of the model on the step's input fixes everything that is not linear: every
normalisation's 1/rms (per position), every attention pattern (per head), and, per layer, which
transcoder features are active with what activation, plus the error term (true MLP output minus the
transcoder's). With those frozen, the residual stream is a linear function of what is written into it:

    r_0      = norm(embed(tokens))                                   (the input nodes)
    r_mid_l  = r_l + W_o · P_l · W_v · (r_l / rms)                   (frozen attention)
    r_{l+1}  = r_mid_l + Σ_f a_f W_dec[f] + b_dec + W_skip m + e_l   (m = r_mid_l / rms)

so `linear_forward` reproduces the model's logits exactly (tested), and a node's direct effect on
another is a dot product with a cotangent carried back through the frozen attention and skip paths
(`backward`), batched over many targets at once. A feature's pre-activation is `W_enc · m + b_enc`, so
an active TopK feature's value is exactly the sum of its incoming direct effects plus its bias terms.
Layers without a transcoder keep their whole MLP output as the error term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.diffusion import DiffusionLM, norm
from model.transcoder import Transcoder


@dataclass
class FrozenStep:
    tokens: torch.Tensor  # (T,) the step's input
    embed: torch.Tensor  # (T, D) r_0 = norm(embed(tokens))
    attn_inv: list[torch.Tensor]  # per layer (T, 1): 1 / rms of the residual entering attention
    probs: list[torch.Tensor]  # per layer (H, T, T): attention probabilities
    mlp_inv: list[torch.Tensor]  # per layer (T, 1): 1 / rms of the residual entering the MLP
    acts: list[torch.Tensor]  # per layer (T, k): active feature values (k = 0 without a transcoder)
    idx: list[torch.Tensor]  # per layer (T, k): which features
    error: list[torch.Tensor]  # per layer (T, D): MLP output minus the transcoder's
    final_inv: torch.Tensor  # (T, 1): 1 / rms of the last residual
    residual: torch.Tensor  # (T, D): the last residual r_L (before the final norm)
    logits: torch.Tensor  # (T, n_vocab): the real model's logits

    @property
    def num_layers(self) -> int:
        return len(self.probs)


def inv_rms(x: torch.Tensor) -> torch.Tensor:
    """1/rms exactly as F.rms_norm computes it (its default eps), so x · inv_rms(x) == norm(x)."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(..., T, D) → (..., H, T, Dh)"""
    *lead, T, D = x.shape
    return x.view(*lead, T, h, D // h).transpose(-3, -2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(..., H, T, Dh) → (..., T, D)"""
    *lead, H, T, Dh = x.shape
    return x.transpose(-3, -2).reshape(*lead, T, H * Dh)


@torch.no_grad()
def freeze(model: DiffusionLM, transcoders: dict[int, Transcoder], tokens: torch.Tensor) -> FrozenStep:
    """Run the model once on `tokens` (T,), recording everything the local replacement model freezes."""
    mc = model.cfg
    x = norm(model.embed(tokens[None]))[0].float()  # (T, D)
    embed = x.clone()
    doc = torch.cumsum((tokens == mc.bos_id).int(), 0)
    same_doc = doc[:, None] == doc[None, :]  # (T, T)
    fz: dict[str, list[torch.Tensor]] = dict(attn_inv=[], probs=[], mlp_inv=[], acts=[], idx=[], error=[])
    for layer in range(mc.num_layers):
        block = model.block(layer)
        att = block.attn
        inv = inv_rms(x)
        h = x * inv
        q, k = (att.rotary(norm(_heads(proj(h), att.h))) for proj in (att.q, att.k))
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        probs = torch.softmax(scores.masked_fill(~same_doc, float("-inf")), -1)  # (H, T, T)
        x = x + att.out(_merge(probs @ _heads(att.v(h), att.h)))
        m_inv = inv_rms(x)
        m = x * m_inv
        out = block.mlp(m)
        tc = transcoders.get(layer)
        if tc is None:
            acts = m.new_zeros(m.shape[0], 0)
            idx = torch.zeros_like(acts, dtype=torch.long)
            err = out
        else:
            enc = tc.encode(m)
            acts, idx = enc.acts, enc.indices
            err = out - tc.decode(acts, idx, m)
        for key, value in zip(fz, (inv, probs, m_inv, acts, idx, err)):
            fz[key].append(value)
        x = x + out
    final_inv = inv_rms(x)
    return FrozenStep(tokens, embed, **fz, final_inv=final_inv, residual=x, logits=model.logits(x * final_inv))


def linear_forward(model: DiffusionLM, transcoders: dict[int, Transcoder], fz: FrozenStep,
                   factors: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The last residual (T, D) of the frozen model. Each active feature's value is recomputed from its
    pre-activation (W_enc[f] · m + b_enc[f], the active set frozen), times `factors[layer]` (T, k) where
    given, so a change anywhere reaches every later feature linearly. Unchanged, it equals the real
    model's residual (tested)."""
    r = fz.embed
    for layer in range(model.cfg.num_layers):
        att = model.block(layer).attn
        r = r + att.out(_merge(fz.probs[layer] @ _heads(att.v(r * fz.attn_inv[layer]), att.h)))
        tc = transcoders.get(layer)
        written = fz.error[layer]
        if tc is not None:
            m = r * fz.mlp_inv[layer]
            idx = fz.idx[layer]
            pre = torch.einsum("td,tkd->tk", m, tc.encoder.weight[idx]) + tc.encoder.bias[idx]
            acts = pre * (fz.acts[layer] > 0)
            if factors and layer in factors:
                acts = acts * factors[layer]
            written = written + tc.decode(acts, idx, m)
        r = r + written
    return r


@dataclass
class DirectEffects:
    """One batch of rows of the adjacency: each row's direct effect from every source node."""
    features: list[torch.Tensor]  # per layer (R, T, k): a_f · (W_dec[f] · g) at the feature's position
    errors: list[torch.Tensor]  # per layer (R, T)
    biases: list[torch.Tensor]  # per layer (R,): b_dec · g summed over positions (not a graph node)
    embed: torch.Tensor  # (R, T)


def _attention_vjp(model: DiffusionLM, fz: FrozenStep, layer: int, g: torch.Tensor) -> torch.Tensor:
    """Cotangent on r_l from a cotangent g (R, T, D) on the attention's output (frozen pattern and scale)."""
    att = model.block(layer).attn
    gy = _heads(g @ att.out.weight, att.h)  # (R, H, T, Dh)
    gv = fz.probs[layer].transpose(-1, -2) @ gy  # Pᵀ: cotangent on the values
    return (_merge(gv) @ att.v.weight) * fz.attn_inv[layer]


def backward(model: DiffusionLM, transcoders: dict[int, Transcoder], fz: FrozenStep, g: torch.Tensor,
             below: int) -> DirectEffects:
    """Carry the cotangent g (R, T, D) on the residual entering layer `below`'s MLP (r_mid; `below` =
    num_layers: on the last residual) back to the embeddings, reading every source's direct effect on the
    way. Only layers < `below` write sources; their entries are zero for the layers at or above it."""
    L = fz.num_layers
    R, T, _ = g.shape
    feats = [g.new_zeros(R, T, a.shape[1]) for a in fz.acts]
    errors = [g.new_zeros(R, T) for _ in range(L)]
    biases = [g.new_zeros(R) for _ in range(L)]
    if below < L:
        g = g + _attention_vjp(model, fz, below, g)  # now on r_below
    for layer in range(min(below, L) - 1, -1, -1):  # g is the cotangent on r_{layer+1}: what MLP `layer` wrote
        tc = transcoders.get(layer)
        errors[layer] = torch.einsum("rtd,td->rt", g, fz.error[layer])
        if tc is not None:
            dec = F.embedding(fz.idx[layer], tc.W_dec)  # (T, k, D)
            feats[layer] = torch.einsum("rtd,tkd->rtk", g, dec) * fz.acts[layer]
            biases[layer] = g.sum(1) @ tc.b_dec
            if tc.W_skip is not None:
                g = g + (g @ tc.W_skip) * fz.mlp_inv[layer]
        g = g + _attention_vjp(model, fz, layer, g)  # now on r_layer
    return DirectEffects(feats, errors, biases, torch.einsum("rtd,td->rt", g, fz.embed))


def committable(n_vocab: int, bos_id: int, device) -> torch.Tensor:
    """(n_vocab,) bool: the tokens a step can commit (every text token but BOS)."""
    keep = torch.ones(n_vocab, dtype=torch.bool, device=device)
    keep[bos_id] = False
    return keep


def demean(z: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Pre-cap logits (..., n_vocab) minus their mean over the tokens a step can commit."""
    return z - z[..., committable(z.shape[-1], bos_id, z.device)].mean(-1, keepdim=True)


def target_cotangents(model: DiffusionLM, fz: FrozenStep, positions: list[int],
                      targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each committed token's target: its logit before the soft cap, demeaned over the tokens the step
    could commit (BOS excluded), circuit-tracer's choice of target. With the final norm's scale frozen it
    is exactly linear in the last residual r: value = g · r, g = final_inv · (W_head[t] − mean_v W_head[v])
    (the head has no bias). Returns g (n, D) and the values (n,), which equal the model's own demeaned
    pre-cap logits (tested). The unit is the logit's: a change of 1 multiplies the token's odds against
    the average token by e before the cap. log p moves by less: the soft cap (c·tanh(z/c), c = 15 here)
    compresses logits of that order, and the more probable the token already is, the less log p can rise."""
    pos = torch.tensor(positions, device=fz.residual.device)
    W = model.head.weight[:model.cfg.n_vocab].float()
    keep = committable(len(W), model.cfg.bos_id, W.device)
    grad = (W[torch.tensor(targets, device=W.device)] - W[keep].mean(0)) * fz.final_inv[pos]
    return grad, (grad * fz.residual[pos]).sum(-1)
