const sel = {f: null};
function esc(s){return s.replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function shown(p){return p.replace(/\n/g,'⏎');}
function ctxHtml(ex, max){
  let out = '';
  ex.pieces.forEach((p, i) => {
    const a = ex.acts[i], alpha = max > 0 ? Math.min(1, a / max) : 0;
    const hidden = ex.masked_at ? ex.masked_at.includes(i) : (i === ex.center && ex.masked);
    const cls = 'tok' + (i === ex.center ? ' center' : '') + (hidden ? ' masked' : '');
    const title = a.toFixed(3) + (hidden ? ' · hidden from the model ([MASK])' : '');
    out += `<span class="${cls}" style="background:rgba(255,136,0,${alpha.toFixed(3)})" title="${title}">${esc(shown(p))}</span>`;
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
  if (s.promotes) h += `<table class="stats"><tr><td>promotes (logit)</td><td>${s.promotes.map(t => esc(JSON.stringify(t[0]))+' +'+t[1].toFixed(2)).join(', ')}</td></tr>` +
    `<tr><td>suppresses (logit)</td><td>${s.suppresses.map(t => esc(JSON.stringify(t[0]))+' '+t[1].toFixed(2)).join(', ')}</td></tr></table>`;
  const ds = (typeof DESCRIPTIONS !== 'undefined' ? DESCRIPTIONS : {})[f] || [];
  if (ds.length) h += '<h3>Descriptions</h3>' + ds.map(d => `<div class="desc"><b>${esc(d.explainer)}</b>: ${esc(d.description)}<div class="meta">` +
    (Object.entries(d.scores).map(([n, v]) => `${n} ${v.key.replace('_', ' ')} ${v.value.toFixed(3)} (chance ${v.chance})`).join(' · ') || 'not scored') + '</div></div>').join('');
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
function hashFeature(){ const m = location.hash.match(/^#(\d+)$/); return m && +m[1] < FEATURES.length ? +m[1] : null; }
window.CHUNKS = window.CHUNKS || {};
window.onChunk = (n, data) => { window.CHUNKS[n] = data; };
