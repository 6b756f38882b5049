"""bench/gpu_stages.py: the six stage command lines it runs on a card are the reference lines, and each parses."""
from __future__ import annotations

import pytest
import torch

from bench.gpu_stages import stage_lines
from core.cli import parse_config
from interp.contexts.config import IGNORED as TOPK_IGNORED, TopKConfig
from interp.descriptions.config import IGNORED as DESCRIBE_IGNORED, DescriptionsConfig
from interp.explanations.config import IGNORED as EXPLAIN_IGNORED, ExplainConfig
from interp.generation import GenerateConfig
from training.config import TrainConfig, TranscoderTrainConfig

CONFIGS = {"train_diffusion.py": (TrainConfig, ()), "generate.py": (GenerateConfig, ()),
           "train_transcoders.py": (TranscoderTrainConfig, ()), "get_topk_activations.py": (TopKConfig, TOPK_IGNORED),
           "get_activation_descriptions.py": (DescriptionsConfig, DESCRIBE_IGNORED),
           "generate_descriptions.py": (ExplainConfig, EXPLAIN_IGNORED)}


@pytest.mark.parametrize("tiny", [False, True])
def test_each_stage_line_parses_on_a_one_gpu_card(tmp_path, monkeypatch, tiny):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = tmp_path / "experiments" / "X"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    explainer = tmp_path / "explainer"
    explainer.mkdir()
    (explainer / "config.json").write_text("{}")
    lines = stage_lines(tmp_path, tokenizer, explainer, 30, 2, tiny, cuda=True, run_folder=str(run),
                        checkpoint="state_step000030.pt")
    scripts = list(CONFIGS)
    assert [script for script, _ in lines] == scripts[:5] + scripts[4:]  # stage 5 twice: the LLM, then `tokens`
    for script, flags in lines:
        cls, ignored = CONFIGS[script]
        cfg = parse_config(cls, flags, ignored=ignored)
        assert cfg.cuda == 0
        if hasattr(cfg, "num_layers"):  # (stage 5 reads the shape from the run and ignores these flags)
            assert (cfg.num_layers, cfg.model_dim) == ((2, 64) if tiny else (12, 384))
        if hasattr(cfg, "grad_acc_steps"):
            assert cfg.grad_acc_steps == 8 and cfg.train_seq_len == (256 if tiny else 4096)
    train = parse_config(TrainConfig, lines[0][1])
    assert (train.batch_size, train.train_steps, train.forward_batch_size) == (1, 30, 0)  # the stage's defaults
