"""Two passes over the scanned tokens that find, for every feature of every layer, its examples.

Pass 1 (streaming, on the device): the exact top-k activations per feature; a uniform random sample
of each feature's firings (random priorities through the same top-k merge); firing counts, activation
sums, firings at masked positions, exact (feature, token) counts; and, for a fixed random pool of
positions, which features fire anywhere in their context windows.
Between passes: per feature, a sample of activating examples spread over the activation quantiles
(from the uniform sample, excluding the top-k) and non-activating contexts (pool windows in which the
feature never fires), drawn so that their noise levels t follow those of the feature's activating
examples (each sequence's t is recorded in pass 1).
Pass 2 (the same batches and noise again): every chosen example's context window, its token ids, the
feature's activation and whether the token was masked at each of them, and the noise level t; and
each feature's activation histogram (bins over (0, max]).

The batches and their noise depend only on (seed, batch index), so both passes and a resumed scan see
the same data. The state is saved every `checkpoint_every` batches.

Under torchrun each process scans the batches b with b mod world = rank; after each pass the processes'
states are merged (`merge_states`) into exactly what one process would have: the top-k buffers by (value,
then position: one process's arrival order), counts summed, the pool's firings or-ed, each window taken from
the process that scanned its batch. Only the float64 activation sums can differ, in their last bits (another
summation order). Each process keeps its own state file, so a killed job resumes with the same world size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from core.files import UserError, load_checkpoint, save_checkpoint
from core.progress import progress
from data.loader import ShardLoader
from experiment import open_data
from interp.contexts.buffers import PairCounter, TopKBuffer
from interp.contexts.windows import document_bounds, window_columns
from model.diffusion import DiffusionLM
from model.distributed import Dist
from model.hooks import capture_mlps
from model.objective import apply_noise, at_mask_ratio, train_noise
from model.transcoder import Transcoder

CATEGORIES = ("top", "quantile", "random")
WINDOW_FIELDS = ("chosen", "win_tokens", "win_acts", "t", "masked", "win_masked")
PASS2_WINDOWS = WINDOW_FIELDS[1:]  # filled in pass 2; "chosen" is fixed between the passes
HIST_BINS = 20
T_BINS = 10  # noise-level bins over [0, 1] for matching non-activating contexts to activating ones


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

    @property
    def width(self) -> int:
        return self.context_before + 1 + self.context_after


def scan_inputs(settings: dict, run_cfg: dict, checkpoint_every: int = 200) -> tuple[ShardLoader, ScanSettings]:
    """A scan's data loader and settings from its recorded settings (its config.json, or its index's copy, in
    today's names or older ones): what the scan reads, and what the delphi export reads again, batch for batch."""
    settings = renamed_settings(settings)
    loader = ShardLoader(open_data(run_cfg).folder, "train", settings["train_seq_len"], settings["batch_size"],
                         settings["seed"], files=run_cfg["data"].get("train_files"))
    s = ScanSettings(n_batches=settings["scan_batches"], n_top=settings["n_top"],
                     context_before=settings["context_before"], context_after=settings["context_after"],
                     n_quantile=settings["n_quantile"], n_random=settings["n_random"],
                     mask_ratio=settings["mask_ratio"], seed=settings["seed"], checkpoint_every=checkpoint_every)
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


class Batch:
    """One scanned batch through the base model: tokens, noise, MLP inputs, document bounds."""

    def __init__(self, model: DiffusionLM, loader: ShardLoader, index: int, s: ScanSettings, layers: list[int],
                 device, autocast) -> None:
        mc = model.cfg
        batch = loader.batch(index)
        B, T = batch.tokens.shape
        t, u = at_mask_ratio(train_noise(batch.index, index, B, s.seed + 2, T), s.mask_ratio)
        self.tokens, self.t = batch.tokens.to(device), t.to(device)
        noised = apply_noise(self.tokens, self.t, u.to(device), mc.mask_id, mc.bos_id, mc.pad_id)
        with torch.no_grad(), capture_mlps(model, layers) as seen, autocast:
            model(noised.inputs, select=torch.zeros_like(noised.mask))
        self.x = {layer: seen[layer][0].reshape(B * T, -1) for layer in layers}
        self.masked = noised.mask.reshape(-1)
        self.first, self.last = document_bounds(self.tokens, mc.bos_id)
        self.B, self.T, self.N = B, T, B * T
        self.offset = index * self.N  # global position of this batch's first token

    def windows(self, local: torch.Tensor, s: ScanSettings) -> torch.Tensor:
        """Flat in-batch indices (E, C) of the context windows around `local` positions, -1 outside."""
        row, col = local // self.T, local % self.T
        cols, _ = window_columns(col, self.first[row, col], self.last[row, col], s.context_before, s.context_after)
        return torch.where(cols >= 0, row[:, None] * self.T + cols, torch.full_like(cols, -1))


class LayerState:
    def __init__(self, num_latents: int, s: ScanSettings, pool: int, device) -> None:
        M = num_latents
        self.top = TopKBuffer(M, s.n_top, device)
        self.sample = TopKBuffer(M, s.sample_size, device)
        self.fire_count = torch.zeros(M, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(M, dtype=torch.float64, device=device)
        self.masked_count = torch.zeros(M, dtype=torch.long, device=device)
        self.tokens = PairCounter(device)
        self.pool_has = torch.zeros(pool, M, dtype=torch.bool, device=device)
        # filled between the passes / in pass 2
        self.chosen: dict[str, torch.Tensor] = {}  # category → (M, n) global positions, -1 for none
        self.win_tokens: dict[str, torch.Tensor] = {}  # category → (M, n, C) token ids, -1 outside
        self.win_acts: dict[str, torch.Tensor] = {}  # category → (M, n, C) activations
        self.t: dict[str, torch.Tensor] = {}  # category → (M, n) noise level of the pass
        self.masked: dict[str, torch.Tensor] = {}  # category → (M, n) whether the centre was masked
        self.win_masked: dict[str, torch.Tensor] = {}  # category → (M, n, C) whether each token was masked
        self.hist = torch.zeros(M, HIST_BINS, dtype=torch.long, device=device)

    def start_pass2(self, width: int) -> None:
        """Empty windows and histograms for the examples in `chosen` (pass 2 fills them)."""
        for cat, chosen in self.chosen.items():
            shape, device = chosen.shape, chosen.device
            self.win_tokens[cat] = torch.full((*shape, width), -1, dtype=torch.int32, device=device)
            self.win_acts[cat] = torch.zeros((*shape, width), device=device)
            self.t[cat] = torch.full(shape, float("nan"), device=device)
            self.masked[cat] = torch.zeros(shape, dtype=torch.bool, device=device)
            self.win_masked[cat] = torch.zeros((*shape, width), dtype=torch.bool, device=device)
        self.hist.zero_()

    def pass2_state_dict(self) -> dict:
        """What pass 2 changes (the rest is the merged pass-1 state, the same on every process)."""
        return {"hist": self.hist.cpu(), **{name: {k: v.cpu() for k, v in getattr(self, name).items()}
                                            for name in PASS2_WINDOWS}}

    def state_dict(self) -> dict:
        out = {"top": self.top.state_dict(), "sample": self.sample.state_dict(), "fire_count": self.fire_count.cpu(),
               "act_sum": self.act_sum.cpu(), "masked_count": self.masked_count.cpu(),
               "tokens": self.tokens.state_dict(), "pool_has": self.pool_has.cpu(), "hist": self.hist.cpu()}
        for name in WINDOW_FIELDS:
            out[name] = {k: v.cpu() for k, v in getattr(self, name).items()}
        return out

    def load_state_dict(self, state: dict, device) -> None:
        self.top.load_state_dict(state["top"])
        self.sample.load_state_dict(state["sample"])
        for name in ("fire_count", "act_sum", "masked_count", "pool_has", "hist"):
            setattr(self, name, state[name].to(device))
        self.tokens.load_state_dict(state["tokens"])
        for name in WINDOW_FIELDS:
            setattr(self, name, {k: v.to(device) for k, v in state[name].items()})


def active_features(tc: Transcoder, x: torch.Tensor, autocast):
    """Sparse (feature, activation, in-batch position) of every firing, and the encoding itself."""
    with torch.no_grad(), autocast:
        enc = tc.encode(x.float())
    acts, idx = enc.acts.float(), enc.indices
    on = acts > 0
    pos = torch.arange(len(x), device=x.device)[:, None].expand_as(idx)
    return idx[on], acts[on], pos[on], (acts, idx)


def _window_feature_acts(codes, flat: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Activation of `features` (E,) at window positions `flat` (E, C) (0 outside the window)."""
    acts, idx = codes
    safe = flat.clamp_min(0)
    hit = idx[safe] == features[:, None, None]  # (E, C, k)
    out = (acts[safe] * hit).sum(-1)
    return torch.where(flat >= 0, out, torch.zeros_like(out))


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


def choose_examples(st: LayerState, s: ScanSettings, pool_pos: torch.Tensor, gen: torch.Generator,
                    t_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Between the passes: quantile-spread activating examples and non-activating contexts whose noise
    levels follow the activating examples' (`t_of`: global positions → the t their sequence had)."""
    M = st.top.n_groups
    st.chosen["top"] = st.top.ids.clone()
    # activating examples spread over quantiles: from the uniform sample, minus the top-k positions
    ids, acts = st.sample.ids, st.sample.payload
    usable = ids >= 0
    for lo in range(0, M, 1024):  # chunks keep the (features, sample, k) comparison small
        hi = min(M, lo + 1024)
        usable[lo:hi] &= ~(ids[lo:hi, :, None] == st.top.ids[lo:hi, None, :]).any(-1)
    key = torch.where(usable, acts, torch.full_like(acts, float("-inf")))
    order = torch.argsort(key, dim=1, descending=True)
    count = usable.sum(1)  # (M,)
    q = s.n_quantile
    spread = ((torch.arange(q, device=ids.device) + 0.5) / q * count[:, None]).long()
    ranks = torch.where(count[:, None] >= q, spread, torch.arange(q, device=ids.device).expand(M, q))
    picked = ids.gather(1, order.gather(1, ranks.clamp_max(ids.shape[1] - 1)))
    st.chosen["quantile"] = torch.where(torch.arange(q, device=ids.device) < count[:, None], picked,
                                        torch.full_like(picked, -1))
    # non-activating contexts: pool windows where the feature fires nowhere, noise matched
    positives = torch.cat([st.chosen["top"], st.chosen["quantile"]], dim=1)  # (M, K)
    positive_bins = torch.where(positives >= 0, t_bin(t_of(positives.clamp_min(0))), torch.full_like(positives, -1))
    u = torch.rand(st.pool_has.shape, generator=gen, device=st.pool_has.device)
    prio = matched_keys(positive_bins, t_bin(t_of(pool_pos)), ~st.pool_has, u)
    n = min(s.n_random, len(pool_pos))
    best = prio.topk(n, dim=0)  # (n, M)
    chosen = torch.where(torch.isinf(best.values), torch.full_like(best.indices, -1), pool_pos[best.indices])
    st.chosen["random"] = torch.cat([chosen.T, torch.full((M, s.n_random - n), -1, dtype=torch.long,
                                                          device=chosen.device)], dim=1)


def state_file(state_path: Path, dist: Dist) -> Path:
    """This process's state file: `state_path` for one process, one per rank under torchrun."""
    return state_path if dist.world == 1 else state_path.with_name(
        f"{state_path.stem}.rank{dist.rank}of{dist.world}{state_path.suffix}")


def scan(model: DiffusionLM, transcoders: dict[int, Transcoder], loader: ShardLoader, s: ScanSettings, device,
         state_path: Path, autocast=None, dist: Dist | None = None) -> tuple[dict[int, LayerState], int]:
    """Run (or resume) both passes; returns the per-layer states (merged over the processes, on every one of
    them) and the number of tokens scanned."""
    job = ScanJob(model, transcoders, loader, s, device, state_path, autocast or contextlib.nullcontext(),
                  dist or Dist())
    phase, next_batch = job.restore()
    if job.dist.world > 1:
        phase, next_batch = job.align_passes(phase, next_batch)
    if phase == 1:
        job.run_pass(1, next_batch, job.collect)
        job.merge(1)
        job.choose_all_examples()
        phase, next_batch = 2, 0
        job.save(2, 0)
    job.run_pass(2, next_batch, job.fill_windows)
    job.merge(2)
    return job.states, job.n_total


class ScanJob:
    """One process's scan: what it reads (model, transcoders, batches), the random pool of positions for
    non-activating contexts, each layer's state, each scanned sequence's t, and this process's state file.
    `scan` runs its steps in order: restore, align the processes' passes, pass 1 (`collect`), merge, choose the
    examples, pass 2 (`fill_windows`), merge."""

    def __init__(self, model: DiffusionLM, transcoders: dict[int, Transcoder], loader: ShardLoader, s: ScanSettings,
                 device, state_path: Path, autocast, dist: Dist) -> None:
        self.model, self.transcoders, self.loader, self.s = model, transcoders, loader, s
        self.device, self.autocast, self.dist = device, autocast, dist
        self.requested_path, self.path = state_path, state_file(state_path, dist)
        self.layers = sorted(transcoders)
        self.n_total = s.n_batches * loader.batch_size * loader.seq_len
        pool_n = min(s.pool_size or max(256, 8 * s.n_random), self.n_total)
        draw = torch.randperm(self.n_total, generator=_generator("cpu", s.seed, 7))
        self.pool_pos = draw[:pool_n].sort().values.to(device)
        self.states = {layer: LayerState(transcoders[layer].cfg.num_latents, s, pool_n, device)
                       for layer in self.layers}
        self.seq_t = torch.full((s.n_batches, loader.batch_size), float("nan"), device=device)  # each sequence's t

    def state(self) -> dict:
        """Everything a resumed scan needs besides where it stopped (CPU tensors)."""
        return {"seq_t": self.seq_t.cpu(), "layers": {str(k): v.state_dict() for k, v in self.states.items()}}

    def load(self, state: dict) -> None:
        self.seq_t = state["seq_t"].to(self.device)
        for layer in self.layers:
            self.states[layer].load_state_dict(state["layers"][str(layer)], self.device)

    def save(self, phase: int, next_batch: int) -> None:
        save_checkpoint(self.path, {"phase": phase, "next_batch": next_batch, **self.state()})

    def restore(self) -> tuple[int, int]:
        """(pass, next batch) to continue from: this process's state file's, or (1, 0) for a fresh scan."""
        if not self.path.exists():
            if self.dist.main:
                note_other_process_counts(self.requested_path, self.dist)
            return 1, 0
        saved = load_checkpoint(self.path, self.device, require_model=False)
        if "seq_t" not in saved:
            raise UserError(f"{self.path} was written by an older version of the scan; delete it (or rerun with "
                            "--overwrite True) to scan again")
        self.load(saved)
        if self.dist.main:
            print(f"resuming the scan: pass {saved['phase']}, batch {saved['next_batch']}")
        return saved["phase"], saved["next_batch"]

    def align_passes(self, phase: int, next_batch: int) -> tuple[int, int]:
        """Under torchrun, (pass, next batch) with every process in the same pass. Killed between the processes'
        pass-2 checkpoints, a process in pass 2 holds the merged pass-1 state (the same on all of them); the
        others take it and begin pass 2."""
        phases = all_gather_states(self.dist, phase)
        if len(set(phases)) == 1:
            return phase, next_batch
        src = phases.index(2)
        shared = broadcast_state(self.dist, src, self.state() if self.dist.rank == src else None)
        if phase == 2:
            return phase, next_batch
        self.load(shared)
        for st in self.states.values():
            st.start_pass2(self.s.width)
        return 2, 0

    def run_pass(self, phase: int, begin: int, body: Callable[[Batch, int], None]) -> None:
        """`body(batch, b)` over this process's batches b ≥ `begin`, saving the state every --checkpoint_every."""
        s, dist = self.s, self.dist
        mine = [b for b in range(s.n_batches) if b % dist.world == dist.rank]
        todo = [b for b in mine if b >= begin]
        for i, b in enumerate(progress(todo, desc=f"pass {phase}/2", unit="batch", show=dist.main,
                                       initial=len(mine) - len(todo), total=len(mine))):
            body(Batch(self.model, self.loader, b, s, self.layers, self.device, self.autocast), b)
            if (len(mine) - len(todo) + i + 1) % s.checkpoint_every == 0 and b != mine[-1]:
                self.save(phase, b + 1)

    def merge(self, phase: int) -> None:
        """Under torchrun, every process's states after pass `phase` merged into one, on every process."""
        if self.dist.world == 1:
            return
        mine = {str(k): v.state_dict() if phase == 1 else v.pass2_state_dict() for k, v in self.states.items()}
        gathered = all_gather_states(self.dist, {"seq_t": self.seq_t.cpu(), "layers": mine})
        self.seq_t = _first_finite([g["seq_t"] for g in gathered]).to(self.device)
        for layer in self.layers:
            parts = [g["layers"][str(layer)] for g in gathered]
            pass1_state = self.states[layer].state_dict() if phase == 2 else None
            self.states[layer].load_state_dict(merge_states(parts, phase, pass1_state), self.device)

    def t_at(self, pos: torch.Tensor) -> torch.Tensor:
        """The noise level t of the sequence that holds each global position."""
        return self.seq_t.reshape(-1)[pos // self.loader.seq_len]

    def collect(self, batch: Batch, b: int) -> None:
        """Pass 1 over one batch: top-k and sample buffers, counts, the pool's firings, each sequence's t."""
        s, V = self.s, self.model.cfg.vocab_size
        in_pool = (self.pool_pos >= batch.offset) & (self.pool_pos < batch.offset + batch.N)
        pool_idx = torch.nonzero(in_pool)[:, 0]
        pool_win = batch.windows(self.pool_pos[pool_idx] - batch.offset, s)  # (P_b, C)
        tok_flat = batch.tokens.reshape(-1)
        self.seq_t[b] = batch.t
        for layer in self.layers:
            st = self.states[layer]
            f, a, pos, codes = active_features(self.transcoders[layer], batch.x[layer], self.autocast)
            st.top.merge(f, a, batch.offset + pos)
            prio = torch.rand(len(f), generator=_generator(self.device, s.seed, b, layer), device=self.device)
            st.sample.merge(f, prio, batch.offset + pos, payload=a)
            st.fire_count += torch.bincount(f, minlength=st.top.n_groups)
            st.act_sum.index_add_(0, f, a.double())
            st.masked_count += torch.bincount(f[batch.masked[pos]], minlength=st.top.n_groups)
            st.tokens.add(f * V + tok_flat[pos])
            if len(pool_idx):
                acts, idx = codes
                safe = pool_win.clamp_min(0)
                fires = (acts[safe] > 0) & (pool_win >= 0)[..., None]  # (P_b, C, k)
                rows = pool_idx[:, None, None].expand_as(fires)
                st.pool_has[rows[fires], idx[safe][fires]] = True

    def choose_all_examples(self) -> None:
        """Between the passes: every layer's quantile and non-activating examples, and empty windows for pass 2."""
        for layer in self.layers:
            st = self.states[layer]
            choose_examples(st, self.s, self.pool_pos, _generator(self.device, self.s.seed, 11, layer), self.t_at)
            st.start_pass2(self.s.width)

    def fill_windows(self, batch: Batch, b: int) -> None:
        """Pass 2 over one batch: the activation histograms, and the windows of the chosen examples it holds."""
        for layer in self.layers:
            st = self.states[layer]
            f, a, pos, codes = active_features(self.transcoders[layer], batch.x[layer], self.autocast)
            top_max = st.top.values[:, 0].clamp_min(1e-12)
            bins = (a / top_max[f] * HIST_BINS).long().clamp(0, HIST_BINS - 1)
            st.hist.index_put_((f, bins), torch.ones_like(f), accumulate=True)
            for cat in CATEGORIES:
                chosen = st.chosen[cat]
                here = (chosen >= batch.offset) & (chosen < batch.offset + batch.N)
                feat, slot = torch.nonzero(here, as_tuple=True)
                if not len(feat):
                    continue
                local = chosen[feat, slot] - batch.offset
                flat = batch.windows(local, self.s)
                tok_flat = batch.tokens.reshape(-1)
                st.win_tokens[cat][feat, slot] = torch.where(flat >= 0, tok_flat[flat.clamp_min(0)],
                                                             torch.full_like(flat, -1)).int()
                st.win_acts[cat][feat, slot] = _window_feature_acts(codes, flat, feat)
                st.t[cat][feat, slot] = batch.t[local // batch.T]
                st.masked[cat][feat, slot] = batch.masked[local]
                st.win_masked[cat][feat, slot] = batch.masked[flat.clamp_min(0)] & (flat >= 0)


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


def all_gather_states(dist: Dist, state):
    """Every process's state (CPU tensors), on every process."""
    import torch.distributed as torch_dist

    gathered: list = [None] * dist.world
    torch_dist.all_gather_object(gathered, state)
    return gathered


def broadcast_state(dist: Dist, src: int, state):
    """Process `src`'s state, on every process."""
    import torch.distributed as torch_dist

    box = [state]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def merge_topk(parts: list[dict], k: int) -> dict:
    """The buffers of processes that saw disjoint data, merged into the one buffer one process would hold
    after seeing it all: candidates enter in position order (one process's arrival order), so ties between
    equal values fall to the earlier position, as they do in one process."""
    values = torch.cat([p["values"] for p in parts], dim=1)
    ids = torch.cat([p["ids"] for p in parts], dim=1)
    payload = torch.cat([p["payload"] for p in parts], dim=1)
    groups = torch.arange(values.shape[0])[:, None].expand_as(ids)
    valid = ids >= 0
    order = torch.argsort(ids[valid], stable=True)
    buf = TopKBuffer(values.shape[0], k, dtype=values.dtype)
    buf.merge(groups[valid][order], values[valid][order], ids[valid][order], payload[valid][order])
    return buf.state_dict()


def merge_states(parts: list[dict], phase: int, base: dict | None = None) -> dict:
    """The states of processes that scanned disjoint batches in pass `phase` → the state of one process that
    scanned them all. Pass 1 merges whole LayerState.state_dict()s: buffers and counts. Pass 2 starts from the
    merged pass-1 state on every process (`base`, this process's whole state) and merges the processes'
    `pass2_state_dict()`s: histograms summed, each window from the process whose batch held it."""
    first = parts[0]
    if phase == 2 and base is None:
        raise ValueError("merging pass 2 needs this process's whole state (`base`)")
    out = dict(first if phase == 1 else base or {})
    if phase == 1:
        out["top"] = merge_topk([p["top"] for p in parts], first["top"]["values"].shape[1])
        out["sample"] = merge_topk([p["sample"] for p in parts], first["sample"]["values"].shape[1])
        for name in ("fire_count", "act_sum", "masked_count"):
            out[name] = sum(p[name] for p in parts)
        out["pool_has"] = torch.stack([p["pool_has"] for p in parts]).any(0)
        counter = PairCounter()
        for p in parts:
            counter.add_counts(p["tokens"]["keys"], p["tokens"]["counts"])
        out["tokens"] = counter.state_dict()
        return out
    out["hist"] = sum(p["hist"] for p in parts)
    for name in PASS2_WINDOWS:
        out[name] = {c: v.clone() for c, v in first[name].items()}
    for p in parts[1:]:
        for c in p["t"]:
            filled = torch.isfinite(p["t"][c])  # the slots whose batch this process scanned
            for name in PASS2_WINDOWS:
                out[name][c][filled] = p[name][c][filled]
    return out
