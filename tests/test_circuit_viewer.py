"""circuit-tracer's own viewer renders one of stage 6's graphs in headless Chromium, without console errors.

The viewer's files come from circuit-tracer 0.5.0 (installed without dependencies by `make venv`). The
scripts its index.html loads from public CDNs (d3 with d3-jetpack, dagre, pako) come from the npm
registry instead (`make venv` bundles d3 and the jetpack methods the viewer calls: tests/viewer/); its
dev-only live-reload and .npy scripts are left out, since the tests run offline. The graph files are
served as its local server serves them (/data/ and /graph_data/ both map to the graphs folder). A
screenshot is saved in tests/artifacts/."""
import functools
import http.server
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

from generate_descriptions import ExplainConfig, main as explain
from tests.test_browser import ARTIFACTS, CHROMIUM, console_errors

pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="Chromium is not installed (.ci/run installs it)")
VENV = Path(sys.prefix)
CDN = {"static_js/lib/d3.js": "d3-with-jetpack.min.js",
       "static_js/lib/jetpack_2024-07-20.js": None, "static_js/lib/hotserver-client-ws.js": None,
       "static_js/lib/npy_v0.js": None, "dagre@0.8.5/dist/dagre.min.js": "node_modules/dagre/dist/dagre.min.js",
       "pako@2.1.0/dist/pako.min.js": "node_modules/pako/dist/pako.min.js"}


def viewer_site(graphs: Path, site: Path) -> Path:
    assets = VENV / "circuit-tracer" / "circuit_tracer" / "frontend" / "assets"
    js = VENV / "viewer-js"
    if not assets.is_dir() or not js.is_dir():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{assets} or {js}: `make venv` installs them")
        pytest.skip("circuit-tracer's viewer or its scripts are not installed (make venv installs them)")
    shutil.copytree(assets, site)
    lines = []
    for line in (site / "index.html").read_text().splitlines():
        hit = [k for k in CDN if k in line and "<script src='https://" in line]
        if hit:
            if CDN[hit[0]] is None:
                continue
            target = site / "lib" / Path(CDN[hit[0]]).name
            target.parent.mkdir(exist_ok=True)
            shutil.copy(js / CDN[hit[0]], target)
            line = f"<script src='./lib/{target.name}'></script>"
        lines.append(line)
    (site / "index.html").write_text("\n".join(lines))
    assert "https://" not in "".join(x for x in lines if "<script" in x)
    for name in ("data", "graph_data"):
        shutil.copytree(graphs, site / name)
    return site


def test_circuit_tracer_viewer_renders_a_step_graph(tiny_descriptions, tiny_run, tmp_path):
    from tests.test_browser import browse_url

    out = explain(ExplainConfig(train_folder=str(tiny_run), explainer="tokens", device="cpu",
                                prompt=["The capital of France is"], gen_length=3, num_generate_steps=3,
                                output=str(tmp_path / "e.json")))
    site = viewer_site(out.parent / "e_graphs", tmp_path / "site")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html?slug=p0_step002"
        dom, log = browse_url(url, tmp_path, "circuit_tracer_viewer.png")
    finally:
        server.shutdown()
    assert not console_errors(log), console_errors(log)
    assert dom.count("<option") == 3 and 'value="p0_step002"' in dom  # the graph picker lists the step graphs
    graph = json.loads((out.parent / "e_graphs" / "p0_step002.json").read_text())
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert dom.count("<circle") >= min(3, len(features))  # feature nodes drawn (errors are diamonds)
    committed = json.loads(out.read_text())["prompts"][0]["steps"][1]["committed"][0]["text"].strip()
    assert committed and committed in dom and "[MASK]" in dom  # the target's and the inputs' labels
    assert (ARTIFACTS / "circuit_tracer_viewer.png").stat().st_size > 10_000
