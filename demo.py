"""The whole pipeline on the built-in synthetic corpus at a tiny size, on the CPU (`make demo`).

The stages run in order as they exist: data preparation, diffusion training, generation, transcoders,
top-k activations, feature descriptions (with the model-free `tokens` explainer: no LLM is needed),
and the step-by-step explanation of a few prompts.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np

from core.files import read_jsonl
from data.loader import ShardLoader
from data.prepare import PrepareConfig, prepare_dataset
from data.shards import read_shard
from experiment import load_run, read_metrics
from experiment.paths import LOSS_PLOT, PAGE_FILE, RECORDS_FILE, REPORT_FILE, TRANSCODER_PLOT, TRANSCODER_SUMMARY_FILE
from generate import GenerateConfig, main as generate_main
from generate_descriptions import ExplainConfig, main as explain
from get_activation_descriptions import DescriptionsConfig, main as describe_features
from get_topk_activations import TopKConfig, main as get_topk
from interp.ground_truth.benchmark import GroundTruthConfig, run_ground_truth
from model.fact_eval import fact_accuracy
from model.precision import describe
from train_diffusion import TrainConfig, main as train
from train_transcoders import TranscoderTrainConfig, main as train_transcoders

DEMO_DATA: dict[str, Any] = dict(dataset="synthetic", synthetic_mb=4.0)
DEMO_MODEL: dict[str, Any] = dict(
    num_layers=3, num_heads=3, model_dim=96, train_seq_len=256, val_seq_len=256, batch_size=8, grad_acc_steps=1,
    train_steps=450, val_loss_every=150, val_tokens=16_384, save_every=225, log_every=50, head_lr=0.02, device="cpu",
    model_name="demo")
DEMO_TRANSCODERS: dict[str, Any] = dict(
    device="cpu", train_seq_len=256, batch_size=8, grad_acc_steps=1, train_steps=250, expansion_factor=8, k=8,
    val_loss_every=0, val_tokens=8_192, save_every=125, dead_tokens=100_000, log_every=50)
DEMO_TOPK: dict[str, Any] = dict(device="cpu", train_seq_len=256, batch_size=8, scan_batches=16, n_top=20,
                                 n_quantile=10, n_random=10)
DEMO_PROMPTS = ["The capital of France is", "The month after March is", "Scientists classify the"]


def show_data(prepared) -> None:
    folder, tok, meta = prepared
    concepts = {c["id"]: c for c in json.loads((folder / meta["concepts"]).read_text())}
    batch = ShardLoader(folder, "train", seq_len=48, batch_size=1, seed=0).batch(0)
    print("\none training window (48 tokens), concept-labelled tokens in [brackets]:")
    parts = []
    assert batch.labels is not None  # the synthetic corpus labels every token
    for tid, lab in zip(batch.tokens[0].tolist(), batch.labels[0].tolist()):
        piece = tok.decode([tid]).replace(tok.decode([tok.bos_id]), "<BOS>")
        lead = piece[:len(piece) - len(piece.lstrip())]
        parts.append(f"{lead}[{piece.strip()}:{concepts[lab]['category']}]" if lab else piece)
    print("  " + "".join(parts))
    facts = read_jsonl(folder / meta["facts"])
    print(f"\n{len(facts)} fact prompts for completion tests, for example:")
    for f in (facts[0], facts[1], next(f for f in facts if f["phrasing"] == "heldout")):
        print(f"  [{f['phrasing']}] {f['prompt']!r} -> {f['answer']!r} (chance 1/{len(f['candidates'])})")


def unigram_entropy(prepared) -> float:
    """Nats per token of the best context-free predictor: the bar a model that uses context must beat."""
    folder, tok, meta = prepared
    tokens = np.concatenate([np.asarray(read_shard(folder / s["file"])) for s in meta["shards"][1:]])
    counts = np.bincount(tokens[tokens != tok.bos_id])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


LARGE: dict[str, dict[str, Any]] = {
    "model": dict(num_layers=6, num_heads=6, model_dim=192, batch_size=16, train_steps=1500, val_loss_every=500,
                  save_every=500, model_name="demo_large"),
    "transcoders": dict(expansion_factor=8, k=16, train_steps=600, val_loss_every=200, save_every=300),
    "topk": dict(scan_batches=60)}


class StageClock:
    """Wall time of each stage, printed at the end with the processor, so a user can compare machines."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self.name: str | None = None
        self.t0 = time.perf_counter()

    def __call__(self, header: str) -> None:
        self.stop()
        print(header)
        self.name, self.t0 = header.strip("= \n").split(" (")[0], time.perf_counter()

    def stop(self) -> None:
        if self.name is not None:
            self.times.append((self.name, time.perf_counter() - self.t0))
        self.name = None

    def report(self) -> None:
        self.stop()
        total = sum(t for _, t in self.times)
        print(f"\ntime per stage on {describe('cpu')}:")
        for name, t in self.times:
            print(f"  {t:6.1f} s  {name}")
        print(f"  {total:6.1f} s  in all")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--large", action="store_true", help="a larger CPU configuration (6 layers, d=192; ~20 minutes)")
    if p.parse_args().large:
        DEMO_MODEL.update(LARGE["model"])
        DEMO_TRANSCODERS.update(LARGE["transcoders"])
        DEMO_TOPK.update(LARGE["topk"])
    clock = StageClock()

    clock("== stage 0: data")
    prepared = prepare_dataset(PrepareConfig(**DEMO_DATA))
    show_data(prepared)

    clock("\n== stage 1: train_diffusion.py")
    run = train(TrainConfig(**DEMO_DATA, **DEMO_MODEL))
    assert run is not None  # one process: it has the run folder
    val = [r for r in read_metrics(run) if r["event"] == "val"]
    print(f"validation NELBO {val[0]['val_nelbo']:.3f} -> {val[-1]['val_nelbo']:.3f} nats/token "
          f"(untrained: ln V = {math.log(prepared.tokenizer.n_vocab):.3f}; unigram entropy of the corpus: "
          f"{unigram_entropy(prepared):.3f}); loss curve: {run / LOSS_PLOT}")

    clock("\n== stage 2: generate.py")
    generate_main(GenerateConfig(train_folder=str(run), device="cpu", prompt=DEMO_PROMPTS[:1], gen_length=8,
                                 num_generate_steps=8))
    generate_main(GenerateConfig(train_folder=str(run), device="cpu", prompt=DEMO_PROMPTS[1:], gen_length=16,
                                 num_generate_steps=16, quiet=True))
    show_fact_accuracy(run, prepared)

    clock("\n== stage 3: train_transcoders.py")
    out = train_transcoders(TranscoderTrainConfig(train_folder=str(run), **DEMO_TRANSCODERS))
    summary = json.loads((out / TRANSCODER_SUMMARY_FILE).read_text())
    print(f"base NELBO {summary['base_nelbo']:.3f}; with every MLP replaced by its transcoder "
          f"{summary['all_nelbo']:.3f}")
    for layer, m in summary["layers"].items():
        print(f"  layer {layer}: FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.1%}, "
              f"NELBO with this MLP replaced {m['spliced_nelbo']:.3f}")
    print(f"plots: {out / TRANSCODER_PLOT}")

    clock("\n== stage 4: get_topk_activations.py")
    topk = get_topk(TopKConfig(train_folder=str(run), **DEMO_TOPK))
    print(f"open the feature browser in a browser: {(topk / PAGE_FILE).resolve()}")

    clock("\n== stage 5: get_activation_descriptions.py (explainer: tokens)")
    desc = describe_features(DescriptionsConfig(train_folder=str(run), explainer="tokens", device="cpu"))
    first = read_jsonl(desc / RECORDS_FILE, appended=True)[0]
    print(f"for example, layer {first['layer']} feature {first['feature']}: {first['description']}")

    clock("\n== stage 6: generate_descriptions.py (explainer: tokens)")
    out = explain(ExplainConfig(train_folder=str(run), explainer="tokens", device="cpu", prompt=DEMO_PROMPTS[:2],
                                gen_length=4, num_generate_steps=4, features_per_layer=5))
    clock("\n== the ground-truth benchmark (python -m interp.ground_truth)")
    run_ground_truth(GroundTruthConfig(train_folder=str(run), device="cpu"))

    clock.report()
    print("\npages to open in a browser:")
    print(f"  feature browser:    {(topk / PAGE_FILE).resolve()}")
    print(f"  explanation report: {(out.parent / REPORT_FILE).resolve()}")


def show_fact_accuracy(run, prepared) -> None:
    _, model, tok, _ = load_run(run, "latest", "cpu")
    facts = read_jsonl(prepared.folder / prepared.meta["facts"])
    result = fact_accuracy(model, tok, facts)
    print("\nfact completion (greedy, one token per step); chance is the strongest of a uniform guess among the "
          "candidates, always the most common answer, and the model's completions scored against shuffled answers:")
    for name, part in result["by_phrasing"].items():
        print(f"  {name:8s} phrasing: {part['accuracy']:.1%} of {part['n']} facts (chance {part['chance']:.1%}: "
              f"uniform {part['chance_uniform']:.1%}, majority {part['chance_majority']:.1%}, "
              f"shuffled {part['chance_shuffled']:.1%}); mean over relations {part['macro_accuracy']:.1%} "
              f"(chance {part['macro_chance']:.1%})")
        stuck = [f"{r} {x['top_completion']!r} {x['top_completion_share']:.0%}" for r, x in part["by_relation"].items()
                 if x["top_completion_share"] >= 0.5]
        if stuck:
            print(f"    one answer to most facts of a relation: {', '.join(stuck)}")


if __name__ == "__main__":
    main()
