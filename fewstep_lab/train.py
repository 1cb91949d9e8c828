"""One small training loop for every method of the course.

A method is a per-sample loss function ``loss_fn(model, batch, ctx) -> (B,) tensor`` plus a
batch function ``batch_fn(generator) -> batch``; the loop owns the optimiser (Adam/AdamW with
linear warm-up), gradient clipping, exponential moving averages (EMA; Polyak averaging as in
Ho et al. 2020, sec. 4 and Song et al. 2023's target network theta^-), bf16 autocast, checkpoints
and hooks. Randomness is re-seeded from (seed, step) at every step, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have (on the same device).
Checkpoints hold only tensors and plain data (``torch.load(weights_only=True)``): loading one
never executes pickled code, and a file that is not a readable checkpoint raises `CheckpointError`.
Checkpoints are written atomically (io.atomic_write) under a lock file (io.FileLock), so a crash or a
full disk keeps the previous checkpoint and two runs never write the same one. A non-finite loss,
gradient or parameter stops training with `NonFiniteLossError` before anything is saved, so the
checkpoint on disk is always the last good one. With ``distributed=True``
(several processes started by torchrun, see distributed.py) the model is wrapped in
DistributedDataParallel, which averages gradients over the ranks (data parallelism, Li et al.
2020, "PyTorch Distributed"); each rank draws its own data from (seed, step, rank).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

# Checkpoint files live in checkpoints.py; re-exported here, where they always were.
from .checkpoints import CHECKPOINT_KEYS, CheckpointError, load_checkpoint, read_checkpoint_meta, save_checkpoint  # noqa: F401
from .io import FileLock
from .profiles import get_device, progress_enabled

__all__ = [
    "NonFiniteLossError",
    "CheckpointError",
    "TrainContext",
    "TrainState",
    "train",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "ema_update",
    "step_generator",
]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss, gradient or parameter; the last good checkpoint is kept."""


@dataclass
class TrainContext:
    """What a loss function may read: step, total steps, the EMA copies, a seeded generator."""

    step: int
    steps: int
    emas: Mapping[str, nn.Module]
    generator: torch.Generator
    device: torch.device

    @property
    def progress(self) -> float:
        """Training progress in [0, 1] (for curricula such as CT's N(k))."""
        return self.step / max(self.steps, 1)


@dataclass
class TrainState:
    model: nn.Module
    emas: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: list = field(default_factory=list)  # (step, mean loss) pairs
    seconds: float = 0.0


# Rank r's seeds are offset by r * RANK_STRIDE. Not a power of two: torch's CPU generator keeps only
# the low 32 bits of a seed, so an offset of 2^48 would give every rank the same data.
RANK_STRIDE = 2_654_435_761


def step_generator(seed: int, step: int, device="cpu", rank: int = 0) -> torch.Generator:
    """The generator of one training step: a pure function of (seed, step, rank); rank 0 = a single process."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + rank * RANK_STRIDE)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta (buffers copied)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def lr_at(step: int, steps: int, lr: float, warmup: int = 0, schedule: str = "constant") -> float:
    """Learning rate at `step`: linear warm-up over `warmup` steps, then constant or cosine decay to 0."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose 'constant' or 'cosine'")
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(steps - warmup, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr


def _decay(d, step: int) -> float:
    value = d(step) if callable(d) else d
    if not 0 <= value <= 1:
        raise ValueError(f"an EMA decay must lie in [0, 1], got {value}")
    return float(value)


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any, TrainContext], torch.Tensor],
    batch_fn: Callable[[torch.Generator], Any],
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup: int = 0,
    lr_schedule: str = "constant",
    grad_clip: float | None = 1.0,
    ema_decays: Mapping[str, float | Callable[[int], float]] | None = None,
    seed: int = 0,
    device=None,
    bf16: bool = False,
    checkpoint_path=None,
    checkpoint_every: int = 0,
    resume: bool = True,
    meta: Mapping[str, Any] | None = None,
    hooks: Sequence[tuple[int, Callable[[TrainState], None]]] = (),
    log_every: int = 100,
    progress: bool | None = True,
    distributed: bool = False,
) -> TrainState:
    """Train `model` for `steps` optimiser steps (AdamW); returns the final TrainState.

    ema_decays maps a name to a decay (or a function of the step), e.g. {"ema": 0.999}; each
    EMA copy is passed to the loss through ctx.emas (consistency distillation's target network
    is one). hooks are (every, fn(state)) pairs. With checkpoint_path and resume=True an
    existing checkpoint is continued. distributed=True needs an initialised process group
    (distributed.init_distributed): the loss sees the DDP-wrapped model, gradients are averaged
    over ranks, the logged loss is the mean over ranks, and hooks, the progress bar and
    checkpoints run on rank 0 only (the EMA copies are identical on every rank). progress shows a
    tqdm bar (None: on); the environment variable FEWSTEP_PROGRESS=0 turns every bar off (fewstep
    course sets it, so that executed notebooks are committed without bars). A checkpoint_path is
    locked for the run (io.FileLock): a second run on it raises io.LockedError.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    lr_at(0, steps, lr, warmup, lr_schedule)  # validates the schedule's name
    device = get_device(device)
    model.to(device)
    emas = {k: copy.deepcopy(model).requires_grad_(False) for k in (ema_decays or {})}
    net, rank, world = model, 0, 1
    if distributed:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("train(distributed=True) needs a process group: start the script with torchrun "
                               "and call fewstep_lab.distributed.init_distributed() first")
        rank, world = dist.get_rank(), dist.get_world_size()
        # DDP copies rank 0's weights to every rank when it is built; the EMA copies follow them
        # (a resumed run then overwrites both from the checkpoint, identically on every rank).
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        for ema in emas.values():
            ema.load_state_dict(model.state_dict())
    main = rank == 0
    # One writer per checkpoint: a second run on the same path is refused (stale locks of dead PIDs are
    # taken over); released at the end, also when training raises.
    lock = FileLock(checkpoint_path, purpose="training into") if checkpoint_path is not None and main else None
    with lock or contextlib.nullcontext():
        state = _loop(model, net, emas, loss_fn, batch_fn, steps=steps, lr=lr, weight_decay=weight_decay,
                      betas=betas, warmup=warmup, lr_schedule=lr_schedule, grad_clip=grad_clip,
                      ema_decays=ema_decays, seed=seed, device=device, bf16=bf16, checkpoint_path=checkpoint_path,
                      checkpoint_every=checkpoint_every, resume=resume, meta=meta, hooks=hooks,
                      log_every=log_every, progress=progress_enabled(progress) and main, rank=rank,
                      world=world if distributed else None)
    if distributed:
        dist.barrier()  # every rank returns only once the final checkpoint exists
    for m in (model, *emas.values()):
        m.eval()
    return state


def _stop(what: str, value: float, step: int, checkpoint_path, saved_step: int | None, fix: str):
    """NonFiniteLossError whose message says truthfully which checkpoint (if any) is on disk."""
    if checkpoint_path is None:
        kept = "no checkpoint was requested"
    elif saved_step is None:
        kept = f"nothing was written to {checkpoint_path}"
    else:
        kept = f"the last good checkpoint ({checkpoint_path}, step {saved_step}) was kept"
    return NonFiniteLossError(f"{what} became {value} at step {step}; {kept}. {fix}")


def _loop(model, net, emas, loss_fn, batch_fn, *, steps, lr, weight_decay, betas, warmup, lr_schedule, grad_clip,
          ema_decays, seed, device, bf16, checkpoint_path, checkpoint_every, resume, meta, hooks, log_every,
          progress, rank, world):
    """The body of `train` (world=None: one process)."""
    main = rank == 0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    state = TrainState(model=model, emas=emas, optimizer=opt)
    saved_step = None  # the step of the checkpoint on disk, when there is one
    if checkpoint_path is not None and resume and Path(checkpoint_path).is_file():
        load_checkpoint(checkpoint_path, model, which="model", state=state)
        saved_step = state.step
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    params = [p for p in model.parameters()]

    from tqdm.auto import tqdm

    running, t0 = [], time.perf_counter()
    with tqdm(total=steps, initial=state.step, disable=not progress, desc="train") as bar:
        while state.step < steps:
            step = state.step
            g = step_generator(seed, step, rank=rank)
            torch.manual_seed(seed * 1_000_003 + step + rank * RANK_STRIDE)  # dropout and other global-RNG users
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup, lr_schedule)
            net.train()
            batch = batch_fn(g)
            ctx = TrainContext(step=step, steps=steps, emas=emas, generator=g, device=device)
            with autocast:
                loss = loss_fn(net, batch, ctx).float().mean()
            mean_loss = loss.detach().clone()
            if world is not None:  # the mean over ranks: a NaN on any rank reaches all, so all stop together
                import torch.distributed as dist

                dist.all_reduce(mean_loss)
                mean_loss /= world
            if not torch.isfinite(mean_loss):
                raise _stop("loss", mean_loss.item(), step, checkpoint_path, saved_step,
                            "Lower the learning rate, enable gradient clipping, or check the data for NaN.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # The gradient norm is checked with or without clipping: a finite loss can still have inf gradients.
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if not torch.isfinite(norm):
                raise _stop("gradient norm", norm.item(), step, checkpoint_path, saved_step,
                            "Lower the learning rate or enable gradient clipping (grad_clip).")
            if grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
            opt.step()
            # An overflow in the optimiser step itself would reach the weights: check them before any EMA or save.
            pnorm = torch.nn.utils.get_total_norm(params)
            if not torch.isfinite(pnorm):
                raise _stop("parameter norm", pnorm.item(), step, checkpoint_path, saved_step,
                            "Lower the learning rate.")
            for name, ema in emas.items():
                ema_update(ema, model, _decay(ema_decays[name], step))
            state.step += 1
            running.append(mean_loss.item())
            if state.step % log_every == 0 or state.step == steps:
                state.losses.append((state.step, sum(running) / len(running)))
                bar.set_postfix(loss=f"{state.losses[-1][1]:.4f}")
                running = []
            bar.update(1)
            state.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            for every, fn in hooks:
                if every and state.step % every == 0 and main:
                    fn(state)
            if checkpoint_path is not None and checkpoint_every and state.step % checkpoint_every == 0 and main:
                save_checkpoint(checkpoint_path, state, meta)
                saved_step = state.step
    if checkpoint_path is not None and main and saved_step != state.step:  # a finished run loaded is not rewritten
        save_checkpoint(checkpoint_path, state, meta)
    return state
