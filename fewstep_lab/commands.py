"""What each ``fewstep`` sub-command does (cli.py parses; this module turns arguments into pipeline calls).

Outputs are checked before any work starts (a folder or an unwritable place given as --out
fails at once, not after training) and written atomically (a temporary file, then a rename),
so an interrupted or failed write never leaves half a file where the old one was (``io.atomic_write``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cmd_train", "cmd_sample", "cmd_eval", "cmd_course", "cmd_bench", "cmd_data", "cmd_autoencoder",
           "check_output_path"]


def check_output_path(path, suffixes=None) -> Path:
    """Fail now, with the fix, if `path` cannot be written as a file (a folder, a bad suffix, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path inside it, e.g. {path / ('out' + (suffixes or ['.pt'])[0])}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"unknown output type {path.suffix or '(none)'!r} for {path}; use one of {', '.join(suffixes)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create the folder {path.parent} for {path}: {err.strerror}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {path}: no permission; choose another place")
    return path


def _load(ckpt: str, profile=None, device=None):
    """(model, run) of a checkpoint, or of 'exact:<dataset>' (the closed-form denoiser with EDM's sampler)."""
    from .pipeline import load_run, make_domain, make_run

    if ckpt.startswith("exact:"):
        run = make_run("edm", ckpt.split(":", 1)[1], profile)
        if getattr(make_domain(run), "num_classes", None) is not None:
            run = make_run("edm-cfg", ckpt.split(":", 1)[1], profile)  # labelled: a class-conditional teacher
        D = make_domain(run).exact_denoiser
        if D is None:
            raise ValueError(f"{ckpt}: {run.data_recipe.dataset!r} has no closed-form denoiser (it is sample-only); "
                             "choose a mixture such as 8gaussians or checkerboard")
        return D, run
    return load_run(ckpt, device=device or "cpu")


def cmd_train(a) -> None:
    from .distributed import close_distributed, init_distributed
    from .pipeline import make_run, train_run
    from .profiles import get_profile
    from .recipes import apply_overrides, parse_assignment

    out = check_output_path(a.out)
    profile = get_profile(a.profile)
    run = make_run(a.method, a.data, profile, **{k: v for k, v in (("steps", a.steps), ("seed", a.seed))
                                                 if v is not None})
    for text in a.set:
        which, name, value = parse_assignment(text, [run.recipe, run.data_recipe])
        key = ("recipe", "data_recipe")[which]
        run = type(run)(**{**run.__dict__, key: apply_overrides(getattr(run, key), {name: value})})
    info = init_distributed(a.device)  # under torchrun: join the group; alone: a single process
    try:
        _, state = train_run(run, teacher=a.teacher, checkpoint_path=out, device=info.device,
                             progress=not a.quiet and info.is_main, restart=a.restart,
                             checkpoint_every=max(run.recipe.steps // 10, 1), distributed=info.distributed,
                             root=a.root)
    finally:
        close_distributed()
    if info.is_main:
        last = f"{state.losses[-1][1]:.4f}" if state.losses else "n/a"
        print(f"trained {run.method} on {a.data} ({profile} profile, {info.world_size} process(es)) for "
              f"{state.step} steps in {state.seconds:.1f} s; last loss {last}; checkpoint {out}")


def cmd_sample(a) -> None:
    import numpy as np

    from .io import atomic_write
    from .pipeline import sample

    out = check_output_path(a.out, [".png", ".npy", ".csv"])
    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    if a.steps is not None and a.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {a.steps}")
    D, run = _load(a.ckpt, device=a.device)
    labels = _labels(a, run, a.n)
    x = sample(D, run, a.n, steps=a.steps, sampler=a.sampler, seed=a.seed, batch_size=256 if run.data != "toy2d"
               else None, labels=labels, w=a.w)
    if out.suffix == ".csv" and x.ndim != 2:
        raise ValueError("--out .csv holds 2-D points; for images use .png or .npy")
    arr = x.numpy()
    # Written to a temporary file and renamed: a failure (a full disk) keeps any old file intact.
    with atomic_write(out, "w" if out.suffix == ".csv" else "wb") as fh:
        if out.suffix == ".png":
            _save_png(arr, run, fh)
        elif out.suffix == ".npy":
            np.save(fh, arr)
        else:
            np.savetxt(fh, arr, delimiter=",", header="x,y", comments="")
    print(f"wrote {a.n} samples of {run.method} ({run.data}) to {out}")


def _labels(a, run, n: int):
    """--label C for one class; for a class-conditional model without --label, n labels cycling over classes."""
    import torch

    from .methods import get_method
    from .pipeline import make_domain

    if not get_method(run.method).needs_labels:
        if a.label is not None or a.w is not None:
            raise ValueError(f"{run.method} models are unconditional: drop --label and --w")
        return None
    domain = make_domain(run)
    k = domain.num_classes
    if a.label is None:  # the data's own classes in equal shares
        return domain.balanced_labels(n) if hasattr(domain, "balanced_labels") else torch.arange(n) % k
    if not 0 <= a.label < k:
        raise ValueError(f"--label must be a class in 0..{k - 1}, got {a.label}")
    return torch.full((n,), a.label, dtype=torch.long)


def _save_png(arr, run, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    if arr.ndim == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(arr[:, 0], arr[:, 1], s=1, alpha=0.4, rasterized=True)
        ax.set_aspect("equal")
    else:
        from .data.cifar10_domain import image_grid

        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(image_grid(torch.from_numpy(arr[:64])))
        ax.axis("off")
    ax.set_title(f"{run.method} on {run.data}")
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def cmd_eval(a) -> None:
    from .methods import get_method
    from .pipeline import evaluate, make_domain

    if (a.seeds is not None and a.seeds < 1) or (a.n is not None and a.n < 2):
        raise ValueError("--n must be >= 2 and --seeds >= 1")
    if any(s < 1 for s in a.steps or []):
        raise ValueError("--steps must be >= 1")
    D, run = _load(a.ckpt, a.profile, a.device)
    if a.w is not None and not get_method(run.method).needs_labels:
        raise ValueError(f"{run.method} models are unconditional: drop --w")
    domain = make_domain(run, root=a.root)
    n, seeds = a.n or domain.default_n, tuple(range(a.seeds or domain.default_seeds))
    print(f"{run.method} on {run.data} ({getattr(run.data_recipe, 'dataset', '') or run.data_recipe}), "
          f"n = {n}, {len(seeds)} seeds")
    for steps in a.steps or [None]:
        res = evaluate(D, run, steps=steps, sampler=a.sampler, n=n, seeds=seeds, domain=domain, progress=True,
                       w=a.w)
        print(res.row())
    floor = domain.class_floor(n, seeds) if hasattr(domain, "class_floor") and domain.num_classes else \
        domain.floor(n, seeds)
    print(f"{'data vs data':>14} (noise floor)              {domain.metric} {floor[0]:.4f} ± {floor[1]:.4f}")


def cmd_course(a) -> None:
    student, slides = getattr(a, "student", None), getattr(a, "slides", None)
    if student is None and slides is None:
        from .course import run_course

        run_course(profile=a.profile, out_dir=a.out, only=a.only, inplace=a.inplace)
        return
    if a.inplace:
        raise ValueError("--inplace executes the notebooks; it does not go with --student or --slides")
    if student is not None:
        from .student import build_student_edition

        counts = build_student_edition(student, only=a.only)
        width = max(len(name) for name in counts) + 2
        print(f"student edition in {student}")
        print(f"{'notebook':<{width}}{'exercises':>10}")
        for name, count in counts.items():
            print(f"{name:<{width}}{count:>10}")
        print(f"{'total':<{width}}{sum(counts.values()):>10}")
    if slides is not None:
        from .slides import build_slides

        for name, deck in build_slides(slides, only=a.only).items():
            print(f"{name} -> {deck}")


def cmd_bench(a) -> None:
    from .bench import run_bench

    run_bench(profile=a.profile, datasets=a.datasets, seeds=a.seeds, n=a.n, out_dir=a.out, device=a.device)


def cmd_data(a) -> None:
    from .data import images

    if a.download:
        root = Path(a.root or "data/cifar10")
        images.download_cifar10(root)
        print(f"downloaded CIFAR-10 to {root}")
        return
    print(f"CIFAR-10 found at {images.find_cifar10(a.root)}")


def cmd_autoencoder(a) -> None:
    from .autoencoder import autoencoder_recipe, evaluate_autoencoder, train_autoencoder
    from .profiles import get_profile
    from .recipes import apply_overrides, parse_assignment

    out = check_output_path(a.out)
    if a.n < 2:
        raise ValueError(f"--n must be >= 2, got {a.n}")
    profile = get_profile(a.profile)
    recipe = autoencoder_recipe(profile)
    for text in a.set:
        _, name, value = parse_assignment(text, [recipe])
        recipe = apply_overrides(recipe, {name: value})
    ae = train_autoencoder(recipe, checkpoint_path=out, progress=not a.quiet, root=a.root, restart=a.restart,
                           device=a.device, checkpoint_every=max(recipe.steps // 10, 1))
    ev = evaluate_autoencoder(ae, recipe, n=a.n, root=a.root)
    c, h, w = ae.latent_shape
    print(f"autoencoder on {a.data} ({profile} profile): {recipe.resolution}x{recipe.resolution}x3 -> {c}x{h}x{w}, "
          f"scaling factor {float(ae.scaling_factor):.4f}; checkpoint {out}")
    print(f"PSNR {ev['psnr']:.2f} dB on {ev['n_test']} test images ({ev['psnr_train']:.2f} dB on training images); "
          f"FD of {ev['n']} reconstructions {ev['fd_recon']:.4f} vs {ev['fd_floor']:.4f} for the images themselves")
