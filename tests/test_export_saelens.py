"""The transcoders as SAELens reads them: every exported layer, loaded by SAELens's own `SAE.load_from_disk`
(in a subprocess with the package in its side folder, .venv/saelens), computes this project's latents and
outputs; a transcoder with a skip connection is refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.transcoder import Transcoder, TranscoderConfig
from tests.helpers import assert_one_line_error, run_cli, side_package_python

pytestmark = pytest.mark.slow  # each test runs a command or SAELens (≈15 s to import) in a subprocess
STEM = "state_step000010"
LOAD = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE, __version__

root, inputs, out = sys.argv[1:4]
x = load_file(inputs)
result, info = {}, {"version": __version__}
for layer in x:
    sae = SAE.load_from_disk(f"{root}/blocks.{layer}.mlp")
    with torch.no_grad():
        acts = sae.encode(x[layer])
        result[f"acts_{layer}"], result[f"decoded_{layer}"] = acts, sae.decode(acts)
        result[f"out_{layer}"] = sae(x[layer])
    info[layer] = {"class": type(sae).__name__, "k": sae.cfg.k, "d_sae": sae.cfg.d_sae,
                   "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input, "hook_name": sae.cfg.metadata.hook_name,
                   "hook_name_out": sae.cfg.metadata.hook_name_out}
save_file({k: v.contiguous() for k, v in result.items()}, out)
print(json.dumps(info))
"""


def make_run(root, skip_layers=(), ks=(4, 8), d=32, m=96):
    """A run folder holding only what the export reads: config.json, a checkpoint's name, and its transcoders
    (random, with nonzero biases), one per layer."""
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"model_dim": d, "num_layers": len(ks)}}))
    (run / f"{STEM}.pt").write_bytes(b"")  # never read by the export
    torch.manual_seed(0)
    shared = torch.nn.functional.normalize(torch.randn(d), dim=0)
    ours = {}
    for layer, k in enumerate(ks):
        tc = Transcoder(TranscoderConfig(d, m, k, skip_connection=layer in skip_layers))
        with torch.no_grad():
            tc.encoder.bias.normal_(0, 0.1)
            tc.b_dec.normal_(0, 0.1)
            tc.encoder.weight.add_(0.5 * shared)  # a direction every latent reads: -shared turns them all off
        tc.save(run / "transcoders" / STEM / f"blocks.{layer}.mlp")
        ours[layer] = tc
    return run, ours


def test_saelens_loads_every_layer_with_the_same_latents_and_outputs(tmp_path):
    from interp.exports.saelens import SAELensExportConfig, main

    run, ours = make_run(tmp_path)
    stale = run / "exports" / "saelens" / STEM / "blocks.7.mlp"  # a deeper model's earlier export
    stale.mkdir(parents=True)
    out = main(SAELensExportConfig(train_folder=str(run)))
    assert out == run / "exports" / "saelens" / STEM
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert sorted(load_file(str(out / "blocks.0.mlp" / "sae_weights.safetensors"))) == ["W_dec", "W_enc", "b_dec",
                                                                                       "b_enc"]
    torch.manual_seed(1)
    # inputs at the scale the MLPs see (a normalised residual stream: unit RMS), and rows with fewer than k
    # positive pre-activations, where ReLU-then-TopK (ours) and TopK-then-ReLU (SAELens's) must still agree
    x = {str(i): torch.randn(64, tc.cfg.d_in) for i, tc in ours.items()}
    x["0"][:4] = -10 * ours[0].encoder.weight.mean(0) / ours[0].encoder.weight.mean(0).norm() + 0.1 * x["0"][:4]
    save_file(x, str(tmp_path / "x.safetensors"))
    proc = side_package_python("saelens", LOAD, str(out), str(tmp_path / "x.safetensors"),
                               str(tmp_path / "y.safetensors"))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    y = load_file(str(tmp_path / "y.safetensors"))
    assert info["version"] == "6.54.12"
    for i, tc in ours.items():
        assert info[str(i)] == {"class": "TopKSAE", "k": tc.cfg.k, "d_sae": tc.cfg.num_latents,
                                "apply_b_dec_to_input": False, "hook_name": f"blocks.{i}.ln2.hook_normalized",
                                "hook_name_out": f"blocks.{i}.hook_mlp_out"}
        with torch.no_grad():
            want, dense = tc(x[str(i)]), tc.dense_latents(x[str(i)])
        assert torch.equal(y[f"acts_{i}"] != 0, dense != 0)  # the same latents fire
        torch.testing.assert_close(y[f"acts_{i}"], dense, rtol=0, atol=1e-6)
        for name in ("decoded", "out"):
            torch.testing.assert_close(y[f"{name}_{i}"], want, rtol=0, atol=1e-5)
    assert (y["acts_0"][:4] != 0).sum(1).lt(ours[0].cfg.k).all()  # the rows with fewer than k positive


def test_a_skip_connection_is_refused_in_one_line(tmp_path):
    run, _ = make_run(tmp_path, skip_layers=(1,))
    proc = run_cli(["-m", "interp.exports.saelens", "--train_folder", str(run)])
    assert_one_line_error(proc, "layers [1]", "skip connection", "circuit_tracer")
    assert not (run / "exports").exists()
