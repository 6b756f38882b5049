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

from experiment import write_text_atomic

CHUNK = 256
SHOWN_PER_CATEGORY = 50

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#list{width:340px;overflow-y:auto;border-right:1px solid #ccc;padding:8px;box-sizing:border-box}
#detail{flex:1;overflow-y:auto;padding:12px 20px}
.feat{padding:3px 6px;cursor:pointer;border-radius:4px;font-size:13px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.feat:hover{background:#eef}.feat.sel{background:#dde4ff}.feat.dead{color:#aaa}
.ctx{font-family:ui-monospace,monospace;font-size:13px;margin:3px 0;padding:3px 6px;background:#fafafa;border-radius:3px;white-space:pre-wrap}
.tok{border-radius:2px}.tok.center{outline:1.5px solid #333}.tok.masked{outline:1.5px dashed #c00}
.meta{color:#666;font-size:12px}h2{margin:6px 0}h3{margin:14px 0 4px;font-size:15px}
table.stats td{padding:1px 10px 1px 0;font-size:13px}.bar{fill:#f80}
"""

SCRIPT = """
const sel = {f: null};
function esc(s){return s.replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function shown(p){return p.replace(/\\n/g,'⏎');}
function ctxHtml(ex, max){
  let out = '';
  ex.pieces.forEach((p, i) => {
    const a = ex.acts[i], alpha = max > 0 ? Math.min(1, a / max) : 0;
    let cls = 'tok' + (i === ex.center ? ' center' + (ex.masked ? ' masked' : '') : '');
    out += `<span class="${cls}" style="background:rgba(255,136,0,${alpha.toFixed(3)})" title="${a.toFixed(3)}">${esc(shown(p))}</span>`;
  });
  return `<div class="ctx">${out}</div><div class="meta">activation ${ex.activation.toFixed(3)} · t=${ex.t.toFixed(2)} · ${ex.masked ? 'centre masked' : 'centre visible'} · ${ex.split}</div>`;
}
function histSvg(h){
  const m = Math.max(1, ...h.counts), w = 12;
  let bars = h.counts.map((c, i) => `<rect class="bar" x="${i*w}" y="${60-60*c/m}" width="${w-2}" height="${60*c/m}"><title>${c}</title></rect>`).join('');
  return `<svg width="${h.counts.length*w}" height="62">${bars}</svg><div class="meta">activation 0 … ${h.bin_edges_max.toFixed(3)}</div>`;
}
function render(f){
  const s = FEATURES[f], c = (window.CHUNKS[Math.floor(f/CHUNK)] || {})[f];
  let h = `<h2>Layer ${META.layer} · feature ${f}${s.dead ? ' (dead)' : ''}</h2><table class="stats">`;
  h += `<tr><td>firing frequency</td><td>${(100*s.frequency).toFixed(4)}% (${s.fire_count} of ${META.n_tokens} tokens)</td></tr>`;
  h += `<tr><td>mean / max activation</td><td>${s.mean_activation.toFixed(3)} / ${s.max_activation.toFixed(3)}</td></tr>`;
  h += `<tr><td>fires at masked positions</td><td>${s.masked_fraction === null ? '–' : (100*s.masked_fraction).toFixed(1)+'%'}</td></tr>`;
  h += `<tr><td>top tokens</td><td>${s.top_tokens.map(t => esc(JSON.stringify(t[0]))+' ×'+t[1]).join(', ')}</td></tr></table>`;
  h += histSvg(s.histogram);
  if (c) for (const [cat, title] of [['top','Top activations'],['quantile','Across the activation range'],['random','Contexts where it does not fire']]) {
    if (!c[cat].length) continue;
    h += `<h3>${title}</h3>` + c[cat].map(ex => ctxHtml(ex, s.max_activation)).join('');
  }
  document.getElementById('detail').innerHTML = h;
}
function pick(f){
  sel.f = f;
  document.querySelectorAll('.feat').forEach(e => e.classList.toggle('sel', +e.dataset.f === f));
  const n = Math.floor(f/CHUNK);
  if (window.CHUNKS[n] || FEATURES[f].dead) return render(f);
  const sc = document.createElement('script');
  sc.src = `chunks/chunk_${String(n).padStart(4,'0')}.js`;
  sc.onload = () => { if (sel.f === f) render(f); };
  document.head.appendChild(sc);
}
function list(){
  const q = document.getElementById('q').value.toLowerCase(), hide = document.getElementById('hide').checked;
  const key = document.getElementById('sort').value;
  let fs = FEATURES.filter(s => !(hide && s.dead) && (!q || String(s.feature) === q || s.top_tokens.some(t => t[0].toLowerCase().includes(q))));
  if (key !== 'feature') fs = fs.slice().sort((a, b) => b[key] - a[key]);
  document.getElementById('items').innerHTML = fs.slice(0, 2000).map(s =>
    `<div class="feat${s.dead ? ' dead' : ''}${s.feature === sel.f ? ' sel' : ''}" data-f="${s.feature}" onclick="pick(${s.feature})">#${s.feature} · ${(100*s.frequency).toFixed(3)}% · ${esc(s.top_tokens.slice(0,3).map(t => t[0]).join(' '))}</div>`).join('');
}
window.CHUNKS = window.CHUNKS || {};
window.onChunk = (n, data) => { window.CHUNKS[n] = data; };
"""


def _token_html(piece: str, act: float, max_act: float, center: bool, masked: bool) -> str:
    alpha = min(1.0, act / max_act) if max_act > 0 else 0.0
    cls = "tok" + (" center" + (" masked" if masked else "") if center else "")
    return (f'<span class="{cls}" style="background:rgba(255,136,0,{alpha:.3f})" title="{act:.3f}">'
            f'{html.escape(piece.replace(chr(10), "⏎"))}</span>')


def static_examples(examples: list[dict], max_act: float) -> str:
    """The same markup the page's script produces, for the feature shown when the page opens."""
    rows = []
    for ex in examples:
        toks = "".join(_token_html(p, a, max_act, i == ex["center"], ex["masked"])
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
                          f"onChunk({start // CHUNK}, {json.dumps(data, ensure_ascii=False, separators=(',', ':'))});\n")
    write_text_atomic(folder / "features.js", _js("const FEATURES", stats) + _js("const META", {**meta, "layer": layer})
                      + f"const CHUNK = {CHUNK};\n")
    live = [s for s in stats if not s["dead"]]
    first = max(live, key=lambda s: s["max_activation"]) if live else None
    initial = ""
    if first is not None:
        initial = (f'<h2>Layer {layer} · feature {first["feature"]}</h2><p class="meta">the feature with the largest '
                   f'activation; pick another on the left</p><h3>Top activations</h3>'
                   + static_examples(by_feature[first["feature"]]["top"][:10], first["max_activation"]))
    n_dead = sum(s["dead"] for s in stats)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Layer {layer} features</title>
<style>{STYLE}</style>
<script src="features.js"></script>
<script>{SCRIPT}</script></head>
<body>
<div id="list">
<div class="meta">Layer {layer}: {len(stats)} features, {n_dead} dead; {meta['n_tokens']:,} tokens scanned
(checkpoint {html.escape(meta['checkpoint'])})</div>
<input id="q" placeholder="feature id or token" oninput="list()" style="width:100%;margin:6px 0">
<label class="meta"><input type="checkbox" id="hide" checked onchange="list()"> hide dead</label>
<select id="sort" onchange="list()" class="meta"><option value="feature">by id</option>
<option value="frequency">by frequency</option><option value="max_activation">by max activation</option></select>
<div id="items"></div></div>
<div id="detail">{initial}</div>
<script>list(); {f"pick({first['feature']});" if first else ""}</script>
</body></html>
"""
    write_text_atomic(folder / "index.html", page)
    return folder / "index.html"


def write_root_page(out_dir: Path, layers: list[int], summary: dict) -> Path:
    items = "".join(f'<li><a href="layer_{layer:02d}/index.html">layer {layer}</a> · {summary[str(layer)]["live"]} live, '
                    f'{summary[str(layer)]["dead"]} dead features</li>' for layer in layers)
    write_text_atomic(out_dir / "index.html", f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>Feature browser</title><style>body{{font-family:system-ui,sans-serif;margin:20px}}</style></head>
<body><h1>Transcoder features</h1><ul>{items}</ul></body></html>
""")
    return out_dir / "index.html"
