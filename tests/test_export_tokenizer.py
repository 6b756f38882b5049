"""The exported tokenizers (the Hub export's and the delphi export's `tokenizer/`) load with transformers 4
(in a subprocess with circuit-tracer's pinned transformers 4.57.3) and with the project's transformers 5, with
this project's ids; and a delphi export moved elsewhere still loads with delphi's own code."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, side_package_python

TEXTS = ["The capital of France is Paris.", "Musicians play the violin.", "  spaces\tand\nnew lines 123"]

LOAD = r"""
import json, sys
import transformers
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({"version": transformers.__version__, "ids": [tok(t, add_special_tokens=False)["input_ids"]
                  for t in json.loads(sys.argv[2])], "mask": tok.mask_token_id, "pad": tok.pad_token_id}))
"""


def check_tokenizer(folder, tok) -> None:
    """`folder` loads under transformers 4 and 5 with `tok`'s ids, [MASK] and [PAD]."""
    from transformers import AutoTokenizer

    want = {"ids": [tok.encode(t) for t in TEXTS], "mask": tok.mask_id, "pad": tok.pad_id}
    proc = side_package_python("circuit-tracer", LOAD, str(folder), json.dumps(TEXTS))
    got4 = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got4.pop("version").startswith("4.")
    assert got4 == want
    hf = AutoTokenizer.from_pretrained(folder)  # the project's transformers 5
    assert {"ids": [hf(t, add_special_tokens=False)["input_ids"] for t in TEXTS], "mask": hf.mask_token_id,
            "pad": hf.pad_token_id} == want
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_hub_export_tokenizer_loads_in_transformers_4_and_5(tiny_run, tmp_path):
    from experiment import load_run
    from experiment.hub import HubConfig, main as export_main

    out = export_main(HubConfig(train_folder=str(tiny_run), output=str(tmp_path / "hub")))
    check_tokenizer(out, load_run(tiny_run, "latest", "cpu")[2])


@pytest.fixture(scope="module")
def delphi_export(tiny_run, tiny_topk, tmp_path_factory):
    from interp.exports.delphi import DelphiExportConfig, main

    return main(DelphiExportConfig(train_folder=str(tiny_run), device="cpu",
                                   output=str(tmp_path_factory.mktemp("delphi") / "export")))


def test_delphi_export_tokenizer_loads_in_transformers_4_and_5(delphi_export, tiny_run):
    from experiment import load_run

    check_tokenizer(delphi_export / "tokenizer", load_run(tiny_run, "latest", "cpu")[2])


MOVED = r"""
import json, os, sys, torch
from delphi.config import ConstructorConfig, SamplerConfig
from delphi.latents import LatentDataset
os.chdir(sys.argv[1])
ds = LatentDataset(raw_dir="latents", modules=["blocks.1.mlp"], latents={"blocks.1.mlp": torch.tensor([0, 1, 2, 3])},
                   sampler_cfg=SamplerConfig(n_examples_train=2, n_examples_test=1, n_quantiles=1, train_type="top"),
                   constructor_cfg=ConstructorConfig(min_examples=1, example_ctx_len=16, n_non_activating=1,
                                                     non_activating_source="random"))  # no tokenizer=
print(json.dumps({"mask": ds.tokenizer.mask_token_id, "n": len(list(ds))}))
"""


def test_a_moved_delphi_export_loads_without_a_tokenizer(delphi_export, tiny_run, tmp_path):
    """Nothing in the export points at where it was written: copied elsewhere (the original gone), delphi's
    LatentDataset finds the tokenizer from the export folder by the cache config's `model_name` alone."""
    from experiment import load_run

    config = json.loads((delphi_export / "latents" / "blocks.1.mlp" / "config.json").read_text())
    assert config["model_name"] == "tokenizer"
    text = "".join(p.read_text(errors="replace") for p in delphi_export.rglob("*") if p.suffix in (".json", ".txt"))
    assert str(tiny_run) not in text and str(delphi_export) not in text
    moved = tmp_path / "elsewhere" / "export"
    shutil.copytree(delphi_export, moved, symlinks=True)
    hidden = delphi_export.with_name("hidden")
    os.replace(delphi_export, hidden)  # the original is gone while the copy loads
    try:
        proc = side_package_python("delphi", MOVED, str(moved))
    finally:
        os.replace(hidden, delphi_export)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["mask"] == load_run(tiny_run, "latest", "cpu")[2].mask_id and got["n"] >= 1


def test_side_folder_runs_transformers_4():
    """The subprocess really runs the side folder's transformers (else the test above proves nothing)."""
    folder = os.path.join(sys.prefix, "circuit-tracer")
    if not os.path.isdir(folder):
        pytest.skip("no circuit-tracer side folder")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"], env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "4.57.3"
