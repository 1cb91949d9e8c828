"""Run profiles and devices: how much compute a notebook, test or script may spend.

Every experiment in the course comes in three sizes, chosen by one word:

- ``smoke``: seconds on a CPU; checks that the code runs end to end (tests, CI).
- ``cpu``:   minutes on a laptop CPU; results that show the effect, at low quality.
- ``gpu``:   the full-size runs behind the README's result tables.

The word comes from the argument, else the environment variable ``FEWSTEP_PROFILE``,
else ``'gpu'`` when CUDA is available and ``'cpu'`` otherwise. What each profile means
for a given method (steps, batch size, network width) lives in ``recipes.py``; this
module only picks the word and the device, and `setup_notebook` (the first cell of every
notebook) also sets torch's CPU threads for the machine. No paper: this is plumbing.
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


PROGRESS_ENV = "FEWSTEP_PROGRESS"
THREADS_ENV = "FEWSTEP_THREADS"


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show a progress bar: `progress` (None: yes), unless $FEWSTEP_PROGRESS is 0/false/no/off.

    The variable wins over the argument: `fewstep course` sets FEWSTEP_PROGRESS=0 so that the
    executed notebooks it writes (and commits, with --inplace) carry no progress bars, while the
    same notebooks keep their bars in JupyterLab.
    """
    if os.environ.get(PROGRESS_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return True if progress is None else bool(progress)


def _usable_cores() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def auto_threads() -> tuple[int, str]:
    """Torch threads for CPU work on this machine, and why: $FEWSTEP_THREADS, $OMP_NUM_THREADS, else the idle cores.

    Idle cores = usable cores minus the 1-minute load average (rounded), at least 1. On a busy
    2-core machine two torch threads made the course's small models up to 10x slower than one
    (notebooks 01-04 and 06, measured): threads that wait for each other on taken cores cost more
    than they save. On an idle machine every core is used.
    """
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (a number of threads)")
            return int(value), f"from {name}"
    cores = _usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return cores, f"{cores} cores"
    return max(1, cores - int(load + 0.5)), f"{cores} cores, load {load:.1f}"


def setup_notebook(profile: str | None = None, threads: int | None = None,
                   device: str | torch.device | None = None) -> tuple[str, torch.device]:
    """First cell of every notebook: pick profile and device, set torch's CPU threads, print one line.

    `threads` (None: `auto_threads()`) sets `torch.set_num_threads` when the device is the CPU;
    with a GPU the CPU threads are left as torch chose. Returns (profile, device).
    """
    profile, device = get_profile(profile), get_device(device)
    note = "GPU run: CPU threads left as they are"
    if device.type == "cpu":
        if threads is None:
            threads, why = auto_threads()
        elif not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        else:
            why = "as asked"
        torch.set_num_threads(threads)
        note = f"{threads} torch thread{'s' if threads > 1 else ''} ({why})"
    print(f"profile {profile!r}, device {device}, {note}, torch {torch.__version__}")
    return profile, device
