"""What a method is: the one place that knows how a family of models is built, trained and sampled.

A method is a small class (one instance registered by name, see ``methods/__init__.py``). It
says, and nothing else in the package does:

- ``recipe_cls``: its recipe dataclass, and ``profiles``: its numbers per (domain, profile);
- ``build(recipe, net)``: the trainable model from a bare network ``F(x_in, c_noise, cond)``
  (a ``Precond`` with its scalings, or a wrapper);
- ``net_options(recipe)``: what it asks of the domain's network (e.g. a noise-input scale);
- ``loss(recipe, teacher)``: the per-sample loss ``loss_fn(model, x0, ctx) -> (B,)``, calling
  ``losses/``;
- ``ema_decays(recipe)``: the EMA copies the train loop keeps ("ema" is the one sampled);
- ``teacher``: ``"none"`` or ``"denoiser"`` (distillation), and ``is_teacher``: whether its
  models may serve as a teacher;
- ``needs_labels``: whether it trains on class labels (its loss then receives ``(x0, labels)``
  and its network is built with the domain's ``num_classes``); ``uses_labels(recipe)``: the same,
  per run (a method whose network mirrors its teacher's, such as a LoRA, decides from the recipe);
- ``teacher_same_data``: whether a checkpoint teacher must come from the run's data (False: a base
  model of the same domain trained on other data, e.g. a style LoRA's);
- ``sampler(recipe)``, ``sigmas(recipe, steps)``, ``sampler_kwargs(recipe)``,
  ``default_steps(recipe)`` and ``nfe(recipe, sigmas)``: its default sampling and its cost;
- ``fit(...)``: how training is organised (one call of the train loop by default; rounds for PD);
- ``guide(recipe, model, labels, w)``: the (denoiser, cond) that samples class ``labels`` at guidance
  scale ``w`` (a class-conditional teacher is wrapped in classifier-free guidance; LCM takes w as input).

The pipeline (``pipeline.py``) composes a method with a data domain; neither knows the other.
No paper: this is the contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..recipes import ema_schedule

__all__ = ["Method", "sampler_nfe", "copy_teacher_net", "tagged_path"]

# Samplers whose steps cost two evaluations, except a final step to sigma = 0 (an Euler step).
_TWO_PER_STEP = ("heun", "dpm_solver_2")


def sampler_nfe(sampler: str, sigmas) -> int:
    """Network evaluations of one sampling call of `sampler` on the grid `sigmas` (ending in 0)."""
    n = len(sigmas) - 1
    if sampler in _TWO_PER_STEP:
        return 2 * n - (1 if float(sigmas[-1]) == 0 else 0)
    return n


def tagged_path(path, tag: str):
    """'<stem>.<tag><suffix>' beside `path`: where a method keeps a second checkpoint (PD's rounds)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def copy_teacher_net(model: nn.Module, teacher, *, own_prefixes: tuple[str, ...] = ()) -> None:
    """Start a student from its teacher's network weights (CM sec. 6; PD; LCM); same network size required.

    Parameters whose names start with one of `own_prefixes` exist only in the student (LCM's w branch,
    ``w_``) and keep their own initial values.
    """
    net = getattr(teacher, "net", None)
    theirs = net.state_dict() if isinstance(net, nn.Module) else {}
    ours = model.net.state_dict()
    shared = {k for k in ours if not k.startswith(own_prefixes)} if own_prefixes else set(ours)
    if set(theirs) != shared or any(theirs[k].shape != ours[k].shape for k in shared):
        raise ValueError("init_from_teacher=True needs a teacher Precond(net) with the student's network size "
                         "(a teacher trained on the same data with the same profile); otherwise set "
                         "init_from_teacher=False (fewstep train ... --set init_from_teacher=false)")
    model.net.load_state_dict(theirs, strict=not own_prefixes)


class Method:
    """Base class: override what differs (see the module docstring for each hook)."""

    name: str = ""
    title: str = ""  # for tables, e.g. "CD"
    recipe_cls: type = None
    profiles: dict = {}  # {domain name: {profile: {field: value}}}
    teacher: str = "none"  # "none" | "denoiser"
    is_teacher: bool = False
    needs_labels: bool = False  # True: batches are (x0, labels) and the net is class-conditional
    teacher_same_data: bool = True  # False: the teacher may be trained on other data of the same domain

    def uses_labels(self, recipe) -> bool:
        """Whether this run trains on labels (and builds a class-conditional net); default: needs_labels."""
        return self.needs_labels

    # ---------------------------------------------------------------- recipe
    def table(self, domain: str, profile: str) -> dict:
        """This method's numbers for (domain, profile); a domain without an entry gets the dataclass defaults."""
        return dict(self.profiles.get(domain, {}).get(profile, {}))

    # ---------------------------------------------------------------- model
    def net_options(self, recipe) -> dict:
        return {}

    def build(self, recipe, net: nn.Module) -> nn.Module:
        raise NotImplementedError

    def prepare(self, recipe, teacher):
        """The recipe to train with, given the teacher (e.g. no weight copy from a weightless teacher)."""
        return recipe

    def init_from_teacher(self, recipe, model: nn.Module, teacher) -> None:
        """Called once before training when the method has a teacher; default: nothing."""

    # ---------------------------------------------------------------- training
    def loss(self, recipe, teacher) -> Callable:
        raise NotImplementedError

    def ema_decays(self, recipe) -> dict:
        return {"ema": ema_schedule(recipe)}

    def fit(self, recipe, build_model: Callable, teacher, train_once: Callable):
        """Train. build_model() makes a fresh (seeded) model; train_once(model, loss_fn, ema_decays,
        recipe=None, tag=None) runs the train loop once (tag: a second checkpoint beside the run's,
        see tagged_path). Returns (the model to sample, its TrainState)."""
        model = build_model()
        if teacher is not None:
            self.init_from_teacher(recipe, model, teacher)
        state = train_once(model, self.loss(recipe, teacher), self.ema_decays(recipe))
        return state.emas["ema"], state

    # ---------------------------------------------------------------- sampling
    def sampler(self, recipe) -> str:
        raise NotImplementedError

    def default_steps(self, recipe) -> int:
        return 1

    def sigmas(self, recipe, steps: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sampler_kwargs(self, recipe) -> dict:
        return {}

    def checkpoint_for(self, path, recipe, steps: int):
        """The checkpoint that samples best with `steps` steps (PD keeps one student per step count)."""
        return path

    def nfe(self, recipe, sigmas) -> int:
        return sampler_nfe(self.sampler(recipe), sigmas)

    def guide(self, recipe, model, labels, w=None):
        """(D, cond) to sample `model` for class `labels` ((B,) long) at guidance scale w (None: no guidance).

        A class-conditional model without a w input is guided by classifier-free guidance
        (``guidance.CFGDenoiser``: D(∅) + (1 + w)(D(c) - D(∅)), one batched call of 2B); an
        unconditional model refuses labels and w.
        """
        if not self.needs_labels:
            if labels is not None or w is not None:
                raise ValueError(f"{self.name} models are unconditional: they take no class labels nor guidance w")
            return model, None
        from ..guidance import CFGDenoiser, null_label_of

        if labels is None:
            raise ValueError(f"{self.name} models are class-conditional: give class labels (--label C)")
        return (model, labels) if w is None else (CFGDenoiser(model, float(w), null_label_of(model)), labels)

    def __repr__(self) -> str:
        return f"<method {self.name!r}: {type(self).__name__}>"
