function show(p, s, t){
  const tokInfo = DATA[p].steps[s].tokens[t];
  let h = `<b>token ${JSON.stringify(tokInfo.text)}</b> (step ${DATA[p].steps[s].step}) <a href="#" onclick="document.getElementById('panel').style.display='none';return false">close</a>`;
  for (const [layer, feats] of Object.entries(tokInfo.layers)) {
    h += `<h4>layer ${layer}</h4><ol>` + feats.map(f => `<li>#${f.feature} (attribution ${f.attribution.toFixed(3)}): ${f.description.replace(/</g,'&lt;')}</li>`).join('') + '</ol>';
  }
  const panel = document.getElementById('panel'); panel.innerHTML = h; panel.style.display = 'block';
}
