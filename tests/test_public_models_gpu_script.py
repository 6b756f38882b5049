"""bench/public_models_gpu.py, the full-size check of the released models on a card, run on the CPU at tiny
shapes: every (model, part) row comes out with finite numbers; its full-size configs are the release's; the
suite runs it last, within its budget."""
from __future__ import annotations

import math
import re

import pytest
import torch

from bench.gpu_suite import BUDGET, HEADLINE, MIN_LIMIT, PUBLIC, SUITE, markdown_tables, time_left_limit
from bench.public_models_gpu import FULL, TINY, materialise, spread_layers, write_config
from model.public_models import public_config
from tests.helpers import run_cli
from tests.public_fixtures import DREAM_7B, LLADA_8B

ROW = re.compile(r"^public (llada|dream) (scan|transcoder|graph) \(T=(\d+)\): (\S+) s, peak memory "
                 r"(n/a \(CPU\)|(\S+) GiB)(, (\S+) tokens/s)?")


def test_the_tiny_dry_run_prints_every_row_with_finite_numbers():
    proc = run_cli(["bench/public_models_gpu.py", "--device", "cpu", "--tiny", "--graph_seq_len", "24"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(m[1], m[2]): m for m in map(ROW.match, proc.stdout.splitlines()) if m}
    assert set(rows) == {(f, p) for f in ("llada", "dream") for p in ("scan", "transcoder", "graph")}
    for (family, part), m in rows.items():
        assert int(m[3]) == (24 if part == "graph" else 32)
        assert math.isfinite(float(m[4])) and float(m[4]) > 0
        assert m[5] == "n/a (CPU)"  # no peak memory on the CPU
        if part == "graph":
            assert m[8] is None
        else:
            assert math.isfinite(float(m[8].replace(",", ""))) and float(m[8].replace(",", "")) > 0
    graph = [line for line in proc.stdout.splitlines() if line.startswith("public llada graph")][0]
    assert "768 features" in graph  # 4 layers × 24 positions × k 8: every position's features are nodes
    table = markdown_tables(proc.stdout)
    assert len(table) == 2 + 6 and table[0].startswith("| model | part | T |")
    # the suite's row keeps the six row lines, not the table (which it prints under its own)
    kept = [line for line in proc.stdout.splitlines() if HEADLINE.search(line)]
    assert kept == [line for line in proc.stdout.splitlines() if ROW.match(line)] and len(kept) == 6


@pytest.mark.parametrize("family,release,params", [("llada", LLADA_8B, 8.02e9), ("dream", DREAM_7B, 7.62e9)])
def test_the_full_size_configs_are_the_releases(tmp_path, family, release, params):
    """The script's config.json maps to the same ModelConfig as the test fixtures' copy of the release, and the
    model it describes has the release's size (built on the meta device)."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "config.json").write_text(__import__("json").dumps(release))
    mine = public_config(write_config(tmp_path / "mine", family, tiny=False))
    assert mine == public_config(tmp_path / "ref")
    from model.diffusion import DiffusionLM

    with torch.device("meta"):
        n = DiffusionLM(mine).n_params()
    assert abs(n / params - 1) < 0.01
    assert TINY[family]["model_type"] == FULL[family]["model_type"]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_materialised_weights_are_random_finite_and_on_the_device(tmp_path, family):
    model = materialise(write_config(tmp_path / family, family, tiny=True), torch.device("cpu"), torch.float32)
    params = dict(model.named_parameters())
    assert all(not p.is_meta and p.dtype == torch.float32 and not p.requires_grad for p in params.values())
    assert all(p.std() > 0 for p in params.values() if p.numel() > 1)
    assert abs(float(params["blocks.0.attn.q.weight"].std()) * model.cfg.model_dim ** 0.5 - 1) < 0.1
    tokens = torch.randint(0, model.cfg.text_size, (2, 16))
    logits, hidden = model(tokens)
    assert torch.isfinite(logits).all() and hidden.abs().max() < 100


def test_spread_layers():
    assert spread_layers(4, 32) == [0, 10, 21, 31]
    assert spread_layers(4, 28) == [0, 9, 18, 27]
    assert spread_layers(4, 2) == [0, 1] and spread_layers(1, 5) == [0]


def test_the_suite_runs_it_last_within_its_budget():
    assert PUBLIC[2][0] == "bench/public_models_gpu.py"
    assert sum(limit for _, limit, _ in SUITE) + PUBLIC[1] <= BUDGET <= 600 - 30
    assert time_left_limit(120, 500.0) == 120
    assert time_left_limit(120, 80.5) == 80  # cut to the time left
    assert time_left_limit(120, MIN_LIMIT - 1) is None  # skipped
