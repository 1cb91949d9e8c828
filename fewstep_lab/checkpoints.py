"""Checkpoint files of the training loop: written atomically, read without running code, checked.

A checkpoint is one ``torch.save`` file of state dicts, plain numbers and a JSON string (the
recipe and other metadata); ``CHECKPOINT_KEYS`` lists its entries. Writing goes through
``io.atomic_write`` (unique temporary file, fsync, ``os.replace``), so a crash or a full disk
keeps the previous checkpoint. Reading uses ``torch.load(weights_only=True)`` (never pickled
code) and turns every way a file can be wrong (empty, truncated, random bytes, text, missing or
mistyped entries, bad metadata) into one `CheckpointError` naming the file; torch's own advice
to retry with ``weights_only=False`` is never passed on. No paper: this is plumbing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from .io import atomic_write

if TYPE_CHECKING:
    from .train import TrainState

__all__ = ["CheckpointError", "CHECKPOINT_KEYS", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta"]


class CheckpointError(ValueError):
    """A file is not a fewstep checkpoint, or is damaged (empty, truncated, missing entries)."""


# What every checkpoint holds, and the type of each entry.
CHECKPOINT_KEYS = {"model": dict, "emas": dict, "optimizer": dict, "step": int, "losses": list,
                   "seconds": float, "meta_json": str}


def save_checkpoint(path, state: TrainState, meta: Mapping[str, Any] | None = None) -> None:
    """Write tensors and JSON metadata atomically (io.atomic_write): a crash or a full disk keeps the old file."""
    blob = {
        "model": state.model.state_dict(),
        "emas": {k: v.state_dict() for k, v in state.emas.items()},
        "optimizer": state.optimizer.state_dict(),
        "step": state.step,
        "losses": [[int(s), float(v)] for s, v in state.losses],
        "seconds": float(state.seconds),
        "meta_json": json.dumps(dict(meta or {})),
    }
    with atomic_write(path, "wb") as f:  # unique temporary name, fsync, os.replace
        torch.save(blob, f)


def _damaged(path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a fewstep checkpoint or is damaged ({why}); "
                           "retrain it (fewstep train ... --out it) or pass the right file")


def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one first (fewstep train ...)")
    if path.stat().st_size == 0:
        raise _damaged(path, "the file is empty")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own messages suggest weights_only=False: never pass that on
        kind = "it holds objects other than tensors and plain data" if "Weights only" in str(err) else \
            f"unreadable: {type(err).__name__}"
        raise _damaged(path, kind) from None
    if not isinstance(blob, dict):
        raise _damaged(path, f"it holds a {type(blob).__name__}, not a dict")
    missing = sorted(k for k in CHECKPOINT_KEYS if k not in blob)
    if missing:
        raise _damaged(path, f"missing entries {missing}")
    wrong = sorted(k for k, t in CHECKPOINT_KEYS.items() if not isinstance(blob[k], t))
    if wrong:
        raise _damaged(path, f"entries of the wrong type: {wrong}")
    try:
        meta = json.loads(blob["meta_json"])
    except ValueError:
        raise _damaged(path, "its metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _damaged(path, f"its metadata is a {type(meta).__name__}, not a JSON object")
    blob["meta"] = meta
    return blob


def read_checkpoint_meta(path) -> dict:
    """The JSON metadata stored with a checkpoint (recipe, network arguments, step)."""
    blob = _read(path)
    return {**blob["meta"], "step": blob["step"]}


def load_checkpoint(path, model: nn.Module, *, which: str = "ema", state: TrainState | None = None) -> dict:
    """Load weights into `model` ('model' or an EMA name); with `state`, restore everything to resume."""
    blob = _read(path)
    if which == "model":
        model.load_state_dict(blob["model"])
    elif which in blob["emas"]:
        model.load_state_dict(blob["emas"][which])
    else:
        raise KeyError(f"checkpoint has no weights {which!r}; available: ['model', *{sorted(blob['emas'])}]")
    if state is not None:
        state.model.load_state_dict(blob["model"])
        for k, v in blob["emas"].items():
            if k in state.emas:
                state.emas[k].load_state_dict(v)
        state.optimizer.load_state_dict(blob["optimizer"])
        state.step = int(blob["step"])
        state.losses = [tuple(x) for x in blob["losses"]]
        state.seconds = float(blob["seconds"])
    return {**blob["meta"], "step": blob["step"]}
