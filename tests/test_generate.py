import json

import pytest
import torch

from core import cli
from generate import GenerateConfig
from model.diffusion import DiffusionLM
from model.fact_eval import fact_accuracy, is_right
from model.sampler import SamplerConfig, commit_schedule, filter_logits, generate
from tests.helpers import assert_one_line_error, run_cli
from tests.test_diffusion_model import BOS, MASK, N_VOCAB, PAD, randomised, tiny_cfg

REFERENCE = ("--train_folder experiments/X --checkpoint_name state_step020000.pt --cuda 1 --num_layers 12 "
             "--num_heads 6 --model_dim 384 --max_seq_len 4_096").split()


@pytest.mark.parametrize("length,steps", [(8, 8), (8, 3), (10, 4), (5, 12), (1, 1), (32, 7)])
def test_commit_schedule(length, steps):
    counts = commit_schedule(length, steps)
    assert len(counts) == steps and sum(counts) == length and min(counts) >= 0
    assert [sum(counts[:s]) for s in range(steps + 1)] == [length * s // steps for s in range(steps + 1)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomised(DiffusionLM(tiny_cfg())).eval()


PROMPTS = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8]]


@pytest.mark.parametrize("cfg", [SamplerConfig(10, 4), SamplerConfig(5, 12, temperature=1.0, top_k=20),
                                 SamplerConfig(12, 6, block_length=4, remasking="random", temperature=0.8, top_p=0.9)])
def test_sampler_invariants(model, cfg):
    out = generate(model, PROMPTS, cfg)
    P, L = out.prompt_width, cfg.gen_length
    assert len(out.states) == cfg.steps + 1 and (out.states[0] == MASK).all()
    final = out.states[-1]
    assert not (final == MASK).any() and not (final == PAD).any() and not (final == BOS).any()
    assert (final < N_VOCAB).all()
    for b, p in enumerate(PROMPTS):  # prompts (and their BOS) untouched, left-padded
        assert out.tokens[b, P - len(p):P].tolist() == p and out.tokens[b, P - len(p) - 1] == BOS
        assert (out.tokens[b, :P - len(p) - 1] == PAD).all()
    block = cfg.block_length or L
    expected = [c for _ in range(L // block) for c in commit_schedule(block, cfg.steps // (L // block))]
    for s in range(1, cfg.steps + 1):
        before, after = out.states[s - 1], out.states[s]
        was_set = before != MASK
        assert torch.equal(after[was_set], before[was_set])  # committed tokens never change
        assert ((before == MASK) & (after != MASK)).sum(1).tolist() == [expected[s - 1]] * len(PROMPTS)
        assert ((out.committed_at == s) == ((before == MASK) & (after != MASK))).all()
    assert ((out.probs > 0) & (out.probs <= 1)).all()
    if cfg.block_length:  # blocks fill left to right
        first_done = out.committed_at[:, :block].max(1).values
        assert (out.committed_at[:, block:].min(1).values > first_done).all()


def test_same_seed_same_output_and_batching_is_invisible(model):
    cfg = SamplerConfig(8, 8, temperature=1.0, top_p=0.95, seed=3)
    a, b = generate(model, PROMPTS, cfg), generate(model, PROMPTS, cfg)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    assert not torch.equal(a.tokens, generate(model, PROMPTS, SamplerConfig(8, 8, temperature=1.0, seed=4)).tokens)
    greedy = SamplerConfig(8, 8)
    together = generate(model, PROMPTS, greedy).states[-1]
    for i, p in enumerate(PROMPTS):  # left padding and batch neighbours change nothing
        assert torch.equal(generate(model, [p], greedy).states[-1][0], together[i])


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, 0, 1.0)).any()


def test_bad_sampler_flags():
    for kw in (dict(gen_length=0), dict(gen_length=10, block_length=3), dict(gen_length=8, block_length=4, steps=3),
               dict(top_p=0.0), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            SamplerConfig(**{"gen_length": 8, "steps": 8, **kw})


def test_fact_completion_well_above_chance(tiny_run):
    """The session's tiny model (2 layers, d=128, 400 steps on 0.3 MB) on every fact prompt.

    Measured: seen phrasings 19.2% against a chance of 11.1% (the strongest guesser: always the majority
    answer; a uniform guess among the candidates gets 7.0%); held-out phrasings (never in the corpus) stay
    near chance at this size, reported but not asserted."""
    from experiment import load_run

    config, model, tok, _ = load_run(tiny_run, "latest", "cpu")
    facts = [json.loads(line) for line in open(f"{config['data']['folder']}/facts.jsonl")]
    result = fact_accuracy(model, tok, facts)
    seen, held = result["by_phrasing"]["seen"], result["by_phrasing"]["heldout"]
    print(f"seen: {seen['accuracy']:.3f} (chance {seen['chance']:.3f}); heldout: {held['accuracy']:.3f}")
    assert abs(seen["chance_uniform"] - 0.0698) < 0.001 and seen["chance"] >= seen["chance_majority"] > 0.1
    assert seen["accuracy"] > seen["chance"] and seen["accuracy"] > 2.5 * seen["chance_uniform"], seen
    assert seen["macro_accuracy"] > seen["macro_chance"], seen
    assert is_right(" Paris.", " Paris") and not is_right(" Parisian", " Paris")


def test_cli_prints_reference_format_and_writes_json(tiny_run, tmp_path):
    out = tmp_path / "gen.json"
    proc = run_cli(["generate.py", "--train_folder", str(tiny_run), "--checkpoint_name", "latest", "--device", "cpu",
                    "--prompt", "The capital of France is", "--prompt", "Scientists classify the", "--gen_length", "8",
                    "--num_generate_steps", "8", "--output", str(out), "--num_layers", "2"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    i = lines.index("input: The capital of France is")
    assert lines[i + 1] == "iteration: 1" and lines[i + 2].startswith("        continuation=The capital of France is _")
    assert lines[i + 2].count("_") >= 7 and "iteration: 8" in lines
    data = json.loads(out.read_text())
    assert data["checkpoint"].endswith("state_step000400.pt")  # latest
    g = data["generations"][0]
    assert len(g["states"]) == 9 and sorted(g["committed_at"]) == list(range(1, 9))
    assert all(0 < p <= 1 for p in g["token_probs"]) and g["states"][-1]["ids"] == g["completion_ids"]
    quiet = run_cli(["generate.py", "--train_folder", str(tiny_run), "--device", "cpu", "--quiet", "--prompt", "A",
                     "--gen_length", "4", "--num_generate_steps", "4"])
    assert quiet.returncode == 0 and len(quiet.stdout.strip().splitlines()) == 1


def test_reference_command_line_parses(reference_machine):
    cfg = cli.parse_config(GenerateConfig, REFERENCE)
    assert (cfg.checkpoint_name, cfg.cuda, cfg.num_layers, cfg.max_seq_len) == ("state_step020000.pt", 1, 12, 4096)


@pytest.mark.parametrize("extra,needle", [
    (["--num_layers", "12"], "--num_layers 12 disagrees"),
    (["--checkpoint_name", "state_step999999.pt"], "available: state_step000200.pt, state_step000400.pt"),
    (["--max_seq_len", "8"], "more than --max_seq_len 8"),
    (["--gen_length", "10", "--block_length", "3"], "must divide"),
])
def test_cli_errors(tiny_run, extra, needle):
    assert_one_line_error(run_cli(["generate.py", "--train_folder", str(tiny_run), "--device", "cpu", *extra]), needle)


@pytest.mark.slow
def test_cli_missing_folder(tmp_path):
    assert_one_line_error(run_cli(["generate.py", "--train_folder", str(tmp_path / "nope")]), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli(["generate.py", "--train_folder", str(tmp_path / "empty")]), "not a run folder")


def test_fact_protocol_does_not_tell_the_answers_length(monkeypatch):
    """Every fact of a relation gets the same number of masked slots (its longest candidate + 1), so the
    slot count cannot single out the answer (a per-fact count, its own length + 1, would give it away)."""
    import model.fact_eval as fe

    class Tok:
        def encode(self, text):
            return [ord(ch) for ch in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    lengths = {}

    def fake_generate(model, prompts, cfg):
        for p in prompts:
            lengths["".join(map(chr, p))] = cfg.gen_length
        rows = [[ord("x")] * cfg.gen_length for _ in prompts]
        return type("Out", (), {"states": [torch.tensor(rows)]})()

    monkeypatch.setattr(fe, "generate", fake_generate)
    candidates = [" Rome", " Paris", " Canberra"]
    facts = [{"prompt": f"capital {i}", "answer": a, "relation": "capital", "phrasing": "seen",
              "candidates": candidates} for i, a in enumerate(candidates)]
    result = fe.fact_accuracy(None, Tok(), facts)
    assert set(lengths.values()) == {len(" Canberra") + 1}
    assert result["chance"] == pytest.approx(1 / 3)
