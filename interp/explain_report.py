"""The explanation report: a static HTML page (opens from disk) with each prompt's denoising timeline.

Each row is a step: the continuation with that step's committed tokens highlighted, the total
description, ratings and grounded shares. Clicking a committed token shows, per layer, the features
that pushed for it most, with their descriptions and attributions. All data is embedded in the page.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from core.files import write_text_atomic

ASSETS = Path(__file__).resolve().parent / "assets"
# The styles and the script live in assets/ as plain .css and .js files.
STYLE = "\n" + (ASSETS / "explanation_report.css").read_text(encoding="utf-8")
SCRIPT = "\n" + (ASSETS / "explanation_report.js").read_text(encoding="utf-8")


def _highlight(step: dict, p: int, s: int) -> str:
    text = html.escape(step["state_text"])
    for j, c in enumerate(step["committed"]):
        piece = html.escape(c["text"])
        if piece.strip():
            text = text.replace(piece, f'<span class="new" onclick="show({p},{s},{j})">{piece}</span>', 1)
    return text.replace(" _", '<span class="mask"> _</span>')


def write_report(path: Path, results: list[dict], explainer: str, checkpoint: str) -> Path:
    sections = []
    for p, r in enumerate(results):
        rows = []
        for s, step in enumerate(r["steps"]):
            g = step.get("grounded") or {}
            scores = (f"output {step['output_score'] if step['output_score'] is not None else 'n/a'}, interpretation "
                      f"{step['interpretation_score'] if step['interpretation_score'] is not None else 'n/a'}")
            shares = (f"described {g['described_feature_share']:.0%} · undescribed {g['undescribed_feature_share']:.0%}"
                      f" · error {g['error_share']:.0%}") if g else ""
            rows.append(f"<tr><td>{step['step']}</td><td class='state'>{html.escape(r['prompt'])}"
                        f"{_highlight(step, p, s) if step['committed'] else html.escape(step['state_text'])}</td>"
                        f"<td>{html.escape(step['total_description'])}"
                        f"<div class='meta'>{scores}<br>{shares}</div></td></tr>")
        sections.append(f"<h2>{html.escape(r['prompt'])} → {html.escape(r['completion'])}</h2><table>"
                        "<tr><td><b>step</b></td><td><b>continuation (new tokens highlighted: click one)</b></td>"
                        "<td><b>explanation</b></td></tr>" + "".join(rows) + "</table>")
    data = [{"steps": [{"step": st["step"], "tokens": st.get("tokens", [])} for st in r["steps"]]} for r in results]
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Explanations</title>
<style>{STYLE}</style><script>const DATA = {json.dumps(data, ensure_ascii=False)};{SCRIPT}</script></head>
<body><h1>How the model denoised each prompt</h1><p class="meta">checkpoint {html.escape(checkpoint)} · explainer
{html.escape(explainer)}</p>{''.join(sections)}<div id="panel"></div></body></html>
"""
    write_text_atomic(path, page)
    return path
