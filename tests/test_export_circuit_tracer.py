"""The transcoders as circuit-tracer reads them: loaded by its own loaders (in a subprocess with the
package and the versions it pins), they compute this project's outputs once the activation is set to ReLU
then TopK(k), k from config.yaml. config.yaml names the activation with upstream circuit-tracer's keys
(`activation: topk`, `k`): upstream v0.5.0's Hub loader builds `TopK(k)` from them, which keeps negative
latents where a token has fewer than k positive pre-activations; that TopK alone is checked here too.
(Upstream's own loaders were run on an export by hand, see docs/TOOLS.md: CI has no network.)"""
from __future__ import annotations

import torch
import yaml
from safetensors.torch import load_file, save_file

from model.transcoder import Transcoder
from tests.helpers import assert_one_line_error, run_cli, side_package_python

LOAD = r"""
import sys, torch, yaml
from safetensors.torch import load_file, save_file
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from circuit_tracer.transcoder.activation_functions import TopK

cache_dir, ref, inputs, out = sys.argv[1:5]
x = load_file(inputs)
ts, cfg = load_transcoder_from_hub(ref, cache_dir=cache_dir, lazy_decoder=False)   # the cache/Hub path
paths = {i: f"{cache_dir}/{ref}/layer_{i}.safetensors" for i in range(len(ts))}
lazy = load_transcoder_set(paths, scan="x", feature_input_hook=cfg["feature_input_hook"],   # lazy weights
                           feature_output_hook=cfg["feature_output_hook"], device=torch.device("cpu"))
result = {}
for i, t in enumerate(ts):
    result[f"relu_{i}"] = t(x[str(i)])
    assert cfg["activation"] == "topk" and "activation_function" not in cfg
    t.activation_function = TopK(cfg["k"])   # what upstream's Hub loader builds from config.yaml
    result[f"topk_{i}"] = t(x[str(i)])
    for s in (t, lazy[i]):
        s.activation_function = torch.nn.Sequential(torch.nn.ReLU(), TopK(cfg["k"]))
    result[f"out_{i}"] = t(x[str(i)])
    result[f"lazy_{i}"] = lazy[i](x[str(i)])
    result[f"acts_{i}"] = t.encode(x[str(i)])
save_file({k: v.detach().contiguous() for k, v in result.items()}, out)
print(cfg["feature_input_hook"], cfg["feature_output_hook"], cfg["k"], type(ts).__name__, len(ts))
"""


def check_circuit_tracer_outputs(out, ours: dict, tmp_path) -> int:
    """circuit-tracer's loaders read `out` and, with ReLU then TopK(k) set, compute `ours`' outputs; TopK(k)
    alone (upstream's from config.yaml) computes them only for tokens with at least k positive pre-activations.
    Returns how many test tokens have fewer."""
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set" and cfg["activation"] == "topk" and cfg["k"] == ours[0].cfg.k
    torch.manual_seed(0)
    # inputs at the scale the MLPs see (a normalised residual stream: unit RMS); zero rows, whose pre-activations
    # are the encoder's bias: where fewer than k of them are positive, TopK alone and ReLU-then-TopK differ
    x = {str(i): torch.randn(64, ours[i].cfg.d_in) for i in ours}
    for v in x.values():
        v[:4] = 0
    save_file(x, str(tmp_path / "x.safetensors"))
    proc = side_package_python("circuit-tracer", LOAD, str(out.parent.parent), f"circuit-tracer/{out.name}",
                               str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors"))
    assert proc.stdout.split() == ["ln2.hook_normalized", "hook_mlp_out", str(cfg["k"]), "TranscoderSet", "2"]
    y = load_file(str(tmp_path / "y.safetensors"))
    n_few = 0
    for i, tc in ours.items():
        with torch.no_grad():
            want, dense = tc(x[str(i)]), tc.dense_latents(x[str(i)])
        torch.testing.assert_close(y[f"acts_{i}"], dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[f"out_{i}"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[f"lazy_{i}"], want, rtol=1e-5, atol=1e-5)
        # left at the ReLU its loader builds, circuit-tracer computes something else: the swap matters
        assert (y[f"relu_{i}"] - want).abs().max() > 1e-2
        with torch.no_grad():
            few = (tc.encoder(x[str(i)]) > 0).sum(-1) < tc.cfg.k
        torch.testing.assert_close(y[f"topk_{i}"][~few], want[~few], rtol=1e-5, atol=1e-5)
        assert ((y[f"topk_{i}"] - want).abs().amax(-1)[few] > 1e-3).all()  # negative latents kept
        n_few += int(few.sum())
    return n_few


def test_circuit_tracer_loads_the_transcoders_with_the_same_outputs(tiny_run, tiny_transcoders, tmp_path):
    from interp.exports.circuit_tracer import CircuitTracerExportConfig, main

    out = main(CircuitTracerExportConfig(train_folder=str(tiny_run)))
    assert out == tiny_run / "exports" / "circuit-tracer" / tiny_transcoders.name
    assert sorted(load_file(str(out / "layer_0.safetensors"))) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    ours = {i: Transcoder.load(tiny_transcoders / f"blocks.{i}.mlp") for i in (0, 1)}
    check_circuit_tracer_outputs(out, ours, tmp_path)


def test_skip_connections_and_a_second_export(tiny_run, tiny_transcoders, tmp_path):
    """Transcoders with a skip connection (W_skip: x W_skipᵀ in both tools); a second export into the same
    folder replaces the first and leaves no layer of it behind."""
    import shutil

    from interp.exports.circuit_tracer import export
    from model.transcoder import TranscoderConfig

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("transcoders", "topk", "descriptions",
                                                                 "explanations", "exports", "hub"))
    base = Transcoder.load(tiny_transcoders / "blocks.0.mlp")
    torch.manual_seed(1)
    ours = {}
    for i in (0, 1):
        tc = Transcoder(TranscoderConfig(base.cfg.d_in, base.cfg.num_latents, base.cfg.k, skip_connection=True))
        with torch.no_grad():
            tc.encoder.bias.normal_(0, 0.1)
            tc.encoder.bias[2:].sub_(1.0)  # at a zero input only latents 0 and 1 are positive: fewer than k
            tc.W_skip.normal_(0, 0.1)
        tc.save(run / "transcoders" / tiny_transcoders.name / f"blocks.{i}.mlp")
        ours[i] = tc
    out = tmp_path / "exports" / "circuit-tracer" / "skip"
    out.mkdir(parents=True)
    (out / "layer_7.safetensors").write_text("from a deeper model")
    (out / "config.yaml").write_text("model_kind: stale")
    export(str(run), output=str(out))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors"]
    assert "W_skip" in load_file(str(out / "layer_1.safetensors"))
    assert check_circuit_tracer_outputs(out, ours, tmp_path) == 8  # the zero rows of both layers


def test_export_refuses_an_incomplete_transcoder_set(tiny_run, tiny_transcoders, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("exports", "topk", "descriptions", "explanations"))
    shutil.rmtree(run / "transcoders" / tiny_transcoders.name / "blocks.1.mlp")
    proc = run_cli(["-m", "interp.exports.circuit_tracer", "--train_folder", str(run)])
    assert_one_line_error(proc, "every layer 0..1", "[0]")
