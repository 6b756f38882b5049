"""The explanation report: a static HTML page (opens from disk) with each prompt's denoising timeline.

Each row is a step: the continuation with that step's committed tokens highlighted, the total
description, the measured mechanistic-interpretability score beside the explainer's ratings, and a
link to the step's attribution graph (circuit-tracer's JSON). Clicking a committed token opens the
step's graph in numbers: the per-layer parts of the target value and the cited features, each with its
predicted and measured ablation effect. Below, a timeline of the features cited at several steps.
All data is embedded in the page.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from core.files import write_text_atomic
from interp.explanations.wording import chance_text

ASSETS = Path(__file__).resolve().parent / "assets"
# The styles and the script live in assets/ as plain .css and .js files.
STYLE = "\n" + (ASSETS / "explanation_report.css").read_text(encoding="utf-8")
SCRIPT = "\n" + (ASSETS / "explanation_report.js").read_text(encoding="utf-8")


def _highlight(step: dict, p: int, s: int) -> str:
    text = html.escape(step["state_text"])
    for c in step["committed"]:
        piece = html.escape(c["text"])
        if piece.strip():
            text = text.replace(piece, f'<span class="new" onclick="show({p},{s})">{piece}</span>', 1)
    return text.replace(" _", '<span class="mask"> _</span>')


def _scores(step: dict) -> str:
    g = step.get("graph") or {}
    sc = g.get("scores") or {}
    mi = sc.get("mi_score")
    rating = lambda v: "n/a" if v is None else v  # noqa: E731
    measured = (f"<b>MI score {mi:.1f}/10</b> (carried {sc['carried']:.2f} × agreement {sc['agreement']:.2f}; "
                f"chance: {html.escape(chance_text(sc))}; "
                f"most active features {sc['most_active']:.1f}) · graph quality: replacement {sc['replacement']:.2f}, "
                f"completeness {sc['completeness']:.2f}" if mi is not None else "MI score n/a")
    link = f" · <a href='{html.escape(g['file'])}'>graph JSON</a>" if g.get("file") else ""
    return (f"{measured}<br>explainer's ratings: output {rating(step['output_score'])}, interpretation "
            f"{rating(step['interpretation_score'])}{link}")


def _timeline(r: dict, n_steps: int) -> str:
    if not r.get("recurring"):
        return "<p class='meta'>no feature was cited at more than one step</p>"
    head = "".join(f"<td>{s}</td>" for s in range(1, n_steps + 1))
    rows = []
    for f in r["recurring"][:20]:
        at = {x["step"]: x["total_effect"] for x in f["steps"]}
        cells = "".join(f"<td class='hit' title='{at[s]:+.3f}'>{at[s]:+.2f}</td>" if s in at else "<td></td>"
                        for s in range(1, n_steps + 1))
        rows.append(f"<tr><td>L{f['layer']}#{f['feature']} {html.escape(f['description'][:60])}</td>{cells}</tr>")
    return ("<h3>Features cited at several steps (total effect on the committed tokens' demeaned logit)</h3>"
            "<table class='tl'>"
            f"<tr><td><b>feature \\ step</b></td>{head}</tr>{''.join(rows)}</table>")


def write_report(path: Path, results: list[dict], explainer: str, checkpoint: str) -> Path:
    sections = []
    for p, r in enumerate(results):
        rows = []
        for s, step in enumerate(r["steps"]):
            rows.append(f"<tr><td>{step['step']}</td><td class='state'>{html.escape(r['prompt'])}"
                        f"{_highlight(step, p, s) if step['committed'] else html.escape(step['state_text'])}</td>"
                        f"<td>{html.escape(step['total_description'])}"
                        f"<div class='meta'>{_scores(step)}</div></td></tr>")
        sections.append(f"<h2>{html.escape(r['prompt'])} → {html.escape(r['completion'])}</h2><table>"
                        "<tr><td><b>step</b></td><td><b>continuation (new tokens highlighted: click one)</b></td>"
                        "<td><b>explanation</b></td></tr>" + "".join(rows) + "</table>" + _timeline(r, len(r["steps"])))
    data = [{"steps": [{"step": st["step"], "committed": [c["text"] for c in st["committed"]],
                        "graph": st.get("graph")} for st in r["steps"]]} for r in results]
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Explanations</title>
<style>{STYLE}</style><script>const DATA = {json.dumps(data, ensure_ascii=False)};{SCRIPT}</script></head>
<body><h1>How the model denoised each prompt</h1><p class="meta">checkpoint {html.escape(checkpoint)} · explainer
{html.escape(explainer)} · each step's graph opens in circuit-tracer's viewer (see docs/TOOLS.md)</p>
{''.join(sections)}<div id="panel"></div></body></html>
"""
    write_text_atomic(path, page)
    return path
