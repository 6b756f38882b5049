"""Checks of the top-k output that every interpretation number rests on, printed per layer:

    python -m interp.descriptions.audit --train_folder experiments/X [--checkpoint_name latest]

- the held-out split: the share of held-out ("score") activating windows that overlap, or equal, a
  window of the same feature in the explain half (should be 0);
- noise: the mean t of the held-out activating and non-activating examples (should match);
- hidden triggers: held-out non-activating windows that show, as plain text, one of the three tokens
  the feature is most often active on although the model saw it masked (should be 0: masked tokens
  read [MASK]), and how many would show it rendered as clean text (what a judge reading clean text would see).

It reads older outputs too (those that recorded only the centre's mask state count as "unknown").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from core import cli
from core.files import UserError
from experiment import RunFlags, StagePaths, layer_name, resolve_checkpoint, resolve_run_folder
from experiment.paths import CONTEXTS_FILE, FEATURES_FILE, INDEX_FILE
from interp.contexts.store import read_index, read_jsonl
from interp.descriptions.prompts import plain
from interp.descriptions.scoring import score_sets


@dataclass
class AuditConfig(RunFlags):
    """Check the held-out split, the noise matching and the masked rendering of a top-k output."""


def _span(e: dict) -> range:
    start = e["position"] - e["center"]
    return range(start, start + len(e["tokens"]))


def audit_layer(records: list[dict], stats: list[dict]) -> dict:
    scored = overlapping = identical = 0
    pos_t, neg_t, negatives, shown, clean_text, unknown = [], [], 0, 0, 0, 0
    top_token = {s["feature"]: {t.strip() for t, _ in s["top_tokens"][:3] if t.strip()} for s in stats}
    for r in records:
        explain = [e for c in ("top", "quantile", "random") for e in r[c] if e["split"] == "explain"]
        covered = set().union(*(_span(e) for e in explain)) if explain else set()
        texts = {tuple(e["tokens"]) for e in explain}
        pos, neg = score_sets(r)
        for e in pos:
            scored += 1
            overlapping += any(p in covered for p in _span(e))
            identical += tuple(e["tokens"]) in texts
        pos_t += [e["t"] for e in pos]
        neg_t += [e["t"] for e in neg]
        for e in neg:
            negatives += 1
            if "masked_at" not in e:
                unknown += 1
                continue
            text = plain(e)
            hidden = {e["pieces"][i].strip() for i in e["masked_at"]} & top_token[r["feature"]]
            visible = {p.strip() for i, p in enumerate(e["pieces"]) if i not in e["masked_at"]}
            words = [rf"(?<!\w){re.escape(w)}(?!\w)" for w in hidden - visible]
            shown += any(re.search(w, text) for w in words)
            clean_text += any(re.search(w, "".join(e["pieces"])) for w in words)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"scored_activating": scored, "overlap_explain": overlapping, "identical_to_explain": identical,
            "mean_t_activating": mean(pos_t), "mean_t_non_activating": mean(neg_t),
            "non_activating": negatives, "hidden_trigger_shown": shown, "hidden_trigger_in_clean_text": clean_text,
            "mask_state_unknown": unknown}


def main(cfg: AuditConfig) -> dict:
    folder = resolve_run_folder(cfg.train_folder)
    topk = StagePaths(folder, resolve_checkpoint(folder, cfg.checkpoint_name).name).topk
    if not (topk / INDEX_FILE).exists():
        raise UserError(f"no finished top-k output in {topk}")
    out = {}
    for layer in read_index(topk)["layers"]:
        ldir = topk / layer_name(layer)
        a = out[layer] = audit_layer(read_jsonl(ldir / CONTEXTS_FILE), read_jsonl(ldir / FEATURES_FILE))
        n = max(1, a["scored_activating"])
        t_act, t_non = (f"{a[k]:.3f}" if a[k] is not None else "n/a"
                        for k in ("mean_t_activating", "mean_t_non_activating"))
        print(f"layer {layer}: held-out activating windows overlapping the explain half {a['overlap_explain']} of "
              f"{a['scored_activating']} ({a['overlap_explain'] / n:.1%}), identical {a['identical_to_explain']}; "
              f"mean t activating {t_act}, non-activating {t_non}; non-activating windows showing a masked "
              f"top token as text {a['hidden_trigger_shown']} of {a['non_activating']} (if rendered as clean text: "
              f"{a['hidden_trigger_in_clean_text']})"
              + (f" ({a['mask_state_unknown']} unknown: an older output)" if a["mask_state_unknown"] else ""))
    return out


if __name__ == "__main__":
    cli.run(main, AuditConfig, description=AuditConfig.__doc__)
