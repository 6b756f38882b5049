"""Stage 6: explain each generation step by step, layer by layer, with scores.

    python generate_descriptions.py --train_folder experiments/X --checkpoint_name state_step020000.pt --cuda 1 \\
        --num_layers 12 --num_heads 6 --model_dim 384 --max_seq_len 4_096
    python generate_descriptions.py --train_folder experiments/X --checkpoint_name latest --explainer tokens \\
        --device cpu --prompt "The capital of France is"

A run made from a released model (python -m experiment.init_base) generates with that model's own sampler;
LLaDA's classifier-free guidance (--cfg_scale) is refused: a graph explains one forward pass.

Needs the checkpoint's transcoders (train_transcoders.py) and the explainer's feature descriptions
(get_activation_descriptions.py). Writes experiments/X/explanations/<stamp>/explanations.json and report.html.
"""
from __future__ import annotations

from interp.explanations.command import command, main
from interp.explanations.config import IGNORED, INTERVENE, ExplainConfig

__all__ = ["IGNORED", "INTERVENE", "ExplainConfig", "command", "main"]

if __name__ == "__main__":
    command()
