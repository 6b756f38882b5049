"""The output tokens a feature's decoder direction promotes and suppresses, read through the unembedding
(the direct path: its write, normalised by the final norm and scaled by that norm's gain where it has one,
times the head; the soft-cap keeps the order)."""
from __future__ import annotations

import torch

from model.diffusion import DiffusionLM
from model.transcoder import Transcoder


def listed_ids(model: DiffusionLM) -> list[int]:
    """The ids the lists may name: 0..n_vocab-1 less [MASK] and the unused rows ≥ the tokenizer's size (the
    public models give these logits too; this project's models have neither inside n_vocab)."""
    cfg = model.cfg
    return [i for i in range(cfg.text_size) if i != cfg.mask_id]


@torch.no_grad()
def decoder_logits(model: DiffusionLM, tc: Transcoder, pieces: list[str], k: int = 8,
                   chunk: int = 1024) -> list[dict]:
    """Per feature: its k most promoted and k most suppressed text tokens (`listed_ids`), with the direct logit
    change of a unit-norm write along its decoder row (features `chunk` at a time, so a large vocabulary
    fits)."""
    ids = torch.tensor(listed_ids(model), device=model.head.weight.device)
    head = model.head.weight[ids].float()  # (V', D)
    gain = model.final_norm.weight
    if gain is not None:  # W_dec·diag(g)·Hᵀ: the gain scales each direction before the head
        head = head * gain.float()
    out: list[dict] = []
    for start in range(0, tc.cfg.num_latents, chunk):
        logits = tc.W_dec[start:start + chunk].float() @ head.T  # (m, V')
        for kind, (values, cols) in (("promotes", logits.topk(k, -1)), ("suppresses", (-logits).topk(k, -1))):
            sign = 1 if kind == "promotes" else -1
            for j, (vs, cs) in enumerate(zip(values.tolist(), ids[cols].tolist())):
                if kind == "promotes":
                    out.append({})
                out[start + j][kind] = [[pieces[i] if i < len(pieces) else f"<{i}>", round(sign * v, 4)]
                                        for v, i in zip(vs, cs)]
    return out
