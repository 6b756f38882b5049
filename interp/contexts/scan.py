"""One pass over the scanned tokens that finds, for every feature of every layer, its examples.

Per batch, for all layers at once and with shapes that never depend on the data (no host sync): every
layer's transcoder code of every token, as (group = layer's offset + feature, activation, global position)
triplets, folds into the exact top-k per feature and into a uniform random sample of each feature's firings
(random priorities through the same top-k merge); both buffers carry each example's context window as
payload (its token ids, the feature's activation at each window position, which window tokens were masked,
the centre's masked bit, the sequence's noise level t), so nothing is computed again after the pass. The
same pass counts firings, activation sums, firings at masked positions and (feature, token) pairs exactly,
fills each feature's activation histogram, and records, for a fixed random pool of positions, their
windows and which features fire anywhere in them.
After the pass, per feature: a sample of activating examples spread over the activation quantiles (from the
uniform sample, excluding the top-k) and non-activating contexts (pool windows in which the feature never
fires), drawn so that their noise levels t follow those of the feature's activating examples.

The histogram has HIST_BINS bins over (0, P], P the power of two at or above the feature's largest
activation: exact in one pass (buffers.Pow2Histogram), where bins over (0, max] would need the max first.
The examples, their windows and the statistics are those of a second pass over the chosen examples, value
for value (tested against brute force over every token's latents).

The batches and their noise depend only on (seed, batch index): a resumed scan sees the same data, and
packing g consecutive batches into one forward pass (`forward_batch_size`) changes nothing but speed. The
state is saved at a boundary of `checkpoint_every` batches once `checkpoint_minutes` have passed since the last
save (the state carries every example's window: on a card it takes longer to write than many batches to scan).

Under torchrun each process scans the batches b with b mod world = rank; at the end the processes' states
are merged (`merge_states`) into exactly what one process would have: the buffers by (value, then position:
one process's arrival order), counts and histograms summed, the pool's firings or-ed, each pool window taken
from the process that scanned its batch. Only the float64 activation sums can differ, in their last bits
(another summation order). Each process keeps its own state file, so a killed job resumes with the same
world size; the merge goes through those files (rank 0 reads them one at a time), so the processes must share
the run folder (one machine, or a shared file system).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from core.files import UserError, load_checkpoint, save_checkpoint
from core.progress import progress
from data.loader import ShardLoader
from experiment import open_data, to_device
from experiment.packing import micro_batches_per_forward
from interp.contexts.buffers import (
    PairCounter,
    Pow2Histogram,
    TopKBuffer,
    merge_histograms,
    merge_topk_states,
)
from interp.contexts.windows import document_bounds, window_columns
from model.diffusion import DiffusionLM
from model.distributed import Dist
from model.hooks import capture_mlps
from model.objective import at_mask_ratio, noise_for_model, train_noise
from model.transcoder import Transcoder

CATEGORIES = ("top", "quantile", "random")
WINDOW_FIELDS = ("chosen", "win_tokens", "win_acts", "t", "masked", "win_masked")
HIST_BINS = 32  # a power of two: bins over (0, P] merge in pairs when P doubles
T_BINS = 10  # noise-level bins over [0, 1] for matching non-activating contexts to activating ones
N_TOP_TOKENS = 10  # the most frequent tokens kept per feature
STATE_VERSION = 3  # the one-pass scan's state files (older ones are refused)


@dataclass
class ScanSettings:
    n_batches: int
    n_top: int = 50  # the top-activating examples (half explain, half score)
    context_before: int = 20
    context_after: int = 10
    n_quantile: int = 20  # activating examples spread over quantiles (half explain, half score)
    n_random: int = 20  # non-activating contexts (half explain, half score)
    sample_size: int = 200  # uniform sample of firings the quantile examples are drawn from
    pool_size: int = 0  # random positions for non-activating contexts (0: max(256, 8 × n_random))
    mask_ratio: str = "random"
    seed: int = 0
    checkpoint_every: int = 200
    checkpoint_minutes: float = 10.0  # save at a --checkpoint_every boundary only this long after the last save
    forward_batch_size: int = 0  # sequences per forward pass (0: experiment.packing's default)

    @property
    def width(self) -> int:
        return self.context_before + 1 + self.context_after


def scan_inputs(settings: dict, run_cfg: dict, checkpoint_every: int = 200, forward_batch_size: int = 0,
                checkpoint_minutes: float = 10.0) -> tuple[ShardLoader, ScanSettings]:
    """A scan's data loader and settings from its recorded settings (its config.json, or its index's copy, in
    today's names or older ones): what the scan reads, and what the delphi export reads again, batch for batch."""
    settings = renamed_settings(settings)
    loader = ShardLoader(open_data(run_cfg).folder, "train", settings["train_seq_len"], settings["batch_size"],
                         settings["seed"], files=run_cfg["data"].get("train_files"))
    s = ScanSettings(n_batches=settings["scan_batches"], n_top=settings["n_top"],
                     context_before=settings["context_before"], context_after=settings["context_after"],
                     n_quantile=settings["n_quantile"], n_random=settings["n_random"],
                     mask_ratio=settings["mask_ratio"], seed=settings["seed"], checkpoint_every=checkpoint_every,
                     forward_batch_size=forward_batch_size, checkpoint_minutes=checkpoint_minutes)
    return loader, s


RENAMED = {"top_k": "n_top"}  # a recorded scan setting's older name → its name now


def renamed_settings(settings: dict) -> dict:
    """Recorded scan settings in today's names (outputs made before --n_top recorded it as top_k)."""
    return {RENAMED.get(k, k): v for k, v in settings.items()}


def _generator(device, *parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**62)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class HostBatch:
    """What one forward pass reads, on the host: consecutive scan batches' tokens and noise, and the global
    position of each row's first token."""
    indices: list[int]
    tokens: torch.Tensor  # (R, T)
    t: torch.Tensor  # (R,)
    u: torch.Tensor  # (R, T)
    row_start: torch.Tensor  # (R,)
    per_batch: int  # rows per scan batch


def read_batches(loader: ShardLoader, indices: Sequence[int], s: ScanSettings) -> HostBatch:
    """Scan batches `indices`, each with its own noise (seeded by its data slots) and global positions."""
    tokens, ts, us, starts = [], [], [], []
    for index in indices:
        batch = loader.batch(index)
        B, T = batch.tokens.shape
        t, u = at_mask_ratio(train_noise(batch.index, index, B, s.seed + 2, T), s.mask_ratio)
        tokens.append(batch.tokens)
        ts.append(t)
        us.append(u)
        starts.append((index * B + torch.arange(B)) * T)
    return HostBatch(list(indices), torch.cat(tokens), torch.cat(ts), torch.cat(us), torch.cat(starts), B)


class Batch:
    """Scanned batches through the base model in one forward pass: tokens, noise, MLP inputs, document bounds.
    `index`: one scan batch, or consecutive ones of this process (packed); `host`: them already read."""

    def __init__(self, model: DiffusionLM, loader: ShardLoader, index: int | Sequence[int], s: ScanSettings,
                 layers: list[int], device, autocast, host: HostBatch | None = None) -> None:
        mc = model.cfg
        host = host or read_batches(loader, [index] if isinstance(index, int) else index, s)
        B, T = host.tokens.shape
        self.indices, self.per_batch = host.indices, host.per_batch
        self.tokens, self.t = to_device(host.tokens, device), to_device(host.t, device)
        self.row_start = to_device(host.row_start, device)
        noised = noise_for_model(self.tokens, self.t, to_device(host.u, device), mc)
        with torch.no_grad(), capture_mlps(model, layers) as seen, autocast:
            model(noised.inputs, select=torch.zeros(0, dtype=torch.long, device=self.tokens.device))
        self.x = {layer: seen[layer][0].reshape(B * T, -1) for layer in layers}
        self.masked = noised.mask.reshape(-1)
        self.first, self.last = document_bounds(self.tokens, mc.bos_id)
        self.B, self.T, self.N = B, T, B * T
        self.offset = self.indices[0] * self.per_batch * T  # global position of the first scan batch's first token

    def position_windows(self, s: ScanSettings) -> dict[str, torch.Tensor]:
        """Every position's window (N, C): in-batch indices (N, the index of a spare row, outside it), token ids
        (−1 outside) and masked bits (False outside), made once per forward pass for every example's window."""
        if not hasattr(self, "_windows"):
            flat = self.windows(torch.arange(self.N, device=self.tokens.device), s)
            inside, safe = flat >= 0, flat.clamp_min(0)
            self._windows = {"index": torch.where(inside, flat, self.N),
                             "win_tokens": torch.where(inside, self.tokens.reshape(-1)[safe], -1).int(),
                             "win_masked": self.masked[safe] & inside}
        return self._windows

    def global_position(self, local: torch.Tensor) -> torch.Tensor:
        return self.row_start[local // self.T] + local % self.T

    def windows(self, local: torch.Tensor, s: ScanSettings) -> torch.Tensor:
        """Flat in-batch indices (E, C) of the context windows around `local` positions, -1 outside."""
        row, col = local // self.T, local % self.T
        cols, _ = window_columns(col, self.first[row, col], self.last[row, col], s.context_before, s.context_after)
        return torch.where(cols >= 0, row[:, None] * self.T + cols, torch.full_like(cols, -1))


def active_features(tc: Transcoder, x: torch.Tensor, autocast):
    """Sparse (feature, activation, in-batch position) of every firing, and the encoding itself."""
    acts, idx = encode(tc, x, autocast)
    on = acts > 0
    pos = torch.arange(len(x), device=x.device)[:, None].expand_as(idx)
    return idx[on], acts[on], pos[on], (acts, idx)


def encode(tc: Transcoder, x: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(acts (N, k) float32, indices (N, k)): the transcoder's active latents at every position."""
    with torch.no_grad(), autocast:
        enc = tc.encode(x.float())
    return enc.acts.float(), enc.indices


def window_spec(width: int) -> dict:
    """An example's window as a buffer payload: name → (trailing shape, dtype, value where there is none)."""
    return {"win_tokens": ((width,), torch.int32, -1), "win_acts": ((width,), torch.float32, 0.0),
            "win_masked": ((width,), torch.bool, False), "t": ((), torch.float32, float("nan")),
            "masked": ((), torch.bool, False)}


@dataclass
class Top:
    """A layer's top-k buffer as read by the outputs: values (M, K), −inf where empty; ids (global positions)."""
    values: torch.Tensor
    ids: torch.Tensor

    @property
    def n_groups(self) -> int:
        return self.values.shape[0]


@dataclass
class LayerState:
    """One layer's result: statistics, histograms, and per category (M, n) examples with their windows."""
    top: Top
    fire_count: torch.Tensor
    act_sum: torch.Tensor
    masked_count: torch.Tensor
    top_tokens: tuple[torch.Tensor, torch.Tensor]  # (M, N_TOP) token ids (−1 when fewer), counts
    hist: torch.Tensor  # (M, HIST_BINS) counts over (0, hist_max]
    hist_max: torch.Tensor  # (M,) P, the power of two the bins divide (0 for a feature that never fired)
    chosen: dict[str, torch.Tensor]  # category → (M, n) global positions, −1 for none
    win_tokens: dict[str, torch.Tensor]  # category → (M, n, C) token ids, −1 outside
    win_acts: dict[str, torch.Tensor]  # category → (M, n, C) activations
    t: dict[str, torch.Tensor]  # category → (M, n) noise level
    masked: dict[str, torch.Tensor]  # category → (M, n) whether the centre was masked
    win_masked: dict[str, torch.Tensor]  # category → (M, n, C) whether each token was masked


class ScanState:
    """Every layer's running state, their features side by side as groups (layer offset + feature)."""

    def __init__(self, latents: list[int], s: ScanSettings, pool: int, vocab: int, n_total: int, device) -> None:
        self.offsets = [0, *np.cumsum(latents).tolist()]
        G, C = self.offsets[-1], s.width
        spec = window_spec(C)
        self.top = TopKBuffer(G, s.n_top, device, spec=spec)
        self.sample = TopKBuffer(G, s.sample_size, device, spec={**spec, "act": ((), torch.float32, 0.0)})
        self.fire_count = torch.zeros(G, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(G, dtype=torch.float64, device=device)
        self.masked_count = torch.zeros(G, dtype=torch.long, device=device)
        dense = torch.cuda.get_device_properties(device).total_memory // 4 if torch.device(device).type == "cuda" \
            else 2**30
        self.tokens = PairCounter(G * vocab, device, dense_bytes=dense, max_total=n_total)
        self.hist = Pow2Histogram(G, HIST_BINS, device)
        self.pool_has = torch.zeros(pool, G, dtype=torch.bool, device=device)
        self.pool = {name: torch.full((pool, *shape), fill, dtype=dt, device=device)
                     for name, (shape, dt, fill) in spec.items() if name != "win_acts"}

    def state_dict(self) -> dict:
        return {"top": self.top.state_dict(), "sample": self.sample.state_dict(), "tokens": self.tokens.state_dict(),
                "hist": self.hist.state_dict(), "pool": {k: v.cpu() for k, v in self.pool.items()},
                **{name: getattr(self, name).cpu() for name in ("fire_count", "act_sum", "masked_count", "pool_has")}}

    def load_state_dict(self, state: dict, device) -> None:
        self.top.load_state_dict(state["top"])
        self.sample.load_state_dict(state["sample"])
        self.tokens.load_state_dict(state["tokens"])
        self.hist.load_state_dict(state["hist"])
        self.pool = {k: v.to(device) for k, v in state["pool"].items()}
        for name in ("fire_count", "act_sum", "masked_count", "pool_has"):
            setattr(self, name, state[name].to(device))


def t_bin(t: torch.Tensor) -> torch.Tensor:
    return (t * T_BINS).long().clamp(0, T_BINS - 1)


def matched_keys(positive_bins: torch.Tensor, pool_bins: torch.Tensor, eligible: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
    """Sampling keys (P, M) that draw, for each feature, among its eligible pool windows (`eligible`
    (P, M): it fires nowhere in them) with weight p_f(bin) / q_f(bin): p_f the noise-level distribution
    of the feature's activating examples (`positive_bins` (M, K), -1 for none), q_f that of its eligible
    windows (`pool_bins` (P,) the windows' bins). The top keys are a weighted sample without replacement
    (Efraimidis–Spirakis: log(u) / w), so the chosen windows follow the activating examples' noise
    distribution; dividing by q_f rather than by the whole pool's distribution matters because a
    feature's eligible windows lean to the noise levels where it fires less. Windows of bins the feature
    never fired in come last (key log(u) − 1e5), used only when nothing else is left; ineligible ones
    get −inf."""
    M = positive_bins.shape[0]
    valid = positive_bins >= 0
    target = torch.zeros(M, T_BINS, device=u.device)
    target.scatter_add_(1, positive_bins.clamp_min(0), valid.float())
    target = target / target.sum(1, keepdim=True).clamp_min(1)
    onehot = torch.nn.functional.one_hot(pool_bins, T_BINS).float()  # (P, T_BINS)
    q = eligible.float().T @ onehot  # (M, T_BINS) eligible windows per bin
    q = q / q.sum(1, keepdim=True).clamp_min(1)
    w = target[:, pool_bins].T / q[:, pool_bins].T.clamp_min(1e-12)  # (P, M)
    log_u = u.clamp_min(1e-12).log()
    keys = torch.where(w > 0, log_u / w.clamp_min(1e-12), log_u - 1e5)
    return keys.masked_fill(~eligible, float("-inf"))


def _windows_at(payload: dict[str, torch.Tensor], slots: torch.Tensor, present: torch.Tensor, width: int
                ) -> dict[str, torch.Tensor]:
    """Payload rows (M, S, ...) gathered at `slots` (M, n), each field's empty value where not `present`."""
    out = {}
    for name, (shape, dtype, fill) in window_spec(width).items():
        x = payload[name]
        idx = slots.view(*slots.shape, *([1] * len(shape))).expand(*slots.shape, *shape)
        got = x.gather(1, idx)
        keep = present.view(*present.shape, *([1] * len(shape)))
        out[name] = torch.where(keep, got, torch.full_like(got, fill))
    return out


def quantile_examples(top_ids: torch.Tensor, ids: torch.Tensor, acts: torch.Tensor, n: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """From a feature's uniform sample (ids, activations (M, S)), minus its top-k positions: n examples spread
    over the activation quantiles, as (chosen positions (M, n), −1 for none; their sample slots)."""
    M = ids.shape[0]
    usable = ids >= 0
    for lo in range(0, M, 1024):  # chunks keep the (features, sample, k) comparison small
        hi = min(M, lo + 1024)
        usable[lo:hi] &= ~(ids[lo:hi, :, None] == top_ids[lo:hi, None, :]).any(-1)
    key = torch.where(usable, acts, torch.full_like(acts, float("-inf")))
    order = torch.argsort(key, dim=1, descending=True)
    count = usable.sum(1)  # (M,)
    spread = ((torch.arange(n, device=ids.device) + 0.5) / n * count[:, None]).long()
    ranks = torch.where(count[:, None] >= n, spread, torch.arange(n, device=ids.device).expand(M, n))
    slots = order.gather(1, ranks.clamp_max(ids.shape[1] - 1))
    chosen = torch.where(torch.arange(n, device=ids.device) < count[:, None], ids.gather(1, slots),
                         torch.full_like(slots, -1))
    return chosen, slots


def random_examples(pool_has: torch.Tensor, positives: torch.Tensor, pool_pos: torch.Tensor, n_random: int,
                    gen: torch.Generator, t_of: Callable[[torch.Tensor], torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-activating contexts: pool windows where the feature fires nowhere (`pool_has` (P, M)), noise-matched
    to its activating examples (`positives` (M, K) positions): (chosen positions (M, n_random), −1 for none;
    their pool slots)."""
    M = pool_has.shape[1]
    positive_bins = torch.where(positives >= 0, t_bin(t_of(positives.clamp_min(0))), torch.full_like(positives, -1))
    u = torch.rand(pool_has.shape, generator=gen, device=pool_has.device)
    prio = matched_keys(positive_bins, t_bin(t_of(pool_pos)), ~pool_has, u)
    n = min(n_random, len(pool_pos))
    best = prio.topk(n, dim=0)  # (n, M)
    found = ~torch.isinf(best.values)
    chosen = torch.where(found, pool_pos[best.indices], torch.full_like(best.indices, -1))
    pad = torch.full((M, n_random - n), -1, dtype=torch.long, device=chosen.device)
    return torch.cat([chosen.T, pad], dim=1), torch.cat([torch.where(found, best.indices, -1).T, pad], dim=1)


def state_file(state_path: Path, dist: Dist) -> Path:
    """This process's state file: `state_path` for one process, one per rank under torchrun."""
    return state_path if dist.world == 1 else state_path.with_name(
        f"{state_path.stem}.rank{dist.rank}of{dist.world}{state_path.suffix}")


def scan(model: DiffusionLM, transcoders: dict[int, Transcoder], loader: ShardLoader, s: ScanSettings, device,
         state_path: Path, autocast=None, dist: Dist | None = None) -> tuple[dict[int, LayerState], int]:
    """Run (or resume) the scan; returns the per-layer results (under torchrun merged over the processes, on
    rank 0; the other processes get none) and the number of tokens scanned."""
    job = ScanJob(model, transcoders, loader, s, device, state_path, autocast or contextlib.nullcontext(),
                  dist or Dist())
    job.run(job.restore())
    job.merge()
    return (job.results() if job.dist.main else {}), job.n_total


def forward_groups(mine: list[int], begin: int, per_forward: int, checkpoint_every: int) -> list[list[int]]:
    """This process's batches from `begin` on, in forward passes of up to `per_forward` consecutive ones that
    never cross a checkpoint (every `checkpoint_every` of them): a resumed scan groups them the same way."""
    out = []
    for i in range(0, len(mine), checkpoint_every):
        segment = [b for b in mine[i:i + checkpoint_every] if b >= begin]
        out += [segment[j:j + per_forward] for j in range(0, len(segment), per_forward)]
    return out


class ScanJob:
    """One process's scan: what it reads (model, transcoders, batches), the random pool of positions for
    non-activating contexts, the state of every layer, each scanned sequence's t, and this process's state
    file. `scan` runs its steps in order: restore, the pass (`collect` per forward), merge, `results`."""

    def __init__(self, model: DiffusionLM, transcoders: dict[int, Transcoder], loader: ShardLoader, s: ScanSettings,
                 device, state_path: Path, autocast, dist: Dist) -> None:
        self.model, self.transcoders, self.loader, self.s = model, transcoders, loader, s
        self.device, self.autocast, self.dist = device, autocast, dist
        self.requested_path, self.path = state_path, state_file(state_path, dist)
        self.layers = sorted(transcoders)
        self.n_total = s.n_batches * loader.batch_size * loader.seq_len
        pool_n = min(s.pool_size or max(256, 8 * s.n_random), self.n_total)
        draw = torch.randperm(self.n_total, generator=_generator("cpu", s.seed, 7))
        self.pool_host = draw[:pool_n].sort().values
        self.pool_pos = self.pool_host.to(device)
        per_batch = loader.batch_size * loader.seq_len  # batch b's pool slots: bounds[b]:bounds[b + 1]
        self.pool_bounds = np.searchsorted(self.pool_host.numpy(), np.arange(s.n_batches + 1) * per_batch).tolist()
        self.vocab = model.cfg.vocab_size
        self.state = ScanState([transcoders[layer].cfg.num_latents for layer in self.layers], s, pool_n, self.vocab,
                               self.n_total, device)
        self.seq_t = torch.full((s.n_batches, loader.batch_size), float("nan"), device=device)  # each sequence's t
        self.per_forward = micro_batches_per_forward(s.forward_batch_size, loader.batch_size, s.checkpoint_every,
                                                     loader.seq_len, torch.device(device))

    def full_state(self) -> dict:
        """Everything a resumed scan needs besides where it stopped (CPU tensors)."""
        return {"version": STATE_VERSION, "seq_t": self.seq_t.cpu(), "state": self.state.state_dict()}

    def load(self, state: dict) -> None:
        self.seq_t = state["seq_t"].to(self.device)
        self.state.load_state_dict(state["state"], self.device)

    def save(self, next_batch: int) -> None:
        save_checkpoint(self.path, {"next_batch": next_batch, **self.full_state()})

    def restore(self) -> int:
        """The next batch to scan: this process's state file's, or 0 for a fresh scan."""
        if not self.path.exists():
            if self.dist.main:
                note_other_process_counts(self.requested_path, self.dist)
            return 0
        saved = load_checkpoint(self.path, self.device, require_model=False)
        if saved.get("version") != STATE_VERSION:
            raise UserError(f"{self.path} was written by an older (two-pass) version of the scan; delete it (or "
                            "rerun with --overwrite True) to scan again")
        self.load(saved)
        if self.dist.main:
            print(f"resuming the scan at batch {saved['next_batch']}")
        return saved["next_batch"]

    def run(self, begin: int) -> None:
        """`collect` over this process's batches b ≥ `begin`, saving the state at a --checkpoint_every boundary
        once --checkpoint_minutes have passed since the last save (or the start)."""
        s, dist = self.s, self.dist
        mine = [b for b in range(s.n_batches) if b % dist.world == dist.rank]
        every = forward_groups(mine, 0, self.per_forward, s.checkpoint_every)
        groups = forward_groups(mine, begin, self.per_forward, s.checkpoint_every)
        done = sum(b < begin for b in mine)
        last_save = time.monotonic()
        for group in progress(groups, desc="scan", unit="forward", show=dist.main, initial=len(every) - len(groups),
                              total=len(every)):
            self.collect(Batch(self.model, self.loader, group, s, self.layers, self.device, self.autocast))
            done += len(group)
            if done % s.checkpoint_every == 0 and group[-1] != mine[-1] \
                    and time.monotonic() - last_save >= 60 * s.checkpoint_minutes:
                self.save(group[-1] + 1)
                last_save = time.monotonic()

    def merge(self) -> None:
        """Under torchrun, every process's state merged into one on rank 0, through the state files: each process
        saves its finished state, and rank 0 folds the others' in one file at a time (a collective would hold
        every process's state, windows included, on every process at once). The processes share the run folder."""
        if self.dist.world == 1:
            return
        self.save(self.s.n_batches)  # finished: a rerun that stops during the merge scans nothing again
        self.dist.barrier()
        if not self.dist.main:
            return
        state = self.full_state()
        for rank in range(1, self.dist.world):
            other = state_file(self.requested_path, Dist(rank=rank, world=self.dist.world))
            state = merge_states([state, load_checkpoint(other, "cpu", require_model=False)])
        self.load(state)

    def t_at(self, pos: torch.Tensor) -> torch.Tensor:
        """The noise level t of the sequence that holds each global position."""
        return self.seq_t.reshape(-1)[pos // self.loader.seq_len]

    def priorities(self, batch: Batch, on: list[torch.Tensor]) -> torch.Tensor:
        """The sample's random priority of every triplet (layer by layer, each layer's (N, k) in order): per scan
        batch and layer, its firings in order take the draws of one seeded generator in order."""
        out = []
        for i, layer in enumerate(self.layers):
            fired = on[i].reshape(len(batch.indices), -1)  # (scan batches, positions × k)
            for j, b in enumerate(batch.indices):
                draws = torch.rand(fired.shape[1], generator=_generator(self.device, self.s.seed, b, layer),
                                   device=self.device)
                out.append(draws[(torch.cumsum(fired[j].long(), 0) - 1).clamp_min(0)])
        return torch.cat(out)

    def collect(self, batch: Batch) -> None:
        """One forward pass's batches into the state: buffers with their windows, counts, histograms, the pool."""
        st, V = self.state, self.vocab
        codes = [encode(self.transcoders[layer], batch.x[layer], self.autocast) for layer in self.layers]
        positions = torch.arange(batch.N, device=batch.tokens.device)
        groups = torch.cat([(idx + off).reshape(-1) for (_, idx), off in zip(codes, st.offsets)])
        values = torch.cat([acts.reshape(-1) for acts, _ in codes])
        local = torch.cat([positions[:, None].expand_as(idx).reshape(-1) for _, idx in codes])
        on = values > 0
        st.fire_count.index_add_(0, groups, on.long())
        zero = torch.zeros_like(values, dtype=torch.float64)
        st.act_sum.index_add_(0, groups, torch.where(on, values.double(), zero))
        st.masked_count.index_add_(0, groups, (on & batch.masked[local]).long())
        tok_flat = batch.tokens.reshape(-1)
        st.tokens.add(groups * V + tok_flat[local], on)
        st.hist.add(groups, values, on)
        prio = self.priorities(batch, [acts > 0 for acts, _ in codes])
        ids = batch.global_position(local)
        top = st.top.select(groups, values, ids, on)
        sample = st.sample.select(groups, prio, ids, on)
        starts = [0, *np.cumsum([acts.numel() for acts, _ in codes]).tolist()]
        for i, (acts, idx) in enumerate(codes):
            rows = slice(st.offsets[i], st.offsets[i + 1])
            dense = torch.zeros(batch.N + 1, rows.stop - rows.start, device=acts.device)  # a zero row: outside
            dense[:-1].scatter_(1, idx, acts)

            def make(src: torch.Tensor, feature: torch.Tensor, start=starts[i], k=idx.shape[1], dense=dense) -> dict:
                return self.windows(batch, src, feature, start, k, dense)

            st.top.fill(top, rows, acts.numel(), make)
            st.sample.fill(sample, rows, acts.numel(),
                           lambda src, feature: {**make(src, feature), "act": values[src.clamp_min(0)]})
        self.record_pool(batch, codes)
        for j, b in enumerate(batch.indices):
            self.seq_t[b] = batch.t[j * batch.per_batch:(j + 1) * batch.per_batch]

    def windows(self, batch: Batch, src: torch.Tensor, feature: torch.Tensor, start: int, k: int,
                dense: torch.Tensor) -> dict[str, torch.Tensor]:
        """The windows of entries (R,) of one layer, from their triplet indices (its triplets begin at `start`,
        k per position) and their features; `dense` (N + 1, M) the layer's activations, a zero row last."""
        local = (src - start).clamp_min(0) // k  # in-batch position (anything for padding)
        pw = batch.position_windows(self.s)
        return {"win_tokens": pw["win_tokens"][local], "win_acts": dense[pw["index"][local], feature[:, None]],
                "win_masked": pw["win_masked"][local], "t": batch.t[local // batch.T], "masked": batch.masked[local]}

    def record_pool(self, batch: Batch, codes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The pool positions in this forward pass: their windows, and which features fire anywhere in them.
        Which pool slots a scan batch holds is known on the host (the pool is drawn there)."""
        st, n_b = self.state, batch.per_batch * batch.T
        slots, local = [], []
        for j, b in enumerate(batch.indices):
            lo, hi = self.pool_bounds[b], self.pool_bounds[b + 1]
            slots.append(torch.arange(lo, hi))
            local.append(self.pool_host[lo:hi] - b * n_b + j * n_b)
        if not sum(len(x) for x in slots):
            return
        where, at = to_device(torch.cat(slots), self.device), to_device(torch.cat(local), self.device)
        flat = batch.windows(at, self.s)  # (P_b, C)
        inside, safe = flat >= 0, flat.clamp_min(0)
        hits = torch.zeros(len(at), st.offsets[-1], dtype=torch.int32, device=self.device)
        for (acts, idx), off in zip(codes, st.offsets):
            fires = (acts[safe] > 0) & inside[..., None]  # (P_b, C, k)
            hits.scatter_add_(1, (idx[safe] + off).reshape(len(at), -1), fires.reshape(len(at), -1).int())
        st.pool_has.index_copy_(0, where, st.pool_has[where] | (hits > 0))
        values = {"win_tokens": torch.where(inside, batch.tokens.reshape(-1)[safe], -1).int(),
                  "win_masked": batch.masked[safe] & inside, "t": batch.t[at // batch.T], "masked": batch.masked[at]}
        for name, v in values.items():
            st.pool[name].index_copy_(0, where, v.to(st.pool[name].dtype))

    def results(self) -> dict[int, LayerState]:
        """Per layer: statistics and, per category, the chosen examples with their windows."""
        st, s = self.state, self.s
        items, counts = st.tokens.top_per_group(st.offsets[-1], self.vocab, N_TOP_TOKENS)
        hist_max = st.hist.top()
        top_values, top_ids_all, top_payload = st.top.ordered()
        _, sample_ids, sample_payload = st.sample.ordered()
        out = {}
        for i, layer in enumerate(self.layers):
            rows = slice(st.offsets[i], st.offsets[i + 1])
            top_ids = top_ids_all[rows]
            wins = {"top": {k: v[rows] for k, v in top_payload.items()}}
            quantile, slots = quantile_examples(top_ids, sample_ids[rows].clone(), sample_payload["act"][rows],
                                                s.n_quantile)
            wins["quantile"] = _windows_at({k: v[rows] for k, v in sample_payload.items()}, slots, quantile >= 0,
                                           s.width)
            positives = torch.cat([top_ids, quantile], dim=1)
            random, pool_slots = random_examples(st.pool_has[:, rows], positives, self.pool_pos, s.n_random,
                                                 _generator(self.device, s.seed, 11, layer), self.t_at)
            spec = window_spec(s.width)
            found = random >= 0
            pool = {k: v[pool_slots.clamp_min(0)] for k, v in st.pool.items()}
            pool["win_acts"] = torch.zeros(*random.shape, s.width, device=random.device)  # it fires nowhere there
            wins["random"] = {k: torch.where(found.view(*found.shape, *([1] * (v.dim() - 2))), v,
                                             torch.full_like(v, spec[k][2])) for k, v in pool.items()}
            chosen = {"top": top_ids, "quantile": quantile, "random": random}
            out[layer] = LayerState(
                top=Top(top_values[rows], top_ids), fire_count=st.fire_count[rows], act_sum=st.act_sum[rows],
                masked_count=st.masked_count[rows], top_tokens=(items[rows], counts[rows]), hist=st.hist.counts[rows],
                hist_max=hist_max[rows], chosen=chosen,
                **{name: {c: wins[c][name] for c in CATEGORIES} for name in WINDOW_FIELDS[1:]})
        return out



def note_other_process_counts(state_path: Path, dist: Dist) -> None:
    """A note when state files of a scan with another number of processes lie beside `state_path` (a fresh scan
    with this number starts over; they stay, for a rerun with theirs)."""
    others = [p.name for p in state_path.parent.glob(f"{state_path.stem}*{state_path.suffix}")
              if dist.world == 1 or not p.name.endswith(f"of{dist.world}{state_path.suffix}")]
    if others:
        print(f"note: {', '.join(sorted(others))} belong to a scan with another number of processes; "
              f"this one starts over (resume with that number to continue it)")


def _first_finite(parts: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise, the value of the part where it is finite (each element is set by one process)."""
    out = parts[0].clone()
    for p in parts[1:]:
        out = torch.where(torch.isfinite(p), p, out)
    return out


def merge_states(parts: list[dict]) -> dict:
    """The states (`ScanJob.full_state()`) of processes that scanned disjoint batches → the state of one process
    that scanned them all: buffers merged by (value, position), counts and histograms summed, the pool's
    firings or-ed, each pool window and each sequence's t from the process that scanned it."""
    states = [p["state"] for p in parts]
    first = states[0]
    out = dict(first)
    for name in ("top", "sample"):
        out[name] = merge_topk_states([p[name] for p in states], first[name]["values"].shape[1])
    for name in ("fire_count", "act_sum", "masked_count"):
        out[name] = sum(p[name] for p in states)
    keys = torch.cat([p["tokens"]["keys"] for p in states])
    merged, inverse = torch.unique(keys, return_inverse=True)
    counts = torch.zeros(len(merged), dtype=torch.long).index_add_(0, inverse, torch.cat([p["tokens"]["counts"]
                                                                                            for p in states]))
    out["tokens"] = {"keys": merged, "counts": counts}
    out["hist"] = merge_histograms([p["hist"] for p in states])
    out["pool_has"] = torch.stack([p["pool_has"] for p in states]).any(0)
    pool = {k: v.clone() for k, v in first["pool"].items()}
    for p in states[1:]:
        filled = torch.isfinite(p["pool"]["t"])  # the slots whose batch this process scanned
        for k in pool:
            pool[k][filled] = p["pool"][k][filled]
    out["pool"] = pool
    return {"version": STATE_VERSION, "seq_t": _first_finite([p["seq_t"] for p in parts]), "state": out}
