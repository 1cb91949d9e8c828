"""One pipeline for every (method, data) pair: make a run, build its model, train, load, sample, evaluate.

A run is (method recipe, data recipe, profile) (``recipes.Run``). The method (``methods/``) says
how the model is built, trained and sampled; the domain (``data/domain.py``) says what the data
are, which network fits them and how samples are scored. This module composes the two and
knows neither: ``fewstep train/sample/eval``, ``fewstep bench``, torchrun and the notebooks all
come through here. Checkpoints store the run as JSON (``Run.to_dict``) beside state dicts and
load back through the registries: no pickled code ever runs. No paper: this is plumbing.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from .data.registry import get_domain, resolve_data
from .methods import get_method
from .methods.base import tagged_path
from .profiles import PROFILES, get_profile
from .io import LockedError
from .recipes import Run, apply_overrides, recipe_from_fields
from .train import TrainState, load_checkpoint, read_checkpoint_meta, train

__all__ = ["make_run", "make_domain", "build_model", "train_run", "load_or_train", "load_run", "load_teacher", "run_from_dict",
           "default_sigmas", "condition", "sample", "evaluate", "RunMismatchError"]


class RunMismatchError(ValueError):
    """A checkpoint path already holds a different run; it is never overwritten without restart."""


def make_run(method: str, data: str = "toy2d", profile: str | None = None, **overrides) -> Run:
    """The run of `method` on `data` (a domain or toy dataset name) under `profile`.

    Keyword overrides go to the method recipe when it has the field, else to the data recipe
    (e.g. ``make_run("cd", "8gaussians", "cpu", steps=100, hidden=64)``).
    """
    m, profile = get_method(method), get_profile(profile)
    domain_name, data_fields = resolve_data(data)
    dom = get_domain(domain_name)
    recipe_names = {f.name for f in fields(m.recipe_cls)}
    defaults = {k: v for k, v in dom.train_defaults.get(profile, {}).items() if k in recipe_names}
    recipe = apply_overrides(m.recipe_cls(), {**defaults, **m.table(domain_name, profile)})
    data_recipe = apply_overrides(dom.recipe_cls(), {**dom.profiles.get(profile, {}), **data_fields})
    mine = {k: v for k, v in overrides.items() if k in recipe_names}
    recipe, data_recipe = apply_overrides(recipe, mine), apply_overrides(data_recipe, {
        k: v for k, v in overrides.items() if k not in mine})
    return Run(method=method, recipe=recipe, data=domain_name, data_recipe=data_recipe, profile=profile)


def make_domain(run: Run, *, root=None, **kwargs):
    """The run's data domain instance (images are loaded on first use; `root` is the data folder)."""
    return get_domain(run.data)(run.data_recipe, root=root, **kwargs)


def build_model(run: Run, domain=None) -> nn.Module:
    """The run's fresh model: the domain's network, wrapped by the method. Initial weights depend only
    on the recipe's seed (drawn in a forked RNG: the caller's global random state is left as it was)."""
    method, domain = get_method(run.method), domain or make_domain(run)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.recipe.seed)
        options = method.net_options(run.recipe)
        if method.uses_labels(run.recipe) and "num_classes" not in options:  # (a method may bring its own: lcf)
            # A method that trains on labels gets a class-conditional net (label num_classes = none).
            if getattr(domain, "num_classes", None) is None:
                raise ValueError(f"{run.method} trains on class labels; {run.data} "
                                 f"({getattr(run.data_recipe, 'dataset', run.data)}) has none: use labelled data, "
                                 "e.g. 8gaussians-4class")
            options = {"num_classes": domain.num_classes, **options}
        net = domain.make_net(dropout=run.recipe.dropout, **options)
        return method.build(run.recipe, net)


def run_from_dict(d, *, source: str = "the checkpoint") -> Run:
    """Rebuild a Run stored by Run.to_dict: registered names and validated fields only (no code runs)."""
    if isinstance(d, dict) and "class" in d and "format" not in d:
        raise ValueError(f"{source} was written by an older fewstep_lab (recipe class {d.get('class')!r}, before "
                         "methods x data); this version cannot load it: retrain it with fewstep train "
                         "--method M --data D --out PATH --restart")
    if not isinstance(d, dict) or d.get("format") != 2:
        raise ValueError(f"{source} holds no fewstep run description (format 2); retrain it with fewstep train")
    try:
        method, dom = get_method(d["method"]), get_domain(d["data"])
        profile = d["profile"]
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}")
        return Run(method=d["method"], recipe=recipe_from_fields(method.recipe_cls, d["recipe"]), data=d["data"],
                   data_recipe=recipe_from_fields(dom.recipe_cls, d["data_recipe"]), profile=profile)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source} has an invalid run description ({err}); retrain it with fewstep train") from None


def _comparable(d: dict) -> dict:
    """A stored run without the fields that may change on resume (training length), as JSON sees it
    (a fresh run's tuples, e.g. channel_mult, come back from a checkpoint as lists)."""
    d = json.loads(json.dumps(d))
    return {**d, "recipe": {k: v for k, v in d.get("recipe", {}).items() if k != "steps"}}


def _check_resume(path: Path, run: Run) -> None:
    if not path.is_file():
        return
    stored = read_checkpoint_meta(path).get("run")
    if stored is None or _comparable(stored) != _comparable(run.to_dict()):
        what = "an older or foreign checkpoint" if stored is None else (
            f"a different run ({stored.get('method')} on {stored.get('data')}, or other settings)")
        raise RunMismatchError(f"{path} holds {what}, not this {run.describe()}: pass --restart (restart=True) to "
                               "replace it (the old file stays until the new one is written), or choose another --out")


def load_teacher(teacher, run: Run, domain=None):
    """A teacher denoiser for `run`: 'exact' (the data's closed-form denoiser), a checkpoint path, or a module.

    A checkpoint must hold a diffusion teacher (a method with is_teacher) trained on the same data (on the
    same domain only, when the run's method has teacher_same_data = False: a style LoRA's base model).
    """
    if teacher is None or isinstance(teacher, nn.Module) or callable(teacher):
        return teacher
    domain = domain or make_domain(run)
    if teacher == "exact":
        if domain.exact_denoiser is None:
            raise ValueError(f"--teacher exact needs data with a closed-form denoiser; {run.data} "
                             f"({getattr(run.data_recipe, 'dataset', run.data)}) has none: pass a checkpoint")
        return domain.exact_denoiser
    model, t_run = load_run(teacher)
    if not get_method(t_run.method).is_teacher:
        raise ValueError(f"{teacher} holds a {t_run.method} model; {run.method} distils a diffusion teacher: "
                         f"train one with fewstep train --method edm --data ... and pass it as --teacher")
    same = domain.same_data(t_run.data_recipe) or not get_method(run.method).teacher_same_data
    if t_run.data != run.data or not same:
        raise ValueError(f"the teacher {teacher} was trained on other data ({t_run.data}: {t_run.data_recipe}) than "
                         f"this run asks for ({run.data}: {run.data_recipe}); use the same data and profile")
    return model


def train_run(run: Run, *, wait_s: float = 0.0, **kwargs) -> tuple[nn.Module, TrainState]:
    """Train `run` (resuming from checkpoint_path unless restart); returns (the model to sample, its state).

    teacher: for distillation methods, a denoiser, a checkpoint path or 'exact'. A checkpoint
    path that holds another run is refused (RunMismatchError) unless restart=True; with restart the
    old file is replaced only when the new run writes its first checkpoint. A checkpoint another
    process is training into is refused (io.LockedError), or, with wait_s > 0, waited for (up to
    wait_s seconds; notebooks that share a model) and then loaded or resumed.
    """
    t0, told = time.monotonic(), False
    while True:
        try:
            return _train_run(run, **kwargs)
        except LockedError:
            if time.monotonic() - t0 >= wait_s:
                raise
            if not told:
                print(f"another process is training {kwargs.get('checkpoint_path')}: waiting for it", flush=True)
                told = True
            time.sleep(2.0)


def _train_run(run: Run, *, teacher=None, checkpoint_path=None, device=None, progress: bool = True,
              restart: bool = False, checkpoint_every: int = 0, hooks=(), distributed: bool = False,
              domain=None, root=None) -> tuple[nn.Module, TrainState]:
    from .distributed import rank_batch_size
    from .profiles import get_device

    method = get_method(run.method)
    domain = domain or make_domain(run, root=root)
    if domain.recipe != run.data_recipe:
        raise ValueError(f"the domain given holds other data ({domain.recipe}) than the run ({run.data_recipe})")
    if method.teacher == "denoiser" and teacher is None:
        raise ValueError(f"{run.method} distils a teacher: pass one (--teacher CKPT, or --teacher exact for the "
                         "closed-form denoiser of a toy mixture)")
    if method.teacher == "none" and teacher is not None:
        raise ValueError(f"{run.method} trains without a teacher; drop --teacher")
    device = get_device(device)
    teacher = load_teacher(teacher, run, domain)
    if isinstance(teacher, nn.Module):
        teacher = teacher.to(device).eval().requires_grad_(False)
    run = method.prepare_run(run, domain)  # e.g. a method starting from another run's checkpoint (lcf) reads it
    run = replace(run, recipe=method.prepare(run.recipe, teacher))
    path = None if checkpoint_path is None else Path(checkpoint_path)
    if path is not None and not restart:
        _check_resume(path, run)
    world = torch.distributed.get_world_size() if distributed and torch.distributed.is_initialized() else 1

    def train_once(model, loss_fn, ema_decays, *, recipe=None, tag=None):
        r = recipe or run.recipe
        labels = method.uses_labels(r) and getattr(domain, "num_classes", None) is not None  # lcf: unlabelled too
        batch_fn = domain.batch_fn(rank_batch_size(r.batch_size, world), device, labels=labels)
        return train(model, loss_fn, batch_fn, steps=r.steps, lr=r.lr, warmup=r.warmup, lr_schedule=r.lr_schedule,
                     grad_clip=r.grad_clip, ema_decays=ema_decays, seed=r.seed, device=device, bf16=domain.bf16,
                     checkpoint_path=path if path is None or tag is None else tagged_path(path, tag),
                     checkpoint_every=checkpoint_every, resume=not restart,
                     meta={"run": replace(run, recipe=r).to_dict()}, hooks=hooks,
                     log_every=max(min(100, r.steps // 50), 1), progress=progress, distributed=distributed)

    model, state = method.fit(run.recipe, lambda: build_model(run, domain), teacher, train_once)
    model.fewstep_run = run  # what the model is (a method may read its teacher's run: methods/lora.py)
    return model.eval(), state


def load_or_train(run: Run, checkpoint_path, *, wait_s: float = 3600.0, **kwargs) -> tuple[nn.Module, TrainState]:
    """The run's model from checkpoint_path when it holds this run (finished: loaded; unfinished: resumed);
    otherwise trained there afresh, replacing what the file held. Notebooks share models this way.

    When another process is training into the same file (two notebooks run side by side), this waits
    for it, up to wait_s seconds, and then loads (or resumes) what it wrote.
    """
    try:
        return train_run(run, checkpoint_path=checkpoint_path, wait_s=wait_s, **kwargs)
    except RunMismatchError:
        return train_run(run, checkpoint_path=checkpoint_path, restart=True, wait_s=wait_s, **kwargs)


def load_run(path, *, which: str = "ema", device="cpu") -> tuple[nn.Module, Run]:
    """Rebuild a model from a checkpoint's run description and load its weights: (model in eval mode, run)."""
    meta = read_checkpoint_meta(path)
    run = run_from_dict(meta.get("run", meta.get("recipe")), source=str(path))
    model = build_model(run)
    load_checkpoint(path, model, which=which)
    model.fewstep_run = run  # what the model is (a method may read its teacher's run: methods/lora.py)
    return model.to(device).eval().requires_grad_(False), run


def default_sigmas(run: Run, steps: int | None = None) -> torch.Tensor:
    """The grid the run's method samples on (its default step count unless `steps`)."""
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return get_method(run.method).sigmas(run.recipe, steps)


def _sampling(run: Run, steps, sigmas, sampler):
    method = get_method(run.method)
    name = sampler or method.sampler(run.recipe)
    grid = default_sigmas(run, steps) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    kwargs = method.sampler_kwargs(run.recipe) if name == method.sampler(run.recipe) else {}
    return name, grid, kwargs


def condition(model, run: Run, labels, w: float | None = None):
    """(D, cond) that samples the run's model for class `labels` (an int or (B,) long) at guidance w.

    The method decides (``Method.guide``): a class-conditional teacher is wrapped in classifier-free
    guidance (w None: the plain conditional model), LCM passes (labels, w) to its student.
    """
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class labels must be integers, got {labels.dtype}")
        labels = labels.long()
    return get_method(run.method).guide(run.recipe, model, labels, w)


def sample(model, run: Run, n: int, *, steps: int | None = None, sigmas=None, sampler: str | None = None,
           seed: int = 0, domain=None, batch_size: int | None = None, cond=None, labels=None,
           w: float | None = None) -> torch.Tensor:
    """n samples of the run's model with its method's sampler and grid (or the ones given).

    labels (an int, or n ints) and w: the class and guidance scale of a class-conditional model
    (see ``condition``). cond: a raw batch-first condition instead (n labels; for LCM, (labels, w)).
    """
    name, grid, kwargs = _sampling(run, steps, sigmas, sampler)
    domain = domain or make_domain(run)
    if labels is not None or w is not None:
        if cond is not None:
            raise ValueError("give either labels/w or a raw cond, not both")
        labels = None if labels is None else torch.as_tensor(labels).long().expand(n).contiguous()
        model, cond = condition(model, run, labels, w)
    if cond is not None:
        kwargs["cond"] = cond
    return domain.generate(model, name, grid, n, seed=seed, batch_size=batch_size, **kwargs)


def evaluate(model, run: Run, *, steps: int | None = None, sigmas=None, sampler: str | None = None, n=None,
             seeds=(0, 1, 2), domain=None, progress: bool = False, root=None, w: float | None = None):
    """The domain's metric (sliced W2 for 2-D, FD for images) of the model's samples, mean ± std over seeds.

    A class-conditional model (guided at w, see ``condition``) is scored per class on labelled 2-D
    data (``evaluate_classes``: each class against its own distribution, mean over classes) and on
    class-balanced labels elsewhere.
    """
    name, grid, kwargs = _sampling(run, steps, sigmas, sampler)
    domain = domain or make_domain(run, root=root)
    if get_method(run.method).needs_labels:
        n = n or domain.default_n
        if hasattr(domain, "evaluate_classes"):
            return domain.evaluate_classes(lambda labels: condition(model, run, labels, w), name, grid, n=n,
                                           seeds=tuple(seeds), progress=progress, **kwargs)
        # The domain's own classes in equal shares (a class subset of CIFAR-10 keeps its CIFAR indices).
        labels = domain.balanced_labels(n) if hasattr(domain, "balanced_labels") else torch.arange(n) % domain.num_classes
        model, kwargs["cond"] = condition(model, run, labels, w)
    return domain.evaluate(model, name, grid, n=n or domain.default_n, seeds=tuple(seeds), progress=progress,
                           **kwargs)
