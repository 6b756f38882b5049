"""Stage 5's flags (get_activation_descriptions.py): `DescriptionsConfig`, from the flag groups of
`experiment.flags`, and the scorers it may name."""
from __future__ import annotations

from dataclasses import dataclass

from core import checks as c
from core.cli import arg
from experiment import LayersFlag, RunFlags
from model.explainer import DType

SCORER_NAMES = ("detection", "fuzzing", "token_match", "simulation")
SCORERS = c.choices("scorers", SCORER_NAMES)
IGNORED = ("train_seq_len", "train_steps", "grad_acc_steps", "num_layers", "num_heads", "model_dim", "save_model",
           "val_loss_every", "save_every")


@dataclass
class DescriptionsConfig(LayersFlag, RunFlags):
    """Describe every live feature with an LLM (or the `tokens` baseline) and score each description."""

    explainer: str = arg("google/flan-t5-xxl", "a Hugging Face model id or local folder (seq2seq or causal), "
                                               "or 'tokens' (the model-free baseline)", c.MODEL)
    judge: str = arg("", "the model that scores (default: the explainer's model; none for 'tokens')", c.OPTIONAL_MODEL)
    scorers: str = arg("detection,fuzzing,token_match,simulation",
                       "comma-separated scorers: detection, fuzzing, simulation (the judge predicts every token's "
                       "activation) and token_match (the model-free keyword correlation over the visible words; "
                       "not a simulation)", SCORERS)
    n_examples: int = arg(10, "explain-half contexts shown per feature (fewer if the prompt does not fit)",
                         c.count(1, 1000))
    n_score: int = arg(10, "held-out contexts scored per feature: this many activating and as many non-activating",
                      c.count(1, 1000))
    n_simulate: int = arg(5, "simulation: held-out windows of each kind (activating, non-activating) whose every "
                             "token the judge predicts (all of a window's tokens in one pass)", c.count(1, 1000))
    max_new_tokens: int = arg(30, "longest description, in tokens", c.count(1, 4096))
    batch_size: int = arg(32, "prompts per forward pass", c.count(1, 65_536))
    dtype: DType = arg("auto", "explainer weights: auto (bf16 on a GPU with native bf16, else fp32), bfloat16, "
                               "float32, float16")
    load_in_8bit: bool = arg(False, "load the explainer in 8 bits (bitsandbytes, CUDA)")
    trust_remote_code: bool = arg(False, "allow model repositories to run their own code")
    features: str = arg("", "comma-separated feature indices (default: every live feature)", c.INDICES)
    max_features_per_layer: int = arg(0, "describe at most this many live features per layer (0: all)", c.COUNT_OR_ZERO)
    seed: int = arg(0, "seed of the retry sampling and of the fuzzing marks", c.SEED)
    overwrite: bool = arg(False, "start this explainer's descriptions over")
