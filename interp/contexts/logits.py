"""The output tokens a feature's decoder direction promotes and suppresses, read through the unembedding
(the direct path: its write, normalised by the final norm, times the head; the soft-cap keeps the order)."""
from __future__ import annotations

import torch

from model.diffusion import DiffusionLM
from model.transcoder import Transcoder


@torch.no_grad()
def decoder_logits(model: DiffusionLM, tc: Transcoder, pieces: list[str], k: int = 8,
                   chunk: int = 1024) -> list[dict]:
    """Per feature: its k most promoted and k most suppressed text tokens, with the direct logit change of a
    unit-norm write along its decoder row (features `chunk` at a time, so a large vocabulary fits)."""
    head = model.head.weight[:model.cfg.n_vocab].float()  # (V, D)
    out: list[dict] = []
    for start in range(0, tc.cfg.num_latents, chunk):
        logits = tc.W_dec[start:start + chunk].float() @ head.T  # (m, V)
        for kind, (values, ids) in (("promotes", logits.topk(k, -1)), ("suppresses", (-logits).topk(k, -1))):
            sign = 1 if kind == "promotes" else -1
            for j, (vs, ix) in enumerate(zip(values.tolist(), ids.tolist())):
                if kind == "promotes":
                    out.append({})
                out[start + j][kind] = [[pieces[i] if i < len(pieces) else f"<{i}>", round(sign * v, 4)]
                                        for v, i in zip(vs, ix)]
    return out
