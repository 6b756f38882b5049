"""generate_descriptions.py's work: generate step by step, attribute every committed token to the
transcoder features of every layer, describe each step, score it, print, write JSON and an HTML report."""
from __future__ import annotations

import datetime
from pathlib import Path

import torch

from core.files import UserError, write_json_atomic
from experiment import StagePaths, load_run, load_transcoders, resolve_device, transcoder_layers
from experiment.paths import EXPLANATIONS_FILE, REPORT_FILE
from interp.attribution import LayerAttribution, attribute_tokens
from interp.descriptions_stage import TOKENS, read_records
from interp.explain_report import write_report
from interp.explain_step import (
    INTERPRETATION_RUBRIC,
    OUTPUT_RUBRIC,
    compose_layer,
    compose_total,
    grounded,
    layer_prompt,
    parse_rating,
    top_features,
    total_prompt,
)
from model.explainer import Explainer
from model.precision import autocast
from model.sampler import generate

UNDESCRIBED = "(no description)"


def load_descriptions(path: Path, tag: str) -> dict[tuple[int, int], dict]:
    records = [r for r in read_records(path) if r["explainer"] == tag and r["description"]]
    if not records:
        raise UserError(f"no descriptions by {tag!r} in {path}: run get_activation_descriptions.py --explainer "
                        f"{tag} for this checkpoint first")
    return {(r["layer"], r["feature"]): r for r in records}


def cite(layer: int, feats: list[tuple[int, float, float]], descriptions: dict) -> list[dict]:
    push = sum(v for _, v, _ in feats) or 1.0
    out = []
    for f, v, act in feats:
        rec = descriptions.get((layer, f))
        out.append({"feature": f, "attribution": round(v, 5), "activation": round(act, 4), "share": v / push,
                    "description": rec["description"] if rec else UNDESCRIBED,
                    "detection_auroc": ((rec or {}).get("scores", {}).get("detection") or {}).get("auroc")})
    return out


def explain_step(model, transcoders, tok, row: list[int], positions: list[int], targets: list[int], probs: list[float],
                 descriptions: dict, explainer, cfg, prompt_text: str) -> dict:
    """Everything about one denoising step; `row` is the model's input before the step."""
    layers = sorted(transcoders)
    committed = tok.decode(targets)
    if not positions:
        return {"committed": [], "per_layer_description": [], "total_description": "no token committed at this step",
                "output_score": None, "interpretation_score": None, "grounded": None, "tokens": []}
    x = torch.tensor([row], device=next(model.parameters()).device)
    atts = attribute_tokens(model, transcoders, x, positions, targets)
    summed = {layer: sum_attributions([a[layer] for a in atts]) for layer in layers}
    cited = {layer: cite(layer, top_features(summed[layer], cfg.features_per_layer), descriptions) for layer in layers}
    pushes = [sum(max(0.0, c["attribution"]) for c in cited[layer]) for layer in layers]
    context = tok.decode(row, mask_text=" _").replace(tok.decode([tok.bos_id]), "").strip()
    result = {"committed": [{"position": p, "token": t, "text": tok.decode([t]), "prob": round(pr, 4)}
                            for p, t, pr in zip(positions, targets, probs)]}
    if explainer is None:
        layer_texts = [compose_layer(cited[layer]) for layer in layers]
        total, out_score, interp_score, raws = compose_total(layer_texts, pushes, committed), None, None, None
    else:
        gen = lambda ps, n: explainer.generate(ps, n)  # noqa: E731
        layer_texts = [t.strip().splitlines()[0] if t.strip() else "(empty answer)" for t in
                       gen([layer_prompt(layer, committed, cited[layer]) for layer in layers], cfg.max_new_tokens)]
        total_raw = gen([total_prompt(committed, context, layer_texts)], cfg.max_new_tokens)[0]
        total = total_raw.strip().splitlines()[0] if total_raw.strip() else "(empty answer)"
        text = f"{prompt_text}{tok.decode(row[len(row) - cfg.gen_length:], mask_text=' _')}"
        rating_raw = gen([OUTPUT_RUBRIC.format(text=text),
                          INTERPRETATION_RUBRIC.format(text=committed, explanation=total)], 4)
        out_score, interp_score = parse_rating(rating_raw[0]), parse_rating(rating_raw[1])
        raws = {"output_score": rating_raw[0], "interpretation_score": rating_raw[1], "total_description": total_raw}
    result.update({
        "per_layer_description": layer_texts, "total_description": total, "output_score": out_score,
        "interpretation_score": interp_score, "raw_ratings": raws,
        "grounded": grounded(atts, cited, descriptions, probs),
        "layers": {str(layer): {"features": cited[layer], "error": round(summed[layer].error, 5),
                                "bias": round(summed[layer].other, 5)} for layer in layers},
        "tokens": [{"position": p, "text": tok.decode([t]), "layers": {
            str(layer): cite(layer, top_features(a[layer], cfg.features_per_layer), descriptions) for layer in layers}}
            for p, t, a in zip(positions, targets, atts)],
    })
    return result


def sum_attributions(parts):
    return LayerAttribution(sum(p.features for p in parts), torch.stack([p.activations for p in parts]).amax(0),
                            sum(p.error for p in parts), sum(p.other for p in parts))


def print_step(state_text: str, prompt: str, step: int, s: dict) -> None:
    def show(v, what):
        return str(v) if v is not None else f"unavailable ({what})"

    print(f"iteration: {step}")
    print(f"        continuation={prompt}{state_text}")
    print(f"        per layer description={s['per_layer_description']}")
    print(f"        total description={s['total_description']}")
    why = "no LLM explainer" if s.get("raw_ratings") is None else "unparseable answer"
    print(f"        models output score={show(s['output_score'], why)}")
    print(f"        models mechanistic interpretability score={show(s['interpretation_score'], why)}")
    g = s["grounded"]
    if g:
        auroc = "n/a" if g["mean_detection_auroc_of_cited"] is None else f"{g['mean_detection_auroc_of_cited']:.2f}"
        print(f"          attribution carried by described features {g['described_feature_share']:.0%}, undescribed "
              f"{g['undescribed_feature_share']:.0%}, error terms {g['error_share']:.0%}, biases {g['bias_share']:.0%}")
        print(f"          cited features' mean detection AUROC {auroc}; committed token probabilities "
              f"{g['committed_token_probs']}")


def run_explanations(cfg, explainer_factory=None) -> Path:
    device = resolve_device(cfg.cuda, cfg.device)
    config, model, tok, ckpt = load_run(cfg.train_folder, cfg.checkpoint_name, device, cfg.shape_flags())
    folder = Path(cfg.train_folder)
    paths = StagePaths(folder, ckpt.name)
    layers = transcoder_layers(paths.transcoders, "all", model.cfg.num_layers)
    is_path = cfg.explainer.startswith((".", "/", "~"))
    tag = str(Path(cfg.explainer).expanduser()) if is_path and cfg.explainer != TOKENS else cfg.explainer
    descriptions = load_descriptions(paths.records, tag)
    transcoders = load_transcoders(paths.transcoders, layers, device, model.cfg.model_dim)
    make = explainer_factory or (lambda name: Explainer(name, device, cfg.dtype, cfg.load_in_8bit,
                                                        cfg.trust_remote_code))
    explainer = None if cfg.explainer == TOKENS else make(cfg.explainer)
    prompts = cfg.prompts()
    cfg.check_lengths(prompts, tok, config["train"]["train_seq_len"])
    results = []
    for prompt in prompts:
        with autocast(device):
            out = generate(model, [tok.encode(prompt)], cfg.sampler())
        prefix = out.tokens[0, :out.prompt_width].tolist()
        states = [s[0].tolist() for s in out.states]
        print(f"input: {prompt}")
        steps = []
        for step in range(1, len(states)):
            new = [i for i, c in enumerate(out.committed_at[0].tolist()) if c == step]
            positions = [out.prompt_width + i for i in new]
            targets = [states[step][i] for i in new]
            probs = [float(out.probs[0, i]) for i in new]
            s = explain_step(model, transcoders, tok, prefix + states[step - 1], positions, targets, probs,
                             descriptions, explainer, cfg, prompt)
            s["step"] = step
            s["state_ids"] = states[step]
            s["state_text"] = tok.decode(states[step], mask_text=" _")
            steps.append(s)
            print_step(s["state_text"], prompt, step, s)
        completion = tok.decode(states[-1])
        print(f"final: {prompt}{completion}\n")
        results.append({"prompt": prompt, "completion": completion, "steps": steps})
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    json_path = Path(cfg.output) if cfg.output else paths.explanations(stamp) / EXPLANATIONS_FILE
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, {"checkpoint": str(ckpt), "explainer": tag, "layers": layers,
                                  "sampler": cfg.sampler().__dict__, "features_per_layer": cfg.features_per_layer,
                                  "prompts": results})
    report = write_report(json_path.with_name(json_path.stem + "_report.html" if cfg.output else REPORT_FILE),
                          results, tag, str(ckpt))
    print(f"explanations: {json_path}\nreport: {report}")
    return json_path
