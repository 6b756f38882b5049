"""Stage 6's flags (generate_descriptions.py): `ExplainConfig`, from the flag groups of `experiment.flags`."""
from __future__ import annotations

from dataclasses import dataclass

from core import checks as c
from core.cli import arg
from experiment import RunFlags, SamplingFlags, ShapeFlags
from interp.explanations.interventions import parse_changes
from model.explainer import DType

INTERVENE = c.Kind("interventions", lambda flag, value: parse_changes(value) and None,
                   ("x", "0_0=1", "0_0_2", "0_-1_2=0", "0_0_2=nan", "0_0_2=inf", "0_0_2=1e400x"),
                   runs=("0_99999_3=0",))
IGNORED = ("batch_size", "quiet")  # generate.py's flags without a meaning here


@dataclass
class ExplainConfig(SamplingFlags, ShapeFlags, RunFlags):
    """Generate step by step and explain every step through the transcoder features of every layer."""

    explainer: str = arg("google/flan-t5-xxl", "whose feature descriptions to use and who writes the step "
                                               "descriptions and ratings; 'tokens': composed, no ratings", c.MODEL)
    features_per_layer: int = arg(10, "features cited per layer, step and direction (the largest total effects "
                                      "for and against the committed tokens)", c.count(1, 10_000))
    node_threshold: float = arg(0.8, "graph pruning: keep the nodes carrying this share of the influence", c.fraction())
    edge_threshold: float = arg(0.98, "graph pruning: keep the edges carrying this share of the influence",
                                c.fraction())
    faithfulness_features: int = arg(10, "the top cited features (pushing for the tokens) ablated together for the "
                                         "explanation's score", c.count(1, 10_000))
    random_draws: int = arg(20, "random citations (as many per layer, active at the step) scored the same way: the "
                                "measured chance level", c.count(1, 10_000))
    graph_batch_size: int = arg(256, "graph rows (feature inputs) computed per batched backward pass",
                                c.count(1, 65_536))
    intervene: str = arg("", "at every step also set these features, e.g. '1_329_9=0,0_44_3=2x' (layer_feature_"
                             "position as in the graph's node ids = an activation, or Nx for N times the current)",
                         INTERVENE)
    max_new_tokens: int = arg(40, "longest LLM-written description", c.count(1, 4096))
    dtype: DType = arg("auto", "explainer weights: auto, bfloat16, float32, float16")
    load_in_8bit: bool = arg(False, "load the explainer in 8 bits (CUDA)")
    trust_remote_code: bool = arg(False, "allow model repositories to run their own code")
    output: str = arg("", "write the explanations here (default: explanations/<stamp>/explanations.json in the run)",
                      c.OUT_FILE)
