function esc(s){ return String(s).replace(/&/g,'&amp;').replace(/</g,'&lt;'); }
function num(x){ return (x === null || x === undefined) ? 'n/a' : (x >= 0 ? '+' : '') + x.toFixed(3); }
function mean(a){ return a.length ? a.reduce((x, y) => x + y, 0) / a.length : null; }
function flags(f){
  const out = [];
  if (f.generic) out.push(`generic: fires on ${(100 * f.frequency).toFixed(0)}% of tokens`);
  if (f.negligible) out.push('negligible');
  return out.length ? ` <i>[${out.join(', ')}]</i>` : '';
}
function cited(fs){
  return '<ol>' + fs.map(f => `<li>${f.page ? `<a href="${f.page}">#${f.feature}</a>` : '#' + f.feature}@${f.position} total effect ${num(f.total_effect)}, direct ${num(f.direct)}; ` +
    `ablated: predicted ${num(mean(f.check.predicted_dvalue))}, measured ${num(mean(f.check.measured_dvalue))} logit ` +
    `(log p ${num(mean(f.check.measured_dlogp))} nats)${flags(f)}: ${esc(f.description)}</li>`).join('') + '</ol>';
}
function show(p, s){
  const st = DATA[p].steps[s], g = st.graph;
  let h = `<b>step ${st.step}: ${esc(JSON.stringify(st.committed))}</b> <a href="#" onclick="document.getElementById('panel').style.display='none';return false">close</a>`;
  if (!g) { h += '<p>no graph</p>'; }
  else {
    h += g.target.per_token.map(t => `<p>target ${esc(JSON.stringify(t.text))}: demeaned logit ${num(t.value)} (pre-cap logit units); log p ${num(t.logprob)} nats, ${num(t.lift)} above uniform</p>`).join('');
    h += `<p>value ${num(g.whole)} logit = input tokens ${num(g.inputs.tokens)} + [MASK] inputs ${num(g.inputs.masks)}` +
         Object.entries(g.layers).map(([l, v]) => ` + layer ${l} ${num(v.part)}`).join('') + '</p>';
    h += `<p>strongest path: ${esc(g.path.join(' → ') || '(none)')}` + (g.path_value === null ? '' : `, carrying ${num(g.path_value)} logit`) + '</p>';
    for (const [layer, v] of Object.entries(g.layers)) {
      h += `<h4>layer ${layer}: ${num(v.part)} logit (features ${num(v.features)}, error ${num(v.error)}, bias ${num(v.bias)})</h4>` +
        `<p>pushing for the token:</p>${cited(v.for)}<p>pushing against it:</p>${cited(v.against)}`;
    }
  }
  const panel = document.getElementById('panel'); panel.innerHTML = h; panel.style.display = 'block';
}
