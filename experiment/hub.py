"""A run's checkpoint on the Hugging Face Hub's terms: `python -m experiment.hub`.

    python -m experiment.hub --train_folder experiments/X --checkpoint_name latest [--output DIR]
        [--push_to_hub user/name]

Writes (default `experiments/X/hub/<checkpoint stem>/`) config.json and model.safetensors through
huggingface_hub's mixin (`DiffusionLM.from_pretrained(DIR)` loads it), the tokenizer as a `transformers`
fast tokenizer with [MASK] and [PAD] as special tokens, and a model card (README.md) with the data,
tokenizer, steps and validation NELBO. `--push_to_hub` uploads the folder (needs a login). The
`state_stepNNNNNN.pt` checkpoints stay the format training resumes from.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core import checks as c, cli
from core.cli import arg
from core.files import UserError, read_json, write_text_atomic
from core.locks import hold
from experiment.flags import FlagGroup, RunFlags
from experiment.paths import BASE_MODEL_KEY, CHECKPOINT_RE, CONFIG_FILE, resolve_run_folder
from experiment.record import read_metrics
from experiment.runs import load_run

HUB_DIR = "hub"


def model_card(config: dict, step: int, metrics: list[dict], tokenizer_name: str, repo: str) -> str:
    m, t, d = config["model"], config["train"], config["data"]
    vals = [r for r in metrics if r.get("event") == "val" and r.get("step", 0) <= step]
    nelbo = (f"{vals[-1]['val_nelbo']:.4f} nats/token ({vals[-1]['val_bits_per_token']:.4f} bits/token, "
             f"perplexity bound {vals[-1]['val_ppl_bound']:.2f}) on {vals[-1]['val_tokens']:,} validation tokens "
             f"at step {vals[-1]['step']:,}") if vals else "not measured"
    data = d.get("params", {}).get("dataset", t.get("dataset", "?"))
    return f"""---
library_name: pytorch
tags: [masked-diffusion, text-diffusion, interpretability]
---
# {repo or "A masked-diffusion language model"}

A bidirectional transformer trained as a masked (absorbing-state) diffusion language model
(MDLM-style NELBO): {m['num_layers']} layers, width {m['model_dim']}, {m['num_heads']} heads, ReLU² MLPs,
rotary positions, logit soft-cap {m['logit_softcap']}.

- **Data:** {data} (`{Path(d.get('folder', '')).name}`)
- **Tokenizer:** {tokenizer_name}; `[MASK]` = id {m['mask_id']}, `[PAD]` = id {m['pad_id']}, BOS = id {m['bos_id']}
- **Training:** {step:,} steps of {t.get('batch_size')} × {t.get('grad_acc_steps', 1)} sequences of
  {t.get('train_seq_len')} tokens, seed {t.get('seed')}
- **Validation NELBO:** {nelbo}

```python
from model.diffusion import DiffusionLM          # this project's code
from transformers import AutoTokenizer
model = DiffusionLM.from_pretrained("{repo or 'DIR'}")
tok = AutoTokenizer.from_pretrained("{repo or 'DIR'}")
```
"""


def refuse_released(train_folder: str) -> None:
    """A run made from a released model (experiment.init_base) holds someone else's weights: no export."""
    config = read_json(resolve_run_folder(train_folder) / CONFIG_FILE)
    if BASE_MODEL_KEY in config:
        raise UserError(f"{train_folder} was made from the released model {config[BASE_MODEL_KEY]['source']}: its "
                        "weights are that release's, not this run's, so there is nothing of its own to export")


def export(train_folder: str, checkpoint_name: str = "latest", output: str = "", repo: str = "") -> Path:
    refuse_released(train_folder)
    config, model, tok, ckpt = load_run(train_folder, checkpoint_name, "cpu")
    out = Path(output) if output else Path(train_folder) / HUB_DIR / ckpt.stem
    with hold(out):  # released before any upload: the lock file never reaches the Hub
        model.save_pretrained(out)
        tok.save_for_transformers(out)
        m = CHECKPOINT_RE.match(ckpt.name)
        step = int(m.group(1)) if m else 0
        write_text_atomic(out / "README.md", model_card(config, step, read_metrics(Path(train_folder)), tok.name, repo))
    return out


def check_repo_id(repo: str) -> None:
    """A --push_to_hub repository id checked offline, before anything is written (UserError)."""
    if not repo:
        return
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError as e:  # huggingface_hub's HFValidationError
        why = " ".join(str(e).split())
        raise UserError(f"--push_to_hub {repo[:100]!r} is not a Hub repository id (user/name): {why[:200]}") from None


@dataclass
class UploadFlags(FlagGroup):
    """Where an export may go besides its folder: a Hub repository."""

    push_to_hub: str = arg("", "upload to this Hub repository (user/name; needs `huggingface-cli login`)", c.REPO_ID)
    private: bool = arg(False, "with --push_to_hub: create the repository private")

    def finish(self, out: Path) -> Path:
        """Report the written folder and upload it when asked (the repository is created when missing)."""
        print(f"exported: {out}")
        if self.push_to_hub:
            from huggingface_hub import HfApi, errors

            api = HfApi()
            try:
                api.create_repo(self.push_to_hub, private=self.private, exist_ok=True)
                api.upload_folder(folder_path=str(out), repo_id=self.push_to_hub)
            except (OSError, getattr(errors, "HTTPError", OSError)) as e:  # no network, HTTP status, no login
                why = " ".join(str(e).split()) or type(e).__name__
                raise UserError(f"could not push to the Hub: {why[:300]}; the export is complete at {out}") from None
            print(f"uploaded: https://huggingface.co/{self.push_to_hub}")
        return out


@dataclass
class HubConfig(UploadFlags, RunFlags):
    """Export a run's checkpoint as a Hugging Face Hub model folder (and optionally upload it)."""

    output: str = arg("", "the folder to write (default: experiments/X/hub/<checkpoint stem>/)", c.OUT_FOLDER)


def main(cfg: HubConfig) -> Path:
    check_repo_id(cfg.push_to_hub)
    return cfg.finish(export(cfg.train_folder, cfg.checkpoint_name, cfg.output, cfg.push_to_hub))


if __name__ == "__main__":
    cli.run(main, HubConfig, description=HubConfig.__doc__)
