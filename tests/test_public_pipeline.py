"""The whole pipeline through its command lines on runs made from tiny released-style LLaDA and Dream folders
(random weights, real byte-level BPE tokenizers): experiment.init_base, transcoders, top-k, `tokens`
descriptions, generation with the model's own sampler, step-by-step explanations; and what a run made from a
released model refuses in one line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core.files import UserError
from experiment.flags import SamplingFlags
from experiment.paths import RELEASED, StagePaths
from experiment.runs import load_run
from interp.explanations import stage as explain_stage
from interp.explanations.config import ExplainConfig
from model.sampler import generate as real_generate
from tests.helpers import assert_one_line_error, run_cli
from tests.public_tokenizers import write_bpe_public_folder

FAMILIES = ["llada", "dream"]
PROMPT = "The quick brown"
SAMPLING = ["--prompt", PROMPT, "--gen_length", "8", "--num_generate_steps", "4", "--device", "cpu"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module", params=FAMILIES)
def public_run(request, tmp_path_factory) -> tuple[str, Path]:
    """(family, run folder) after stages 3 to 5 ran through their command lines on a run made by init_base."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = write_bpe_public_folder(tmp / "model", request.param)
    ok(run_cli(["-m", "experiment.init_base", "--model", str(model), "--dataset", "synthetic", "--synthetic_mb",
                "0.02", "--workers", "1", "--data_dir", str(tmp / "data"), "--experiments_dir", str(tmp / "exp")]))
    (run,) = (tmp / "exp").iterdir()
    common = ["--train_folder", str(run), "--device", "cpu"]
    ok(run_cli(["train_transcoders.py", *common, "--train_seq_len", "64", "--batch_size", "4", "--grad_acc_steps",
                "1", "--train_steps", "20", "--expansion_factor", "2", "--k", "4", "--val_loss_every", "0",
                "--val_tokens", "512", "--save_every", "0", "--log_every", "10", "--dead_tokens", "1000"]))
    ok(run_cli(["get_topk_activations.py", *common, "--train_seq_len", "64", "--batch_size", "4", "--scan_batches",
                "3", "--n_top", "5", "--context_before", "4", "--context_after", "2", "--n_quantile", "2",
                "--n_random", "2"]))
    ok(run_cli(["get_activation_descriptions.py", *common, "--explainer", "tokens", "--max_features_per_layer",
                "8"]))
    return request.param, run


def finite_numbers(value, where: str = "") -> None:
    """Every float in a JSON value is finite (None stands for 'not measured')."""
    if isinstance(value, dict):
        for k, v in value.items():
            finite_numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            finite_numbers(v, f"{where}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), where


@pytest.mark.slow
def test_stages_3_to_5_write_their_outputs(public_run):
    _, run = public_run
    paths = StagePaths(run, RELEASED)
    for layer in (0, 1):
        assert (paths.transcoders / f"blocks.{layer}.mlp" / "sae.safetensors").is_file()
    assert (paths.topk / "index.html").is_file()
    records = [json.loads(line) for line in paths.records.read_text().splitlines()]
    assert records and all(r["explainer"] == "tokens" for r in records)


@pytest.mark.slow
def test_generate_runs_the_models_own_sampler_on_the_prompts_ids(public_run, tmp_path):
    family, run = public_run
    out = tmp_path / "gen.json"
    _, _, tok, _ = load_run(run, RELEASED, "cpu")
    exact = str(len(tok.encode(PROMPT)) + 8)  # the prompt and its continuation, no BOS
    proc = ok(run_cli(["generate.py", "--train_folder", str(run), *SAMPLING, "--output", str(out), "--max_seq_len",
                       exact]))
    assert f"the {family} sampler" in proc.stdout and f"final: {PROMPT}" in proc.stdout
    (rec,) = json.loads(out.read_text())["generations"]
    assert rec["prompt_ids"] == tok.encode(PROMPT)  # no BOS added: the public samplers read the ids as given
    states = [s["ids"] for s in rec["states"]]
    assert len(states) == 5 and all(s == tok.mask_id for s in states[0])
    for step in range(1, 5):  # a state changes exactly where the step committed
        changed = [i for i, (a, b) in enumerate(zip(states[step - 1], states[step])) if a != b]
        committed = [i for i, c in enumerate(rec["committed_at"]) if c == step]
        assert set(changed) <= set(committed)
    assert sorted(set(rec["committed_at"])) <= [1, 2, 3, 4] and len(rec["committed_at"]) == 8


@pytest.mark.slow
def test_generate_descriptions_explains_every_step(public_run, tmp_path):
    _, run = public_run
    out = tmp_path / "explanations.json"
    proc = ok(run_cli(["generate_descriptions.py", "--train_folder", str(run), *SAMPLING, "--explainer", "tokens",
                       "--random_draws", "2", "--output", str(out)]))
    assert "iteration: 4" in proc.stdout and "explanation scores over" in proc.stdout
    data = json.loads(out.read_text())
    finite_numbers(data)
    (prompt,) = data["prompts"]
    assert [s["step"] for s in prompt["steps"]] == [1, 2, 3, 4]
    graphs = [s["graph"] for s in prompt["steps"] if s["graph"]]
    assert graphs
    for g in graphs:  # the parts add up to the target's value, and each layer's part to its pieces
        layers = g["layers"].values()
        assert g["whole"] == pytest.approx(g["inputs"]["tokens"] + g["inputs"]["masks"]
                                           + sum(v["part"] for v in layers), abs=1e-3)
        for v in layers:
            assert v["part"] == pytest.approx(v["features"] + v["error"] + v["bias"], abs=1e-4)
    assert (out.parent / "explanations_report.html").is_file()


@pytest.mark.slow
def test_chat_renders_the_prompt_in_the_models_template_in_stages_2_and_6(public_run, tmp_path):
    """--chat: the prompt the stages show, encode and explain is the template's rendering of the typed one."""
    from data.chat import chat_template, render_chat, special_tokens
    from experiment.paths import BASE_MODEL_KEY

    _, run = public_run
    config, _, tok, _ = load_run(run, RELEASED, "cpu")
    folder = config[BASE_MODEL_KEY]["folder"]
    rendered = render_chat(chat_template(folder), PROMPT, special_tokens(folder))
    assert rendered != PROMPT and PROMPT in rendered
    gen, explained = tmp_path / "gen.json", tmp_path / "explanations.json"
    chat = ["--chat", "--max_seq_len", "128"]  # Dream's default system message alone is ~60 tiny-BPE tokens
    ok(run_cli(["generate.py", "--train_folder", str(run), *SAMPLING, *chat, "--output", str(gen)]))
    (rec,) = json.loads(gen.read_text())["generations"]
    assert rec["prompt"] == rendered and rec["prompt_ids"] == tok.encode_prompt(rendered)
    assert rec["typed_prompt"] == PROMPT
    ok(run_cli(["generate_descriptions.py", "--train_folder", str(run), *SAMPLING, *chat, "--explainer", "tokens",
                "--random_draws", "2", "--output", str(explained)]))
    (prompt,) = json.loads(explained.read_text())["prompts"]
    assert prompt["prompt"] == rendered and prompt["typed_prompt"] == PROMPT


@pytest.mark.slow
@pytest.mark.parametrize("which", ["mask", "never predicted"])
def test_commits_of_the_mask_or_a_never_predicted_id_are_no_targets(public_run, tmp_path, monkeypatch, capsys, which):
    _, run = public_run
    _, model, _, _ = load_run(run, RELEASED, "cpu")
    mask = model.cfg.mask_id if which == "mask" else max(model.cfg.never_predicted())
    chosen: list[int] = []

    def commits_a_mask(model, prompts, cfg):
        """The real sampler, then its first step-1 position turned into the mask id from step 1 on."""
        out = real_generate(model, prompts, cfg)
        i = int((out.committed_at[0] == 1).nonzero()[0])
        chosen.append(out.prompt_width + i)
        for state in out.states[1:]:
            state[0, i] = mask
        out.tokens[0, out.prompt_width + i] = mask
        return out

    monkeypatch.setattr(explain_stage, "generate", commits_a_mask)
    cfg = ExplainConfig(train_folder=str(run), device="cpu", explainer="tokens", prompt=[PROMPT], gen_length=8,
                        num_generate_steps=4, random_draws=2, output=str(tmp_path / "x.json"))
    path = explain_stage.run_explanations(cfg)
    step1 = json.loads(path.read_text())["prompts"][0]["steps"][0]
    assert step1["skipped_commits"] == chosen
    assert chosen[0] not in [c["position"] for c in step1["committed"]]
    assert f"an id the model never predicts at position(s) {chosen}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_knob_of_the_other_sampler_is_one_line(public_run):
    family, run = public_run
    knob, owner = (["--alg", "entropy"], "dream") if family == "llada" else (["--cfg_scale", "1.5"], "llada")
    proc = run_cli(["generate.py", "--train_folder", str(run), *SAMPLING, *knob])
    assert_one_line_error(proc, f"is not a knob of the {family} sampler", f"belongs to {owner}")


@pytest.mark.slow
def test_explanations_refuse_guidance(public_run):
    family, run = public_run
    if family != "llada":
        pytest.skip("classifier-free guidance is LLaDA's sampler's")
    proc = run_cli(["generate_descriptions.py", "--train_folder", str(run), *SAMPLING, "--explainer", "tokens",
                    "--cfg_scale", "1"])
    assert_one_line_error(proc, "--cfg_scale 1.0", "explain with --cfg_scale 0")


@pytest.mark.slow
def test_hub_export_refuses_a_released_run(public_run):
    _, run = public_run
    proc = run_cli(["-m", "experiment.hub", "--train_folder", str(run)])
    assert_one_line_error(proc, "was made from the released model", "nothing of its own to export")
    assert not (run / "hub").exists()


@pytest.mark.slow
def test_ground_truth_benchmark_runs_on_a_released_run(public_run):
    _, run = public_run  # its validation windows are as long as the transcoders' training sequences (64)
    ok(run_cli(["-m", "interp.ground_truth", "--train_folder", str(run), "--device", "cpu", "--val_tokens", "640",
                "--noise_levels", "0.5", "--probe_k", "1"]))
    assert (run / "ground_truth.json").is_file()


class WordTokenizer:
    def encode_prompt(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def test_lengths_count_bos_only_for_this_projects_sampler():
    flags = SamplingFlags(prompt=["a b c"], gen_length=5)
    flags.check_lengths(flags.prompts(), WordTokenizer(), 8, adds_bos=False)  # 3 + 5 tokens fit 8
    with pytest.raises(UserError, match="needs 9 tokens with its continuation, more than --max_seq_len 8"):
        flags.check_lengths(flags.prompts(), WordTokenizer(), 8, adds_bos=True)


def test_a_chat_prompt_too_long_is_named_as_typed():
    flags = SamplingFlags(prompt=["a b c"], gen_length=5, chat=True)
    with pytest.raises(UserError, match=r"^prompt 'a b c'\.\.\. needs 10 tokens with its continuation in the chat "
                                        "template, more than --max_seq_len 8"):
        flags.check_lengths(["<user> a b c <assistant>"], WordTokenizer(), 8, adds_bos=False)


def test_a_release_without_a_stated_length_needs_max_seq_len():
    flags = SamplingFlags(prompt=["a b c"], gen_length=5)
    with pytest.raises(UserError, match="states no maximum sequence length: give --max_seq_len"):
        flags.check_lengths(flags.prompts(), WordTokenizer(), None, adds_bos=False)
    SamplingFlags(prompt=["a b c"], gen_length=5, max_seq_len=8).check_lengths(["a b c"], WordTokenizer(), None, False)


def test_sampling_flags_reach_the_sampler_by_name():
    flags = SamplingFlags(sampler="dream", alg="entropy", alg_temp=0.5, eps=0.01, top_k=3, top_p=0.9, seed=7,
                          gen_length=8, num_generate_steps=4, temperature=0.3)
    s = flags.sampler_config()
    assert (s.sampler, s.alg, s.alg_temp, s.eps, s.top_k, s.top_p, s.seed, s.gen_length, s.steps, s.temperature) == (
        "dream", "entropy", 0.5, 0.01, 3, 0.9, 7, 8, 4, 0.3)
    s = SamplingFlags(sampler="llada", cfg_scale=2.0, block_length=4, gen_length=8, num_generate_steps=4,
                      remasking="random").sampler_config()
    assert (s.sampler, s.cfg_scale, s.block_length, s.remasking) == ("llada", 2.0, 4, "random")


def test_bad_sampler_flags_are_refused_when_parsed():
    with pytest.raises(ValueError, match="--eps"):
        SamplingFlags(eps=0.0)
    with pytest.raises(ValueError, match="--block_length 3 must divide --gen_length 8"):
        SamplingFlags(gen_length=8, block_length=3)
