"""circuit-tracer's own viewer renders one of stage 6's graphs in headless Chromium, without console errors.

The viewer's files come from circuit-tracer 0.5.0 (installed without dependencies by `make venv`). The
scripts its index.html loads from public CDNs (d3 with d3-jetpack, dagre, pako) come from the npm
registry instead (`make venv` bundles d3 and the jetpack methods the viewer calls: tests/viewer/); its
dev-only live-reload and .npy scripts are left out, since the tests run offline. The graph files are
served as its local server serves them (/data/ and /graph_data/ both map to the graphs folder), so the
graphs' scan "./data/features" has the viewer load a clicked feature's examples from the feature files stage 6
writes beside them. Screenshots are saved in tests/artifacts/."""
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


@pytest.fixture(scope="module")
def explained(tiny_descriptions, tiny_run, tmp_path_factory) -> Path:
    """Stage 6 on one prompt: its JSON (the step graphs and feature files in e_graphs/ beside it)."""
    return explain(ExplainConfig(train_folder=str(tiny_run), explainer="tokens", device="cpu",
                                 prompt=["The capital of France is"], gen_length=3, num_generate_steps=3,
                                 output=str(tmp_path_factory.mktemp("viewer") / "e.json")))


def view(site: Path, query: str, tmp_path: Path, screenshot: str) -> tuple[str, str]:
    """(rendered DOM, browser log) of the viewer's index.html?query, served from `site` on a local port."""
    from tests.test_browser import browse_url

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return browse_url(f"http://127.0.0.1:{server.server_address[1]}/index.html?{query}", tmp_path, screenshot)
    finally:
        server.shutdown()


def test_circuit_tracer_viewer_renders_a_step_graph(explained, tmp_path):
    out = explained
    site = viewer_site(out.parent / "e_graphs", tmp_path / "site")
    dom, log = view(site, "slug=p0_step002", tmp_path, "circuit_tracer_viewer.png")
    assert not console_errors(log), console_errors(log)
    assert dom.count("<option") == 3 and 'value="p0_step002"' in dom  # the graph picker lists the step graphs
    graph = json.loads((out.parent / "e_graphs" / "p0_step002.json").read_text())
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert dom.count("<circle") >= min(3, len(features))  # feature nodes drawn (errors are diamonds)
    committed = json.loads(out.read_text())["prompts"][0]["steps"][1]["committed"][0]["text"].strip()
    assert committed and committed in dom and "[MASK]" in dom  # the target's and the inputs' labels
    assert (ARTIFACTS / "circuit_tracer_viewer.png").stat().st_size > 10_000


def test_circuit_tracer_viewer_shows_a_clicked_features_examples(explained, tiny_topk, tmp_path):
    """A feature opened in the viewer (clickedId, as a click sets it) shows its top-k examples and promoted
    tokens from the feature file stage 6 wrote, fetched from the served folder: nothing remote, no error."""
    from interp.contexts.store import read_jsonl
    from interp.explanations.graph_export import FEATURE_SCAN, cantor
    from tests.helpers import circuit_tracer_module

    graphs = explained.parent / "e_graphs"
    graph = json.loads((graphs / "p0_step002.json").read_text())
    assert graph["metadata"]["scan"] == FEATURE_SCAN == "./data/features"
    features = sorted((n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"),
                      key=lambda n: n["influence"])  # the most influential first: the viewer's pruning keeps it
    cited = {n["feature"] for g in graphs.glob("p0_step*.json") for n in json.loads(g.read_text())["nodes"]
             if n["feature_type"] == "cross layer transcoder"}
    assert features and sorted(p.stem for p in (graphs / "features").iterdir()) == sorted(map(str, cited))
    feature_model = circuit_tracer_module("frontend/feature_models.py").Model
    for number in cited:  # each file validates against circuit-tracer's own pydantic model of a feature
        feature_model.model_validate_json((graphs / "features" / f"{number}.json").read_text())
    node = features[0]
    layer, index = map(int, node["node_id"].split("_")[:2])
    assert node["feature"] == cantor(layer, index)
    data = json.loads((graphs / "features" / f"{node['feature']}.json").read_text())
    record = next(r for r in read_jsonl(tiny_topk / f"layer_{layer:02d}" / "contexts.jsonl") if r["feature"] == index)
    top = data["examples_quantiles"][0]
    assert top["quantile_name"] == "Top activations" and len(top["examples"]) == len(record["top"]) > 0
    best = record["top"][0]
    assert top["examples"][0]["tokens_acts_list"] == best["acts"]
    assert top["examples"][0]["tokens_acts_list"][top["examples"][0]["train_token_ind"]] == best["activation"]
    assert data["index"] == index and data["top_logits"] and data["act_max"] >= best["activation"] - 1e-4

    site = viewer_site(graphs, tmp_path / "site")
    dom, log = view(site, f"slug=p0_step002&clickedId={node['node_id']}", tmp_path,
                    "circuit_tracer_viewer_feature.png")
    assert not console_errors(log), console_errors(log)
    assert "failed to load" not in dom and "Failed to fetch" not in log
    panel = dom[dom.index('class="feature-example-list"'):]
    assert panel.count('class="ctx-container"') >= len(top["examples"]) and "Top activations" in panel
    assert "Token Predictions" in dom and f"L{layer}/{index}" in dom  # the logits row and the feature's title
    # the strongest example's tokens are drawn (the viewer merges neighbours of equal activation into one span)
    assert all(t in dom for t in top["examples"][0]["tokens"] if t.strip() and "<" not in t and "&" not in t)
