"""Writing and reading the top-k stage's output: per layer, feature statistics (features.jsonl), every
example with its context (contexts.jsonl), the raw arrays (arrays.safetensors).

Readable without this project: JSON lines and safetensors. Each example records its window as the model
saw it (`masked_at`: the window's masked tokens; `t`: the noise level) and its split, "explain" (shown
to the explainer) or "score" (held out for scoring), made so that no token position is in both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from core import files
from core.files import UserError, atomic_path, load_safetensors, read_json, save_safetensors
from experiment.paths import INDEX_FILE
from interp.contexts.scan import CATEGORIES, HIST_BINS, T_BINS, LayerState, ScanSettings

# What the examples mean. 2: each window's mask pattern, a split with no shared position, noise-matched
# non-activating windows (1, unversioned: the centre's mask only, ranks alternating between the halves).
PROTOCOL = 2


def vocab_pieces(tok) -> list[str]:
    """The text of every token id on its own (byte pieces of a character decode to U+FFFD)."""
    return [tok.decode([i]) for i in range(tok.n_vocab)]


def assign_splits(record: dict, seq_len: int, window_of=None) -> None:
    """Split a feature's examples into "explain" and "score" halves with no token position in both.

    Windows never cross a sequence, so all examples from one sequence go to the same half: sequences are
    taken in order of their best example (top, then quantile, then random; by rank), each to the half
    that has fewer examples of that category so far. A sequence is known by the data window it was read
    from (`window_of[scan sequence]`, when given): a scan longer than the corpus reads windows again, in
    a later epoch, and the same text must not land in both halves. Before that, an example whose window has exactly
    the tokens of an earlier one is dropped, whatever its mask pattern (templated text repeats itself; a
    repeated passage in both halves would be a leak, in one half a wasted slot)."""
    seen, half_of, counts = set(), {}, {c: {"explain": 0, "score": 0} for c in CATEGORIES}
    for c in CATEGORIES:
        kept = []
        for e in record[c]:
            key = tuple(e["tokens"])
            if key in seen:
                continue
            seen.add(key)
            seq = e["position"] // seq_len
            seq = int(window_of[seq]) if window_of is not None else seq
            if seq not in half_of:
                half_of[seq] = "score" if counts[c]["score"] < counts[c]["explain"] else "explain"
            e["split"] = half_of[seq]
            counts[c][e["split"]] += 1
            kept.append(e)
        record[c] = kept


def feature_stats(st: LayerState, n_tokens: int, pieces: list[str]) -> list[dict]:
    """Per feature: firing statistics, its activation histogram (HIST_BINS bins over (0, bin_edges_max], the
    power of two at or above its largest activation) and its most frequent tokens."""
    fired = st.fire_count.cpu()
    top_max = st.top.values[:, 0].clamp_min(0).cpu()
    tok_ids, tok_counts = (x.cpu() for x in st.top_tokens)
    hist, hist_max, act_sum, masked = st.hist.cpu(), st.hist_max.cpu(), st.act_sum.cpu(), st.masked_count.cpu()
    out = []
    for f in range(st.top.n_groups):
        n = int(fired[f])
        out.append({
            "feature": f, "dead": n == 0, "fire_count": n, "frequency": n / n_tokens,
            "mean_activation": float(act_sum[f] / n) if n else 0.0, "max_activation": float(top_max[f]),
            "masked_fraction": float(masked[f] / n) if n else None,
            "histogram": {"bin_edges_max": float(hist_max[f]), "bins": HIST_BINS, "counts": hist[f].tolist()},
            "top_tokens": [[pieces[int(i)] if 0 <= int(i) < len(pieces) else f"<{int(i)}>", int(c)]
                           for i, c in zip(tok_ids[f], tok_counts[f]) if i >= 0],
        })
    return out


def feature_examples(st: LayerState, s: ScanSettings, pieces: list[str], seq_len: int, window_of=None,
                     chunk: int = 256) -> Iterator[dict]:
    """Per feature: its examples by category, each trimmed to the window actually inside the document.

    Tensors become Python lists a chunk of features at a time: element-wise tensor access from Python
    cost 60% of the demo's top-k stage, and a whole layer as lists would not fit in memory at scale."""
    names = ("chosen", "win_tokens", "win_acts", "t", "masked", "win_masked")
    for lo in range(0, st.top.n_groups, chunk):
        hi = min(lo + chunk, st.top.n_groups)
        part = {c: [getattr(st, name)[c][lo:hi].cpu().tolist() for name in names] for c in CATEGORIES}
        for i in range(hi - lo):
            record: dict[str, Any] = {"feature": lo + i}
            for c in CATEGORIES:
                items = []
                for pos, toks, acts, t, masked, win_masked in zip(*(rows[i] for rows in part[c])):
                    if pos < 0:
                        continue
                    ids = [tok for tok in toks if tok >= 0]
                    center = sum(tok >= 0 for tok in toks[:s.context_before])
                    a = [round(x, 5) for tok, x in zip(toks, acts) if tok >= 0]
                    hidden = [m for tok, m in zip(toks, win_masked) if tok >= 0]
                    items.append({"position": pos, "split": None, "center": center, "activation": a[center],
                                  "t": round(t, 5), "masked": bool(masked), "tokens": ids,
                                  "pieces": [pieces[j] if j < len(pieces) else "" for j in ids], "acts": a,
                                  "masked_at": [j for j, m in enumerate(hidden) if m]})
                record[c] = items
            assign_splits(record, seq_len, window_of)
            yield record


def write_jsonl(path: Path, records) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_arrays(path: Path, st: LayerState) -> None:
    tensors = {"top_values": st.top.values.clamp_min(0), "fire_count": st.fire_count, "act_sum": st.act_sum,
               "masked_count": st.masked_count, "histogram": st.hist,
               "histogram_max": st.hist_max}
    for c in CATEGORIES:
        tensors.update({f"{c}_position": st.chosen[c], f"{c}_window_tokens": st.win_tokens[c],
                        f"{c}_window_acts": st.win_acts[c], f"{c}_t": st.t[c], f"{c}_masked": st.masked[c],
                        f"{c}_window_masked": st.win_masked[c]})
    save_safetensors(path, tensors)  # with the SHA-256 of the tensors, checked by `read_arrays`


REMAKE = "rerun get_topk_activations.py with --overwrite True to remake the top-k output"


def read_jsonl(path: Path) -> list[dict]:
    """A top-k output file (features.jsonl, contexts.jsonl: written whole), read only; a damaged line is one
    `UserError` naming the file and the line."""
    return files.read_jsonl(path, remedy=REMAKE)


def read_arrays(path: Path, device="cpu") -> dict:
    """A layer's arrays.safetensors, checked against the checksum written with it."""
    return load_safetensors(path, device)


def read_index(topk_dir: Path) -> dict:
    """A finished top-k output's index.json: a damaged one is one `UserError` naming it."""
    path = topk_dir / INDEX_FILE
    index = read_json(path)
    layers = index.get("layers") if isinstance(index, dict) else None
    if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
        raise UserError(f"{path} is damaged (no list of layers); {REMAKE}")
    return index


def noise_levels(records: list[dict]) -> dict:
    """The noise levels t of the held-out ("score") examples of a layer's live features, activating and
    non-activating apart, as histograms over [0, 1] and means: the two should match (the non-activating
    contexts are drawn to follow the activating examples' t).

    Live here means: with at least one held-out activating example. A dead feature's (or one whose
    activating examples all went to the explain half) non-activating windows have no activating partner
    whose t they follow, so counting them would compare the two halves of different features."""
    out: dict[str, Any] = {"bin_edges": [i / T_BINS for i in range(T_BINS + 1)]}
    live = [r for r in records if any(e["split"] == "score" for c in ("top", "quantile") for e in r[c])]
    for name, cats in (("activating", ("top", "quantile")), ("non_activating", ("random",))):
        ts = [e["t"] for r in live for c in cats for e in r[c] if e["split"] == "score"]
        counts = [0] * T_BINS
        for t in ts:
            counts[min(T_BINS - 1, int(t * T_BINS))] += 1
        out[name] = {"n": len(ts), "mean_t": sum(ts) / len(ts) if ts else None, "histogram": counts}
    out["n_features"] = len(live)  # the live features counted
    return out

