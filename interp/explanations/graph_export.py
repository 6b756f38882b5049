"""A step's pruned attribution graph as JSON in the schema of circuit-tracer's frontend
(`circuit_tracer/frontend/graph_models.py`: metadata, qParams, nodes, links), and the
graph-metadata.json index its viewer lists graphs from. Validated against circuit-tracer's own
pydantic models in the tests.

Node ids follow circuit-tracer's (`{layer}_{feature}_{pos}` for features, `E_{token}_{pos}` for inputs,
`{num_layers + 1}_{token}_{pos}` for targets) except error terms, `err_{layer}_{pos}`, which in its
scheme (`0_{layer}_{pos}`) could collide with a layer-0 feature. A feature's `feature` number is the
Cantor pairing of (layer, feature), unique across layers; its `clerp` is the stage-5 description.
A [MASK] input is an `embedding` node whose prompt token reads "[MASK]" (and `input_kind: "mask"`).

Beside the graphs, `features/{feature}.json` holds each cited feature in the schema of circuit-tracer's
feature files (`frontend/feature_models.py`), built from the top-k scan, and every graph's `scan` is
"./data/features": the viewer then loads a clicked feature's examples from there, offline.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core.files import write_json_atomic
from experiment.paths import CONTEXTS_FILE, FEATURES_FILE
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


# The feature files beside the graphs. The viewer fetches a feature's examples from `{scan}/{feature}.json`
# when `scan` starts with "./" (any other scan is looked up on remote hosts), and serves ./data/ from the
# graphs folder (its local server, `circuit_tracer.frontend.local_server.serve(data_dir=graphs)`).
FEATURES_SUBDIR = "features"
FEATURE_SCAN = f"./data/{FEATURES_SUBDIR}"
EXAMPLE_GROUPS = (("top", "Top activations"), ("quantile", "Activations across the range"),
                  ("random", "Non-activating contexts"))


def cited_features(graph: dict) -> set[tuple[int, int]]:
    """The (layer, feature) of every transcoder-feature node of a graph JSON."""
    return {(int(n["node_id"].split("_")[0]), int(n["node_id"].split("_")[1])) for n in graph["nodes"]
            if n["feature_type"] == "cross layer transcoder"}


def example_json(e: dict) -> dict:
    """One top-k example as the viewer's Example: tokens the model could not see ([MASK]) read «token»."""
    hidden = set(e.get("masked_at", ()))
    tokens = [f"«{p}»" if i in hidden else p for i, p in enumerate(e["pieces"])]
    return {"tokens": tokens, "tokens_acts_list": e["acts"], "train_token_ind": e["center"],
            "is_repeated_datapoint": False}


def histogram_quantiles(counts: list[int], top: float) -> list[float]:
    """The 1st..100th percentile of a feature's non-zero activations, each read as the upper edge of the
    histogram bin (0..top, equal widths) where the cumulative count reaches it."""
    total, width, out, cum, b = sum(counts), top / max(1, len(counts)), [], 0, 0
    if not total:
        return []
    for q in range(1, 101):
        while b < len(counts) and cum + counts[b] < total * q / 100:
            cum += counts[b]
            b += 1
        out.append(round(width * min(b + 1, len(counts)), 5))
    return out


def feature_json(layer: int, feature: int, stats: dict | None, contexts: dict | None, transcoder_id: str) -> dict:
    """One feature in the schema of circuit-tracer's feature files (`frontend/feature_models.py`), from the
    top-k scan: its examples, promoted and suppressed tokens, activation histogram (over firing tokens) and
    firing frequency. Without a scan of its layer it has no examples (the viewer then shows an empty list)."""
    quantiles = [{"quantile_name": name, "examples": [example_json(e) for e in contexts[c]]}
                 for c, name in EXAMPLE_GROUPS if contexts and contexts.get(c)]
    top = float(stats["histogram"]["bin_edges_max"]) if stats else 0.0
    counts = list(stats["histogram"]["counts"]) if stats else []
    return {"transcoder_id": transcoder_id, "index": feature, "layer": layer, "examples_quantiles": quantiles,
            "top_logits": [t for t, _ in stats.get("promotes", [])] if stats else [],
            "bottom_logits": [t for t, _ in stats.get("suppresses", [])] if stats else [],
            "act_min": 0.0, "act_max": top if top > 0 else 1.0, "quantile_values": histogram_quantiles(counts, top),
            "histogram": [float(x) for x in counts],
            "activation_frequency": float(stats["frequency"]) if stats else 0.0}


def _records(path: Path, wanted: set[int]) -> dict[int, dict]:
    """The lines of a top-k JSON-lines file whose `feature` is wanted, read one line at a time (a layer's
    contexts.jsonl can be large)."""
    out: dict[int, dict] = {}
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            head = json.loads(line[:line.index(",")] + "}") if line.startswith('{"feature": ') else None
            if head is not None and head["feature"] not in wanted:
                continue  # skip parsing a long line of someone else's examples
            record = json.loads(line)
            if record["feature"] in wanted:
                out[record["feature"]] = record
    return out


def write_feature_files(folder: Path, todo: set[tuple[int, int]], layer_dir, transcoder_id) -> list[Path]:
    """`folder/features/{cantor(layer, feature)}.json` for every (layer, feature) of `todo` (replacing an earlier
    run's). `layer_dir(layer)` is the top-k scan's folder of a layer, `transcoder_id(layer)` a name for its
    transcoder."""
    out_dir = folder / FEATURES_SUBDIR
    written = []
    for layer in sorted({la for la, _ in todo}):
        wanted = {f for la, f in todo if la == layer}
        stats = _records(layer_dir(layer) / FEATURES_FILE, wanted)
        contexts = _records(layer_dir(layer) / CONTEXTS_FILE, wanted)
        for f in sorted(wanted):
            path = out_dir / f"{cantor(layer, f)}.json"
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, feature_json(layer, f, stats.get(f), contexts.get(f), transcoder_id(layer)))
            written.append(path)
    return written
