"""Stage 2: step-by-step diffusion sampling from a trained checkpoint.

    python generate.py --train_folder experiments/X --checkpoint_name state_step020000.pt --cuda 1 \\
        --num_layers 12 --num_heads 6 --model_dim 384 --max_seq_len 4_096
    python generate.py --train_folder experiments/X --checkpoint_name latest --device cpu \\
        --prompt "The capital of France is" --gen_length 8 --num_generate_steps 8 --output gen.json
    python generate.py --train_folder experiments/Y_llada --cuda 0 --max_seq_len 4_096 \
        --prompt "The capital of France is"

A run made from a released model (python -m experiment.init_base) samples with that model's own sampler
(--sampler auto). A Base model continues the prompt as plain text; an Instruct model expects its chat
template, written out in the prompt (this script applies none).
"""
from __future__ import annotations

from interp.generation import MASK_SHOWN, GenerateConfig, command, main, print_record, run_generation

__all__ = ["MASK_SHOWN", "GenerateConfig", "command", "main", "print_record", "run_generation"]

if __name__ == "__main__":
    command()
