"""Static feature browser pages: one index.html per layer, opening from disk (no server).

The page lists every feature (filter, sort, hide dead ones) and shows the chosen feature's statistics,
activation histogram and examples with each token highlighted by its activation. Per-feature data
lives in small script files (`chunks/chunk_NNNN.js`) loaded on demand: browsers refuse fetch() from
file:// pages but do run <script src>. The first live feature is rendered into the HTML itself.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from core.files import write_text_atomic
from experiment.paths import PAGE_DATA_FILE, PAGE_FILE, layer_name

CHUNK = 256
SHOWN_PER_CATEGORY = 50
DESCRIPTIONS_JS = "descriptions.js"  # stage 5 fills it; stage 4 writes it empty so the page never misses it
SCORE_KEYS = (("detection", "auroc", 0.5), ("fuzzing", "balanced_accuracy", 0.5), ("token_match", "correlation", 0.0),
              ("simulation", "correlation", 0.0))  # (scorer, number, chance)
# the keyword match is shown by what it reads: the text as the model saw it (its score says "reads"), or, in
# older records, hidden words too (older still called it "simulation" and recorded its "words")
TOKEN_MATCH_SHOWN = {True: "token_match (visible words)", False: "token_match (hidden words too)"}

ASSETS = Path(__file__).resolve().parent / "assets"
# The styles and the script live in assets/ as plain .css and .js files.
STYLE = "\n" + (ASSETS / "feature_browser.css").read_text(encoding="utf-8")
SCRIPT = "\n" + (ASSETS / "feature_browser.js").read_text(encoding="utf-8")


def _hidden(ex: dict) -> set[int]:
    """The window's masked tokens (older outputs recorded only the centre's)."""
    return set(ex["masked_at"]) if "masked_at" in ex else ({ex["center"]} if ex["masked"] else set())


def _token_html(piece: str, act: float, max_act: float, center: bool, masked: bool) -> str:
    alpha = min(1.0, act / max_act) if max_act > 0 else 0.0
    cls = "tok" + (" center" if center else "") + (" masked" if masked else "")
    title = f"{act:.3f}" + (" · hidden from the model ([MASK])" if masked else "")
    return (f'<span class="{cls}" style="background:rgba(255,136,0,{alpha:.3f})" title="{title}">'
            f'{html.escape(piece.replace(chr(10), "⏎"))}</span>')


def static_examples(examples: list[dict], max_act: float) -> str:
    """The same markup the page's script produces, for the feature shown when the page opens."""
    rows = []
    for ex in examples:
        toks = "".join(_token_html(p, a, max_act, i == ex["center"], i in _hidden(ex))
                       for i, (p, a) in enumerate(zip(ex["pieces"], ex["acts"])))
        rows.append(f'<div class="ctx">{toks}</div><div class="meta">activation {ex["activation"]:.3f} · '
                    f't={ex["t"]:.2f} · {"centre masked" if ex["masked"] else "centre visible"} · {ex["split"]}</div>')
    return "\n".join(rows)


def _js(name: str, obj) -> str:
    return f"{name} = {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))};\n"


def write_layer_pages(folder: Path, layer: int, stats: list[dict], examples: list[dict], meta: dict) -> Path:
    """index.html, features.js and chunks/ for one layer; returns the page's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chunks").mkdir(exist_ok=True)
    by_feature = {e["feature"]: {c: e[c][:SHOWN_PER_CATEGORY] for c in ("top", "quantile", "random")} for e in examples}
    for start in range(0, len(stats), CHUNK):
        data = {f: by_feature[f] for f in range(start, min(start + CHUNK, len(stats))) if f in by_feature}
        write_text_atomic(folder / "chunks" / f"chunk_{start // CHUNK:04d}.js",
                          f"onChunk({start // CHUNK}, {json.dumps(data, ensure_ascii=False, separators=(',', ':'))});"
                          "\n")
    if not (folder / DESCRIPTIONS_JS).exists():
        write_text_atomic(folder / DESCRIPTIONS_JS, _js("const DESCRIPTIONS", {}))
    write_text_atomic(folder / PAGE_DATA_FILE, _js("const FEATURES", stats)
                      + _js("const META", {**meta, "layer": layer})
                      + f"const CHUNK = {CHUNK};\n")
    live = [s for s in stats if not s["dead"]]
    first = max(live, key=lambda s: s["max_activation"]) if live else None
    initial = ""
    if first is not None:
        initial = (f'<h2>Layer {layer} · feature {first["feature"]}</h2><p class="meta">the feature with the largest '
                   f'activation; pick another on the left</p><h3>Top activations</h3>'
                   + static_examples(by_feature[first["feature"]]["top"][:10], first["max_activation"]))
    n_dead = sum(s["dead"] for s in stats)
    # a link to page.html#123 opens feature 123 (stage 6's report links its cited features so)
    opening = (f"pick(hashFeature() ?? {first['feature']});" if first
             else "if (hashFeature() !== null) pick(hashFeature());")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Layer {layer} features</title>
<style>{STYLE}</style>
<script src="{PAGE_DATA_FILE}"></script>
<script src="{DESCRIPTIONS_JS}"></script>
<script>{SCRIPT}</script></head>
<body>
<div id="list">
<div class="meta">Layer {layer}: {len(stats)} features, {n_dead} dead; {meta['n_tokens']:,} tokens scanned
(checkpoint {html.escape(meta['checkpoint'])}). Outlined: an example's centre; dashed red: a token
hidden from the model ([MASK]).</div>
<input id="q" placeholder="feature id or token" oninput="list()" style="width:100%;margin:6px 0">
<label class="meta"><input type="checkbox" id="hide" checked onchange="list()"> hide dead</label>
<select id="sort" onchange="list()" class="meta"><option value="feature">by id</option>
<option value="frequency">by frequency</option><option value="max_activation">by max activation</option></select>
<div id="items"></div></div>
<div id="detail">{initial}</div>
<script>list(); {opening}</script>
</body></html>
"""
    write_text_atomic(folder / PAGE_FILE, page)
    return folder / PAGE_FILE


def write_root_page(out_dir: Path, layers: list[int], summary: dict) -> Path:
    items = "".join(f'<li><a href="{layer_name(layer)}/{PAGE_FILE}">layer {layer}</a> · '
                    f'{summary[str(layer)]["live"]} live, '
                    f'{summary[str(layer)]["dead"]} dead features</li>' for layer in layers)
    write_text_atomic(out_dir / PAGE_FILE, f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>Feature browser</title><style>body{{font-family:system-ui,sans-serif;margin:20px}}</style></head>
<body><h1>Transcoder features</h1><ul>{items}</ul></body></html>
""")
    return out_dir / PAGE_FILE


def write_page_descriptions(folder: Path, records: list[dict]) -> Path:
    """descriptions.js for one layer's page: every explainer's description of each feature with its
    held-out scores (and their chance levels), from stage 5's records of that layer."""
    data: dict = {}
    for r in records:
        if not r.get("description"):
            continue
        scores = {}
        for name, key, chance in SCORE_KEYS:
            score = r.get("scores", {}).get(name) or {}
            if name == "simulation" and "words" in score:
                continue  # an older record's keyword match, shown as token_match
            if name == "token_match":
                score = score or r.get("scores", {}).get("simulation") or {}
                name = TOKEN_MATCH_SHOWN["reads" in score]
            if score.get(key) is not None:
                scores[name] = {"value": round(score[key], 4), "key": key, "chance": chance}
        data.setdefault(str(r["feature"]), []).append({"explainer": r["explainer"], "description": r["description"],
                                                      "scores": scores})
    write_text_atomic(folder / DESCRIPTIONS_JS, _js("const DESCRIPTIONS", data))
    return folder / DESCRIPTIONS_JS
