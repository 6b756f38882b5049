"""What both training loops share: the periodic events, and the step loop that ends every step with
the same log / validate / save tail."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import torch

from core.progress import progress
from experiment import LoopFlags
from experiment.flags import WANDB_PROJECT


def due(done: int, every: int, total: int) -> bool:
    """Whether a periodic event (logging, validation, checkpoint) happens after step `done`: every
    `every` steps (0: never periodically) and always after the last step."""
    return (every > 0 and done % every == 0) or done == total


def finite(module: torch.nn.Module) -> bool:
    """Whether every parameter is finite (one device sync): a step whose loss was finite can still leave
    weights that are not, and those must never be validated as a result or saved as a checkpoint."""
    params = [p.detach() for p in module.parameters()]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def run_training_steps(cfg: LoopFlags, start: int, tokens_per_step: int, show: bool, step: Callable[[int], None],
                       log: Callable[[int, float], dict], validate: Callable[[int], None],
                       save: Callable[[int], None]) -> None:
    """Optimizer steps `start`..`cfg.train_steps` under a progress bar. After step number `done` (from 1):
    `log(done, tokens/s)` every --log_every steps (it returns the bar's postfix), `validate(done)` every
    --val_loss_every and `save(done)` every --save_every, each also after the last step. Throughput
    counts the steps' own time only, not validation or saving. A fresh run validates once before training."""
    if start == 0 and cfg.val_loss_every:
        validate(0)
    bar = progress(total=cfg.train_steps, initial=start, unit="step", show=show)
    seconds, tokens = 0.0, 0  # since the last log line
    for index in range(start, cfg.train_steps):
        t0 = time.perf_counter()
        step(index)  # its loss check synchronised the device, so the time is the step's
        seconds += time.perf_counter() - t0
        tokens += tokens_per_step
        done = index + 1
        bar.update(1)
        if due(done, cfg.log_every, cfg.train_steps):
            bar.set_postfix(**log(done, tokens / seconds), refresh=False)
            seconds, tokens = 0.0, 0
        if due(done, cfg.val_loss_every, cfg.train_steps):
            validate(done)
        if due(done, cfg.save_every, cfg.train_steps):
            save(done)
    bar.close()


def open_wandb(enabled: bool, folder: Path | None, job: str, config: dict, project: str = WANDB_PROJECT):
    """A Weights & Biases run for this output folder in `project` (--wandb_project), or None. Its id is derived
    from the folder, so an interrupted job that resumes logs into the same W&B run (resume="allow")."""
    if not enabled or folder is None:  # folder: None on the processes that write nothing
        return None
    try:
        import wandb
    except ImportError:
        from core.files import UserError

        raise UserError("--wandb True needs the wandb package: pip install wandb") from None
    run_id = hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, name=f"{Path(folder).name} ({job})", id=run_id, resume="allow",
                      job_type=job, config=config, dir=str(folder))
