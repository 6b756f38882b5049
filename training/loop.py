"""What both training loops share: the periodic events, the step loop that ends every step with the same
log / validate / save tail, and the preparation of the next step's batches in the background."""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Generic, TypeVar

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
                       save: Callable[[int], None], device: torch.device | None = None) -> None:
    """Optimizer steps `start`..`cfg.train_steps` under a progress bar. After step number `done` (from 1):
    `log(done, tokens/s)` every --log_every steps (it returns the bar's postfix), `validate(done)` every
    --val_loss_every and `save(done)` every --save_every, each also after the last step. Throughput
    counts the steps' own time only, not validation or saving. A fresh run validates once before training.
    On a CUDA `device` the steps may return before the GPU has done their work; the loop waits for it
    before reading the clock at a step that one of the three events follows."""
    if start == 0 and cfg.val_loss_every:
        validate(0)
    bar = progress(total=cfg.train_steps, initial=start, unit="step", show=show)
    seconds, tokens = 0.0, 0  # since the last log line
    for index in range(start, cfg.train_steps):
        t0 = time.perf_counter()
        step(index)
        done = index + 1
        logs, validates, saves = (due(done, every, cfg.train_steps)
                                  for every in (cfg.log_every, cfg.val_loss_every, cfg.save_every))
        if (logs or validates or saves) and device is not None and device.type == "cuda":
            # A step only queues work on the GPU. Without this wait the clock would stop before the queued
            # steps ran, and validation or saving (which wait for the GPU) would be charged with their time:
            # tokens/s would be too high. Between events the host runs ahead and the GPU never waits for it.
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        tokens += tokens_per_step
        bar.update(1)
        if logs:
            bar.set_postfix(**log(done, tokens / seconds), refresh=False)
            seconds, tokens = 0.0, 0
        if validates:
            validate(done)
        if saves:
            save(done)
    bar.close()


T = TypeVar("T")


class Prefetch(Generic[T]):
    """`make(index)` for the indices a loop asks for, each computed one ahead: while the caller works on
    step i, a background thread makes step i + 1 (below `stop`). `make` must depend on its index only (the
    result is the same whichever thread makes it, and in whatever order the indices are asked for); it runs
    in that one thread only, never twice at once."""

    def __init__(self, make: Callable[[int], T], stop: int) -> None:
        self._make, self._stop = make, stop
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._ahead: tuple[int, Future[T]] | None = None

    def get(self, index: int) -> T:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            future = ahead[1]
        else:  # not the index made ahead: made now (after any other one still running: one thread)
            future = self._pool.submit(self._make, index)
        if index + 1 < self._stop:
            self._ahead = (index + 1, self._pool.submit(self._make, index + 1))
        return future.result()

    def close(self) -> None:
        """Stop making ahead (what is being made finishes in the background)."""
        self._ahead = None
        self._pool.shutdown(wait=False, cancel_futures=True)


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
