function esc(s){ return String(s).replace(/&/g,'&amp;').replace(/</g,'&lt;'); }
function num(x){ return (x === null || x === undefined) ? 'n/a' : (x >= 0 ? '+' : '') + x.toFixed(3); }
function mean(a){ return a.length ? a.reduce((x, y) => x + y, 0) / a.length : null; }
function show(p, s){
  const st = DATA[p].steps[s], g = st.graph;
  let h = `<b>step ${st.step}: ${esc(JSON.stringify(st.committed))}</b> <a href="#" onclick="document.getElementById('panel').style.display='none';return false">close</a>`;
  if (!g) { h += '<p>no graph</p>'; }
  else {
    h += `<p>target value ${num(g.whole)} nats = input tokens ${num(g.inputs.tokens)} + [MASK] inputs ${num(g.inputs.masks)}` +
         Object.entries(g.layers).map(([l, v]) => ` + layer ${l} ${num(v.part)}`).join('') + '</p>';
    h += `<p>strongest path: ${esc(g.path.join(' → ') || '(none)')}</p>`;
    for (const [layer, v] of Object.entries(g.layers)) {
      h += `<h4>layer ${layer}: ${num(v.part)} (features ${num(v.features)}, error ${num(v.error)}, bias ${num(v.bias)})</h4><ol>` +
        v.cited.map(f => `<li>${f.page ? `<a href="${f.page}">#${f.feature}</a>` : '#' + f.feature}@${f.position} total effect ${num(f.total_effect)}, direct ${num(f.direct)}; ` +
          `ablated: predicted ${num(mean(f.check.predicted_dlogp))}, measured ${num(mean(f.check.measured_dlogp))}: ${esc(f.description)}</li>`).join('') + '</ol>';
    }
  }
  const panel = document.getElementById('panel'); panel.innerHTML = h; panel.style.display = 'block';
}
