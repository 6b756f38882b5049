"""The step graphs as circuit-tracer's frontend reads them: validated by its own pydantic models."""
import json

import torch

from interp.explanations.graph import build_graph, prune
from interp.explanations.graph_export import METADATA_FILE, cantor, graph_json, write_graph
from tests.helpers import circuit_tracer_module
from tests.test_graph import POSITIONS, TARGETS, setup  # noqa: F401  (the fixture)


def export(setup, slug="p0_step001"):  # noqa: F811
    model, tcs, tokens = setup
    g, _ = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    pr = prune(g, 0.95, 0.99)
    names = {i: f"tok{i}" for i in range(64)}
    text = lambda ids: "".join(names[i] for i in ids)  # noqa: E731
    data = graph_json(g, pr, slug, "run/state_step000400.pt", [text([t]) for t in tokens.tolist()], text,
                      lambda layer, f: f"feature {f} of layer {layer}", [0.5, 0.25, 0.125])
    return g, pr, data


def test_graph_json_validates_against_circuit_tracer(setup, tmp_path):  # noqa: F811
    models = circuit_tracer_module("frontend/graph_models.py")
    g, pr, data = export(setup)
    path = write_graph(tmp_path, data, 0.95)
    loaded = json.loads(path.read_text())
    parsed = models.Model(**loaded)  # raises on any missing or mistyped field
    assert len(parsed.nodes) == len(loaded["nodes"]) and parsed.links
    assert models.Metadata(**json.loads((tmp_path / METADATA_FILE).read_text())["graphs"][0]).slug == "p0_step001"
    ids = [n.node_id for n in parsed.nodes]
    assert len(set(ids)) == len(ids)  # unique, error nodes included
    assert all(link["source"] in ids and link["target"] in ids for link in loaded["links"])
    kinds = {n.feature_type for n in parsed.nodes}
    assert {"embedding", "logit"} <= kinds and "cross layer transcoder" in kinds
    logits = [n for n in parsed.nodes if n.feature_type == "logit"]
    assert len(logits) == 3 and all(n.is_target_logit and "(p=" in n.clerp for n in logits)
    assert sorted(n.ctx_idx for n in logits) == POSITIONS
    masks = [n for n in loaded["nodes"] if n.get("input_kind") == "mask"]
    assert {n["ctx_idx"] for n in masks} == {4, 5, 7}  # every input is kept, [MASK]s marked as such
    feats = [n for n in parsed.nodes if n.feature_type == "cross layer transcoder"]
    assert all(n.clerp.startswith("feature ") and n.activation > 0 for n in feats)
    # the links are the pruned graph's direct effects, every one of them
    weights = sorted(link["weight"] for link in loaded["links"])
    torch.testing.assert_close(torch.tensor(weights), g.adjacency[pr.edge_index()].sort().values)
    assert cantor(2, 5) == 33 and len({cantor(a, b) for a in range(30) for b in range(30)}) == 900
    # a second graph joins the index instead of replacing it
    write_graph(tmp_path, export(setup, "p0_step002")[2], 0.95)
    listed = json.loads((tmp_path / METADATA_FILE).read_text())["graphs"]
    assert [m["slug"] for m in listed] == ["p0_step001", "p0_step002"]
    assert torch.isfinite(torch.tensor([n.influence for n in parsed.nodes])).all()
