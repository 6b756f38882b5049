"""The transcoders as a clean sparsify folder to share: only each layer's cfg.json and sae.safetensors (and
config.json, metrics.json), no training state; sparsify's own `load_many` loads it and computes ours."""
from __future__ import annotations

import shutil

import pytest
import torch

from model.transcoder import Transcoder
from tests.helpers import assert_one_line_error, run_cli


def test_sparsify_export_holds_only_what_sparsify_loads(tiny_transcoders, tiny_run, tmp_path):
    sparsify = pytest.importorskip("sparsify")
    from interp.exports.sparsify import SparsifyExportConfig, main

    assert list(tiny_transcoders.glob("state_step*.pt")), "the run folder should hold training state"
    out = main(SparsifyExportConfig(train_folder=str(tiny_run), output=str(tmp_path / "clean")))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["blocks.0.mlp/cfg.json", "blocks.0.mlp/sae.safetensors", "blocks.1.mlp/cfg.json",
                     "blocks.1.mlp/sae.safetensors", "config.json", "metrics.json"]
    for f in files:
        assert (out / f).read_bytes() == (tiny_transcoders / f).read_bytes()
    many = sparsify.SparseCoder.load_many(str(out), local=True)
    assert list(many) == ["blocks.0.mlp", "blocks.1.mlp"]
    x = torch.randn(16, many["blocks.1.mlp"].d_in)
    ours = Transcoder.load(tiny_transcoders / "blocks.1.mlp")
    with torch.no_grad():
        torch.testing.assert_close(many["blocks.1.mlp"](x).sae_out, ours(x), atol=1e-4, rtol=1e-4)
    # again over the export: the same folder, nothing stale
    (out / "blocks.7.mlp").mkdir()
    main(SparsifyExportConfig(train_folder=str(tiny_run), output=str(out)))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files
    assert not (out / "blocks.7.mlp").exists()


def test_sparsify_export_needs_transcoders(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("transcoders", "topk", "descriptions", "explanations",
                                                                  "exports", "hub"))
    assert_one_line_error(run_cli(["-m", "interp.exports.sparsify", "--train_folder", str(run)]),
                          "no finished transcoders", "train_transcoders.py")
