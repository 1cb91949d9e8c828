"""Run profiles and devices: how much compute a notebook, test or script may spend.

Every experiment in the course comes in three sizes, chosen by one word:

- ``smoke``: seconds on a CPU; checks that the code runs end to end (tests, CI).
- ``cpu``:   minutes on a laptop CPU; results that show the effect, at low quality.
- ``gpu``:   the full-size runs behind the README's result tables.

The word comes from the argument, else the environment variable ``FEWSTEP_PROFILE``,
else ``'gpu'`` when CUDA is available and ``'cpu'`` otherwise. What each profile means
for a given method (steps, batch size, network width) lives in ``recipes.py``; this
module only picks the word and the device. No paper: this is plumbing.
"""

from __future__ import annotations

import os

import torch

PROFILES = ("smoke", "cpu", "gpu")
PROFILE_ENV = "FEWSTEP_PROFILE"
DEVICE_ENV = "FEWSTEP_DEVICE"


def get_profile(name: str | None = None) -> str:
    """Return the run profile: `name`, else $FEWSTEP_PROFILE, else 'gpu' with CUDA, else 'cpu'."""
    source = "argument"
    if name is None:
        name = os.environ.get(PROFILE_ENV) or None  # an empty variable counts as unset
        source = f"environment variable {PROFILE_ENV}"
    if name is None:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, str) or name.strip().lower() not in PROFILES:
        valid = ", ".join(repr(p) for p in PROFILES)
        raise ValueError(
            f"unknown profile {name!r} (from the {source}); valid profiles are {valid}. "
            f"Pass one of them, or set the environment variable {PROFILE_ENV}, "
            f"e.g. {PROFILE_ENV}=smoke for a quick run."
        )
    return name.strip().lower()


def default_device() -> torch.device:
    """Return the best available device: CUDA, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_device(name: str | torch.device | None = None) -> torch.device:
    """Return the device `name` (e.g. 'cpu', 'cuda:1'), else $FEWSTEP_DEVICE, else default_device()."""
    source = "argument"
    if name is None:
        name = os.environ.get(DEVICE_ENV) or None
        source = f"environment variable {DEVICE_ENV}"
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"unknown device {name!r} (from the {source}): {err}. "
            f"Use 'cpu', 'cuda', 'cuda:<index>' or 'mps', or unset {DEVICE_ENV}."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} (from the {source}) needs CUDA, but this torch "
            f"({torch.__version__}) sees no CUDA GPU. Install a CUDA build of torch "
            f"(see the README) or use 'cpu'."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} (from the {source}) does not exist: "
            f"this machine has {torch.cuda.device_count()} CUDA device(s)."
        )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {name!r} (from the {source}) needs Apple MPS, which is not available; use 'cpu'.")
    return device
