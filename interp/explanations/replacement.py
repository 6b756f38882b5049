"""The local replacement model of one denoising step, and its exact linear backward pass.

One real forward pass of the model on the step's input fixes everything that is not linear: every
normalisation's 1/rms (per position), every attention pattern (per query head), and, per layer, which
transcoder features are active with what activation, plus the error term (true MLP output minus the
transcoder's). With those frozen, the residual stream is a linear function of what is written into it:

    r_0      = embed(tokens), normalised when the config says so        (the input nodes)
    a_l      = r_l · inv · g_attn                                       (frozen 1/rms, the norm's gain)
    r_mid_l  = r_l + W_o · P_l · W_v a_l + W_o b_v                      (frozen attention)
    m_l      = r_mid_l · inv · g_mlp
    r_{l+1}  = r_mid_l + Σ_f a_f W_dec[f] + b_dec + W_skip m_l + e_l

The gains g are the RMSNorms' learned weights (1 for norms without one), the eps is the config's. The
attention pattern P is computed as the model does (q/k biases, QK-norm when configured, rotary, the
document mask for "documents" attention, none for "full"); with grouped-query attention each query head
reads the values of its key/value head. Every row of P sums to 1, so the value bias b_v is a constant
write W_o b_v at every position: a bias term like b_dec, not a node.

Everything here is float32 whatever the model's dtype: each weight is read as float32 for the one
matmul that needs it (`linear`, `head_logits`, `committable_mean`), so a bf16 model is frozen in float32
math with no float32 copy of the model, and the graph is exact for the frozen float32 model.

`linear_forward` reproduces the model's last residual and logits exactly (tested), and a node's direct
effect on another is a dot product with a cotangent carried back through the frozen attention and skip
paths (`backward`), batched over many targets at once. A feature's pre-activation is `W_enc · m + b_enc`,
so an active TopK feature's value is exactly the sum of its incoming direct effects plus its bias terms.
Layers without a transcoder keep their whole MLP output as the error term. Targets are read where the
model reads them: the last residual at `model.readout_rows(position)` (Dream's shift).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.diffusion import MLP, Attention, DiffusionLM, RMSNorm, norm
from model.rotary import rotate
from model.transcoder import Transcoder


@dataclass
class FrozenStep:
    tokens: torch.Tensor  # (T,) the step's input
    embed: torch.Tensor  # (T, D) r_0: the embedding (normalised when the model normalises it)
    attn_inv: list[torch.Tensor]  # per layer (T, 1): 1 / rms of the residual entering attention
    probs: list[torch.Tensor]  # per layer (H, T, T): attention probabilities of each query head
    mlp_inv: list[torch.Tensor]  # per layer (T, 1): 1 / rms of the residual entering the MLP
    acts: list[torch.Tensor]  # per layer (T, k): active feature values (k = 0 without a transcoder)
    idx: list[torch.Tensor]  # per layer (T, k): which features
    error: list[torch.Tensor]  # per layer (T, D): MLP output minus the transcoder's
    final_inv: torch.Tensor  # (T, 1): 1 / rms of the last residual
    residual: torch.Tensor  # (T, D): the last residual r_L (before the final norm)
    logits: torch.Tensor  # (T, n_vocab): the real model's logits, row i the prediction for token i
    attn_gain: list[torch.Tensor]  # per layer (D,): the attention norm's gain (ones without one)
    mlp_gain: list[torch.Tensor]  # per layer (D,): the MLP norm's gain
    final_gain: torch.Tensor  # (D,): the final norm's gain
    attn_bias: list[torch.Tensor]  # per layer (D,): W_o · b_v, written at every position (zeros without biases)

    @property
    def num_layers(self) -> int:
        return len(self.probs)


def inv_rms(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """1/rms as F.rms_norm computes it (eps None: its default, the dtype's machine epsilon), so
    x · inv_rms(x, eps) == F.rms_norm(x, eps=eps)."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + (torch.finfo(x.dtype).eps if eps is None else eps))


def gain(module: RMSNorm, like: torch.Tensor) -> torch.Tensor:
    """(D,) the norm's learned weight in `like`'s dtype, or ones for a norm without one."""
    if module.weight is None:
        return like.new_ones(like.shape[-1])
    return module.weight.detach().to(like.dtype)


HEAD_ROWS = 8192  # rows of the head read as float32 at a time (LLaDA's shape: 8192 · 4096 · 4 B = 128 MiB)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) in x's dtype: the weight (and bias) are cast to it for this call only."""
    bias = layer.bias
    return F.linear(x, layer.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def mlp_forward(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """mlp(x) in x's dtype, each weight cast for its own matmul (equal to the module's forward on float32 weights)."""
    if mlp.kind == "swiglu":
        return linear(F.silu(linear(x, mlp.gate)) * linear(x, mlp.up), mlp.proj)
    return linear(F.relu(linear(x, mlp.fc)).square(), mlp.proj)


def head_logits(model: DiffusionLM, h: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """(..., D) float32 → (..., n_vocab) float32 pre-cap logits; a head of another dtype is read as float32
    `rows` (default HEAD_ROWS) rows at a time."""
    W, rows = model.head.weight, rows or HEAD_ROWS
    if W.dtype == h.dtype:  # nothing to cast: one matmul, the model's own numbers
        return F.linear(h, W[:model.cfg.n_vocab])
    return torch.cat([F.linear(h, W[s:min(s + rows, model.cfg.n_vocab)].to(h.dtype))
                      for s in range(0, model.cfg.n_vocab, rows)], -1)


def committable_mean(model: DiffusionLM, rows: int | None = None) -> torch.Tensor:
    """(D,) float32: the mean of the head's rows over the tokens a step can commit; a head of another dtype is
    summed as float32 `rows` (default HEAD_ROWS) rows at a time."""
    W, n, rows = model.head.weight, model.cfg.n_vocab, rows or HEAD_ROWS
    keep = committable(n, model.cfg.never_predicted(), W.device)
    if W.dtype == torch.float32:  # nothing to cast: one reduction, as the graph's targets always had it
        return W[:n][keep].mean(0)
    total = torch.zeros(W.shape[1], device=W.device)
    for s in range(0, n, rows):
        total += W[s:min(s + rows, n)].float()[keep[s:s + rows]].sum(0)
    return total / keep.sum()


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(..., T, D) → (..., H, T, Dh)"""
    *lead, T, D = x.shape
    return x.view(*lead, T, h, D // h).transpose(-3, -2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(..., H, T, Dh) → (..., T, D)"""
    *lead, H, T, Dh = x.shape
    return x.transpose(-3, -2).reshape(*lead, T, H * Dh)


def _expand(x: torch.Tensor, att: Attention) -> torch.Tensor:
    """(..., H_kv, T, Dh) → (..., H, T, Dh): each key/value head repeated for the query heads it serves."""
    groups = att.h // att.h_kv
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


def _sum_groups(x: torch.Tensor, att: Attention) -> torch.Tensor:
    """(..., H, T, Dh) → (..., H_kv, T, Dh): the transpose of `_expand`, summing over each head's group."""
    groups = att.h // att.h_kv
    if groups == 1:
        return x
    *lead, H, T, Dh = x.shape
    return x.view(*lead, att.h_kv, groups, T, Dh).sum(-3)


def _values(att: Attention, probs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """W_o · P · W_v a for the normed input a (T, D): the attention output without the value bias."""
    v = _expand(_heads(F.linear(a, att.v.weight.to(a.dtype)), att.h_kv), att)
    return linear(_merge(probs @ v), att.out)


@torch.no_grad()
def freeze(model: DiffusionLM, transcoders: dict[int, Transcoder], tokens: torch.Tensor) -> FrozenStep:
    """Run the model once on `tokens` (T,), recording everything the local replacement model freezes."""
    mc = model.cfg
    x = model.embed(tokens[None])[0].float()  # (T, D)
    x = norm(x) if mc.embed_norm else x
    embed = x.clone()
    T = len(tokens)
    allowed = None
    if mc.attention == "documents":
        doc = torch.cumsum((tokens == mc.bos_id).int(), 0)
        allowed = doc[:, None] == doc[None, :]  # (T, T)
    rope = model.block(0).attn.rotary.tables(T, tokens.device)
    fz: dict[str, list[torch.Tensor]] = dict(attn_inv=[], probs=[], mlp_inv=[], acts=[], idx=[], error=[],
                                             attn_gain=[], mlp_gain=[], attn_bias=[])
    for layer in range(mc.num_layers):
        block = model.block(layer)
        att = block.attn
        inv, a_gain = inv_rms(x, mc.norm_eps), gain(block.attn_norm, x)
        a = x * inv * a_gain
        q, k = _heads(linear(a, att.q), att.h), _heads(linear(a, att.k), att.h_kv)
        if mc.qk_norm:
            q, k = norm(q), norm(k)
        q, k = rotate(q, rope, att.rope_fp32), _expand(rotate(k, rope, att.rope_fp32), att)
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, -1)  # (H, T, T)
        x = x + linear(_merge(probs @ _expand(_heads(linear(a, att.v), att.h_kv), att)), att.out)
        bias = x.new_zeros(x.shape[-1])  # (D,) W_o · b_v, each query head's share from its key/value head
        if att.v.bias is not None:
            bias = linear(_merge(_expand(_heads(att.v.bias.float()[None], att.h_kv), att)), att.out)[0]
        m_inv, m_gain = inv_rms(x, mc.norm_eps), gain(block.mlp_norm, x)
        m = x * m_inv * m_gain
        out = mlp_forward(block.mlp, m)
        tc = transcoders.get(layer)
        if tc is None:
            acts = m.new_zeros(m.shape[0], 0)
            idx = torch.zeros_like(acts, dtype=torch.long)
            err = out
        else:
            enc = tc.encode(m)
            acts, idx = enc.acts, enc.indices
            err = out - tc.decode(acts, idx, m)
        for key, value in zip(fz, (inv, probs, m_inv, acts, idx, err, a_gain, m_gain, bias)):
            fz[key].append(value)
        x = x + out
    final_inv, final_gain = inv_rms(x, mc.norm_eps), gain(model.final_norm, x)
    logits = model.soft_cap(head_logits(model, x * final_inv * final_gain))
    if mc.logit_shift:
        logits = logits[model.readout_rows(torch.arange(T, device=tokens.device))]
    return FrozenStep(tokens, embed, **fz, final_inv=final_inv, residual=x, logits=logits, final_gain=final_gain)


def linear_forward(model: DiffusionLM, transcoders: dict[int, Transcoder], fz: FrozenStep,
                   factors: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The last residual (T, D) of the frozen model. Each active feature's value is recomputed from its
    pre-activation (W_enc[f] · m + b_enc[f], the active set frozen), times `factors[layer]` (T, k) where
    given, so a change anywhere reaches every later feature linearly. Unchanged, it equals the real
    model's residual (tested)."""
    r = fz.embed
    for layer in range(model.cfg.num_layers):
        att = model.block(layer).attn
        r = r + _values(att, fz.probs[layer], r * fz.attn_inv[layer] * fz.attn_gain[layer]) + fz.attn_bias[layer]
        tc = transcoders.get(layer)
        written = fz.error[layer]
        if tc is not None:
            m = r * fz.mlp_inv[layer] * fz.mlp_gain[layer]
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
    biases: list[torch.Tensor]  # per layer (R,): (b_dec and W_o b_v) · g summed over positions (not graph nodes)
    embed: torch.Tensor  # (R, T)


def _attention_vjp(model: DiffusionLM, fz: FrozenStep, layer: int, g: torch.Tensor) -> torch.Tensor:
    """Cotangent on r_l from a cotangent g (R, T, D) on the attention's output (frozen pattern and scale): the
    query heads that share a key/value head add their cotangents on its values."""
    att = model.block(layer).attn
    gy = _heads(g @ att.out.weight.to(g.dtype), att.h)  # (R, H, T, Dh)
    gv = _sum_groups(fz.probs[layer].transpose(-1, -2) @ gy, att)  # Pᵀ: cotangent on the values (R, H_kv, T, Dh)
    return (_merge(gv) @ att.v.weight.to(g.dtype)) * fz.attn_inv[layer] * fz.attn_gain[layer]


def backward(model: DiffusionLM, transcoders: dict[int, Transcoder], fz: FrozenStep, g: torch.Tensor,
             below: int) -> DirectEffects:
    """Carry the cotangent g (R, T, D) on the residual entering layer `below`'s MLP (r_mid; `below` =
    num_layers: on the last residual) back to the embeddings, reading every source's direct effect on the
    way. Features and errors of layers ≥ `below` are zero; the biases of layer `below` hold its attention's
    value bias (it writes into r_mid), those above it zero."""
    L = fz.num_layers
    R, T, _ = g.shape
    feats = [g.new_zeros(R, T, a.shape[1]) for a in fz.acts]
    errors = [g.new_zeros(R, T) for _ in range(L)]
    biases = [g.new_zeros(R) for _ in range(L)]
    if below < L:
        biases[below] = g.sum(1) @ fz.attn_bias[below]
        g = g + _attention_vjp(model, fz, below, g)  # now on r_below
    for layer in range(min(below, L) - 1, -1, -1):  # g is the cotangent on r_{layer+1}: what MLP `layer` wrote
        tc = transcoders.get(layer)
        errors[layer] = torch.einsum("rtd,td->rt", g, fz.error[layer])
        if tc is not None:
            dec = F.embedding(fz.idx[layer], tc.W_dec)  # (T, k, D)
            feats[layer] = torch.einsum("rtd,tkd->rtk", g, dec) * fz.acts[layer]
            biases[layer] = g.sum(1) @ tc.b_dec
            if tc.W_skip is not None:
                g = g + (g @ tc.W_skip) * fz.mlp_inv[layer] * fz.mlp_gain[layer]
        biases[layer] = biases[layer] + g.sum(1) @ fz.attn_bias[layer]  # g is now on r_mid
        g = g + _attention_vjp(model, fz, layer, g)  # now on r_layer
    return DirectEffects(feats, errors, biases, torch.einsum("rtd,td->rt", g, fz.embed))


def encoder_cotangents(tc: Transcoder, fz: FrozenStep, layer: int, positions: torch.Tensor,
                       features: torch.Tensor) -> torch.Tensor:
    """(R, D): the gradient of each feature's pre-activation W_enc[f] · m + b_enc[f] with respect to r_mid at its
    position (m = r_mid · inv · g_mlp)."""
    return tc.encoder.weight[features] * fz.mlp_inv[layer][positions] * fz.mlp_gain[layer]


def committable(n_vocab: int, never: list[int], device) -> torch.Tensor:
    """(n_vocab,) bool: the tokens a step can commit (all but `never`, the config's `never_predicted()`)."""
    keep = torch.ones(n_vocab, dtype=torch.bool, device=device)
    keep[never] = False
    return keep


def demean(z: torch.Tensor, never: list[int]) -> torch.Tensor:
    """Pre-cap logits (..., n_vocab) minus their mean over the tokens a step can commit (all but `never`)."""
    return z - z[..., committable(z.shape[-1], never, z.device)].mean(-1, keepdim=True)


def log_probs(logits: torch.Tensor, never: list[int]) -> torch.Tensor:
    """log p over the tokens a step can commit: the ids in `never` get −inf (the logits are not changed)."""
    return torch.log_softmax(logits.masked_fill(~committable(logits.shape[-1], never, logits.device),
                                                float("-inf")), -1)


def target_cotangents(model: DiffusionLM, fz: FrozenStep, positions: list[int],
                      targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each committed token's target: its logit before the soft cap, demeaned over the tokens the step
    could commit (the config's never-predicted ids excluded), circuit-tracer's choice of target. With the
    final norm's scale frozen it is exactly linear in the last residual r at the row the prediction is read
    from (`model.readout_rows(position)`): value = g · r, g = final_inv · g_final · (W_head[t] − mean_v
    W_head[v]) (the head has no bias). Returns g (n, D), to be placed at those rows, and the values (n,),
    which equal the model's own demeaned pre-cap logits (tested). The unit is the logit's: a change of 1
    multiplies the token's odds against the average token by e before any soft cap. log p moves by less
    where the model caps its logits (c·tanh(z/c)): the cap compresses logits of that order, and the more
    probable the token already is, the less log p can rise."""
    rows = model.readout_rows(torch.tensor(positions, device=fz.residual.device))
    W = model.head.weight
    direction = W[torch.tensor(targets, device=W.device)].float() - committable_mean(model)  # (n, D)
    grad = direction * fz.final_gain * fz.final_inv[rows]
    return grad, (grad * fz.residual[rows]).sum(-1)
