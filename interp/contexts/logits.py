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
                   chunk: int = 1024, vocab_chunk: int = 8192) -> list[dict]:
    """Per feature: its k most promoted and k most suppressed text tokens (`listed_ids`), with the direct logit
    change of a unit-norm write along its decoder row. Features `chunk` at a time against the head's rows
    `vocab_chunk` at a time, each read as float32 only for its own matmul (a bf16 model's head is never copied
    whole), keeping a running top k of each side."""
    ids = torch.tensor(listed_ids(model), device=model.head.weight.device)
    listed = torch.zeros(model.cfg.text_size, dtype=torch.bool, device=ids.device)
    listed[ids] = True
    gain = model.final_norm.weight
    out: list[dict] = []
    for start in range(0, tc.cfg.num_latents, chunk):
        dec = tc.W_dec[start:start + chunk].float()  # (m, D)
        if gain is not None:  # W_dec·diag(g)·Hᵀ: the gain scales each direction before the head
            dec = dec * gain.float()
        best = {sign: (dec.new_empty(len(dec), 0), ids.new_empty(len(dec), 0)) for sign in (1, -1)}
        for v0 in range(0, len(listed), vocab_chunk):
            here = listed[v0:v0 + vocab_chunk]
            cols = torch.arange(v0, v0 + len(here), device=ids.device)[here]
            logits = dec @ model.head.weight[v0:v0 + len(here)].float()[here].T  # (m, listed ids in the chunk)
            for sign, (values, where) in best.items():
                top = (sign * logits).topk(min(k, len(cols)), -1)
                values, order = torch.cat([values, top.values], 1), torch.cat([where, cols[top.indices]], 1)
                keep = values.topk(min(k, values.shape[1]), -1)
                best[sign] = (keep.values, order.gather(1, keep.indices))
        for kind, sign in (("promotes", 1), ("suppresses", -1)):
            values, where = best[sign]
            for j, (vs, cs) in enumerate(zip(values.tolist(), where.tolist())):
                if kind == "promotes":
                    out.append({})
                out[start + j][kind] = [[pieces[i] if i < len(pieces) else f"<{i}>", round(sign * v, 4)]
                                        for v, i in zip(vs, cs)]
    return out
