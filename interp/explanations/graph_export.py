"""A step's pruned attribution graph as JSON in the schema of circuit-tracer's frontend
(`circuit_tracer/frontend/graph_models.py`: metadata, qParams, nodes, links), and the
graph-metadata.json index its viewer lists graphs from. Validated against circuit-tracer's own
pydantic models in the tests.

Node ids follow circuit-tracer's (`{layer}_{feature}_{pos}` for features, `E_{token}_{pos}` for inputs,
`{num_layers + 1}_{token}_{pos}` for targets) except error terms, `err_{layer}_{pos}`, which in its
scheme (`0_{layer}_{pos}`) could collide with a layer-0 feature. A feature's `feature` number is the
Cantor pairing of (layer, feature), unique across layers; its `clerp` is the stage-5 description.
A [MASK] input is an `embedding` node whose prompt token reads "[MASK]" (and `input_kind: "mask"`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core.files import write_json_atomic
from interp.explanations.graph import ERROR, FEATURE, MASK, TARGET, Graph, Pruned

METADATA_FILE = "graph-metadata.json"


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def cumulative_influence(influence: torch.Tensor) -> torch.Tensor:
    """Each node's rank as the share of all influence held by it and the nodes above it (the viewer's
    pruning slider reads this)."""
    order = influence.argsort(descending=True)
    out = torch.empty_like(influence)
    out[order] = influence[order].cumsum(0) / influence.sum().clamp_min(1e-30)
    return out


def graph_json(g: Graph, pr: Pruned, slug: str, scan: str, prompt_tokens: list[str], text, describe,
               probs: list[float]) -> dict:
    """`text(ids)` decodes token ids; `describe(layer, feature)` gives a feature's description or ''."""
    ranks = cumulative_influence(pr.influence).tolist()
    keep = pr.node_mask.nonzero()[:, 0].tolist()
    ids, nodes = {}, []
    for i in keep:
        kind = g.kind(i)
        layer, pos = g.where(i)
        node = {"ctx_idx": pos, "influence": ranks[i], "reverse_ctx_idx": 0, "run_idx": 0, "token_prob": 0.0,
                "is_target_logit": False, "clerp": "", "activation": None}
        if kind == FEATURE:
            layer, _, feature = g.feature_nodes[i].tolist()
            nid = f"{layer}_{feature}_{pos}"
            node.update(feature=cantor(layer, feature), layer=str(layer), feature_type="cross layer transcoder",
                        jsNodeId=f"{layer}_{feature}-0", clerp=describe(layer, feature),
                        activation=float(g.activations[i]))
        elif kind == ERROR:
            nid = f"err_{layer}_{pos}"
            node.update(feature=-1, layer=str(layer), feature_type="mlp reconstruction error",
                        jsNodeId=f"{layer}_{pos}-0")
        elif kind == TARGET:
            t = i - g.target_start
            token = g.targets[t]
            nid = f"{g.num_layers + 1}_{token}_{pos}"
            node.update(feature=token, layer=str(g.num_layers + 1), feature_type="logit", is_target_logit=True,
                        token_prob=probs[t], jsNodeId=f"L_{token}-{pos}",
                        clerp=f'Output "{text([token])}" (p={probs[t]:.3f})')
        else:
            token = g.tokens[pos]
            nid = f"E_{token}_{pos}"
            node.update(feature=pos, layer="E", feature_type="embedding", jsNodeId=f"E_{token}-{pos}",
                        input_kind="mask" if kind == MASK else "token")
        node["node_id"] = nid
        ids[i] = nid
        nodes.append(node)
    dst, src = pr.edge_index()
    weights = g.adjacency[dst, src].tolist()
    links = [{"source": ids[s], "target": ids[d], "weight": w}
             for d, s, w in zip(dst.tolist(), src.tolist(), weights) if s in ids and d in ids]
    linked = {x for link in links for x in (link["source"], link["target"])}
    nodes = [n for n in nodes if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    meta = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": prompt_tokens,
            "prompt": "".join(prompt_tokens), "node_threshold": None, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


def write_graph(folder: Path, graph: dict, node_threshold: float) -> Path:
    """Write `<slug>.json` and add it to the folder's graph-metadata.json (what the viewer lists)."""
    folder.mkdir(parents=True, exist_ok=True)
    graph["metadata"]["node_threshold"] = node_threshold
    path = folder / f"{graph['metadata']['slug']}.json"
    write_json_atomic(path, graph)
    index = folder / METADATA_FILE
    listed = json.loads(index.read_text())["graphs"] if index.exists() else []
    listed = [m for m in listed if m["slug"] != graph["metadata"]["slug"]] + [graph["metadata"]]
    write_json_atomic(index, {"graphs": listed})
    return path
