"""Consistency models on CIFAR-10 end to end: an EDM teacher, consistency distillation, improved CT.

Glue between the U-Net (nets/unet.py, DDPM++ as in EDM's SongUNet), the preconditioning
(precond.py: EDM eq. 7 scalings for the teacher; consistency scalings, CM appendix C, for the
students), the losses (losses/denoising.edm_loss: EDM eq. 8; losses/consistency.cd_loss: Song et
al. 2023 "CM" Algorithm 2; ict_loss: CM Algorithm 3 with Song & Dhariwal 2023 "iCT"), the
samplers (Heun, EDM Algorithm 1; CM Algorithm 1) and the course's FD (metrics_images.py).
One frozen dataclass per method; ``cifar_recipe(method, profile)`` picks the size:

- ``smoke``: a few dozen images of one class at 16x16, a 200k-parameter net, seconds.
- ``cpu``: the 5,000 'automobile' training images at 16x16 (2x2 average pooling) and a
  1.3M-parameter net that sees each image about 8 times, minutes on 2 cores: it shows the mechanics
  and the curves, not CIFAR quality.
- ``gpu``: all of CIFAR-10 at 32x32, bf16 autocast, channels_last, torchrun for several GPUs.
  The net is unet_sizes['gpu'] (37.9M parameters, 2 instead of 4 blocks per level: 0.68x the
  ~56M of DDPM++/NCSN++ used by EDM and CM, 0.60x their compute per image). Batch 512 for every
  method: EDM's and CM's CD batch; CM's CT used 2048. Steps: the EDM teacher sees 51 Mimg
  (100k steps, 0.26x EDM's 200 Mimg); CD 100k steps (0.13x CM's 800k at batch 512); iCT 200k
  steps at batch 512 (CM's CT: 800k at 2048). Wall-clock times on a GPU are not yet measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from .data.images import CLASSES, from_model_range, load_cifar10, random_batch
from .distributed import rank_batch_size
from .losses.consistency import cd_loss, get_distance, ict_loss
from .losses.denoising import edm_loss
from .metrics_images import fd, feature_stats
from .nets.unet import UNet, unet_sizes
from .precond import Precond, get_scalings
from .profiles import get_profile
from .recipes import recipe_to_dict
from .sampling import sample_consistency, sample_heun
from .schedules import karras_sigmas
from .train import TrainState, load_checkpoint, read_checkpoint_meta, train

__all__ = ["CifarEDMRecipe", "CifarCDRecipe", "CifarICTRecipe", "cifar_recipe", "build_image_model",
           "load_images", "train_cifar_teacher", "train_cifar_cd", "train_cifar_ct", "load_cifar",
           "sampling_sigmas", "nfe", "sample_images", "image_grid", "fd_reference", "image_fd", "fd_floor",
           "TWO_STEP_SIGMA"]

# The intermediate level of two-step sampling: about the value the CM and iCT papers report for
# CIFAR-10 (found there by a greedy search, sampling.search_consistency_sigmas does the same here).
TWO_STEP_SIGMA = 0.8


@dataclass(frozen=True)
class _CifarBase:
    """Data, network, noise range, optimiser and precision shared by the CIFAR-10 recipes."""

    classes: tuple[str, ...] | None = None  # None: all ten
    resolution: int = 32  # 32, or 16 (2x2 average pooling)
    train_images: int | None = None  # None: every training image of the chosen classes
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    num_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.13
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    steps: int = 100_000
    batch_size: int = 512  # the global batch: each of N processes draws batch_size / N
    lr: float = 1e-3
    warmup: int = 5000
    grad_clip: float | None = 1.0
    ema_halflife_kimg: float = 500.0  # EDM's EMA: half-life in thousands of images ...
    ema_rampup: float | None = 0.05  # ... at most this fraction of the images seen so far
    bf16: bool = False
    channels_last: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.classes is not None and (not self.classes or set(self.classes) - set(CLASSES)):
            raise ValueError(f"classes must be None or names from {CLASSES}, got {self.classes}")
        if self.resolution not in (16, 32):
            raise ValueError(f"resolution must be 32 (CIFAR-10) or 16 (2x2 average pooling), got {self.resolution}")
        if self.steps < 0 or self.batch_size < 1 or (self.train_images is not None and self.train_images < 1):
            raise ValueError("steps must be >= 0, batch_size >= 1 and train_images None or >= 1")


@dataclass(frozen=True)
class CifarEDMRecipe(_CifarBase):
    """The EDM teacher (Karras et al. 2022, eq. 8 loss, lognormal sigma)."""

    p_mean: float = -1.2
    p_std: float = 1.2


@dataclass(frozen=True)
class CifarCDRecipe(_CifarBase):
    """Consistency distillation (CM Algorithm 2) of an EDM teacher; LPIPS replaced by pseudo-Huber."""

    N: int = 18
    solver: str = "heun"
    distance: str = "pseudo_huber"  # CM's best used LPIPS, whose weights cannot be downloaded here
    huber_c: float | None = None  # None: iCT's 0.00054 sqrt(dim)
    target_decay: float = 0.95  # CM's mu for CD on CIFAR-10
    init_from_teacher: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.solver not in ("euler", "heun") or self.distance not in ("l2", "l1", "pseudo_huber"):
            raise ValueError("solver must be 'euler' or 'heun'; distance 'l2', 'l1' or 'pseudo_huber'")


@dataclass(frozen=True)
class CifarICTRecipe(_CifarBase):
    """Improved consistency training (iCT) from scratch: exponential N(k), pseudo-Huber, no EMA target."""

    s0: int = 10
    s1: int = 1280
    huber_c: float | None = None
    p_mean: float = -1.1
    p_std: float = 2.0


_SMALL_NET = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
_CPU_NET = dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
_CPU_DATA = dict(classes=("automobile",), resolution=16, warmup=50, ema_halflife_kimg=5.0, ema_rampup=0.1)
_PROFILES = {
    "smoke": {cls: dict(_SMALL_NET, classes=("automobile",), resolution=16, train_images=40, batch_size=8,
                        steps=steps, warmup=0, ema_halflife_kimg=0.05)
              for cls, steps in ((CifarEDMRecipe, 20), (CifarCDRecipe, 8), (CifarICTRecipe, 8))},
    # About 4, 3 and 3.5 minutes on 2 uncontended cores (a CD step costs ~2 teacher steps, iCT ~1.3).
    "cpu": {CifarEDMRecipe: dict(_CPU_NET, **_CPU_DATA, steps=1200, batch_size=32, lr=2e-3),
            CifarCDRecipe: dict(_CPU_NET, **_CPU_DATA, steps=300, batch_size=32, lr=5e-4),
            CifarICTRecipe: dict(_CPU_NET, **_CPU_DATA, steps=600, batch_size=32, lr=1e-3, s1=160)},
    "gpu": {CifarEDMRecipe: dict(unet_sizes["gpu"], bf16=True, channels_last=True),
            CifarCDRecipe: dict(unet_sizes["gpu"], bf16=True, channels_last=True, lr=4e-4),
            CifarICTRecipe: dict(unet_sizes["gpu"], bf16=True, channels_last=True, steps=200_000, lr=1e-4,
                                 dropout=0.3)},
}
_METHODS = {"edm": CifarEDMRecipe, "cd": CifarCDRecipe, "ict": CifarICTRecipe}


def cifar_recipe(method: str = "edm", profile: str | None = None, **overrides):
    """The CIFAR-10 recipe of `method` ('edm', 'cd', 'ict') under `profile` (see the module docstring)."""
    if method not in _METHODS:
        raise ValueError(f"unknown CIFAR-10 method {method!r}; choose one of {sorted(_METHODS)}")
    cls = _METHODS[method]
    names = {f.name for f in fields(cls)}
    if set(overrides) - names:
        raise ValueError(f"unknown recipe fields {sorted(set(overrides) - names)}; valid: {sorted(names)}")
    return replace(cls(**_PROFILES[get_profile(profile)][cls]), **overrides)


def _recipe_from_dict(d: dict):
    """Rebuild a recipe stored by recipes.recipe_to_dict (only the CIFAR-10 classes; no code is executed)."""
    d = dict(d)
    cls = {c.__name__: c for c in _METHODS.values()}.get(d.pop("class", None))
    if cls is None:
        raise ValueError(f"not a CIFAR-10 checkpoint; known recipe classes: {[c.__name__ for c in _METHODS.values()]}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_image_model(recipe) -> Precond:
    """Precond(UNet, EDM scalings) for the teacher, Precond(UNet, consistency scalings) for CD/iCT."""
    net = UNet(resolution=recipe.resolution, model_channels=recipe.model_channels, channel_mult=recipe.channel_mult,
               num_blocks=recipe.num_blocks, attn_resolutions=recipe.attn_resolutions, dropout=recipe.dropout)
    if isinstance(recipe, CifarEDMRecipe):
        scalings = get_scalings("edm", sigma_data=recipe.sigma_data)
    else:
        scalings = get_scalings("consistency", sigma_data=recipe.sigma_data, sigma_min=recipe.sigma_min)
    model = Precond(net, scalings)
    # channels_last (NHWC) lets cuDNN use tensor-core convolution kernels without transposes.
    return model.to(memory_format=torch.channels_last) if recipe.channels_last else model


def load_images(recipe, split: str = "train", *, root=None, cache_dir=None) -> torch.Tensor:
    """The recipe's images as (N, 3, R, R) uint8: its classes, its resolution (2x2 average pooling), its count."""
    k = 10 if recipe.classes is None else len(recipe.classes)
    n = recipe.train_images if split == "train" else None
    # load_cifar10's limit is class-balanced: 10 * ceil(n / k) holds ceil(n / k) of each wanted class.
    limit = None if n is None or 10 * math.ceil(n / k) >= 50_000 else 10 * math.ceil(n / k)
    images, labels = load_cifar10(root, split, cache_dir=cache_dir, limit=limit)
    if recipe.classes is not None:
        images = images[torch.isin(labels, torch.tensor([CLASSES.index(c) for c in recipe.classes]))]
    images = images[:n]
    if recipe.resolution == 16:
        images = nn.functional.avg_pool2d(images.float(), 2).round().to(torch.uint8)
    return images.contiguous()


def _ema_decay(recipe, batch: int):
    """EDM's EMA: a half-life in images (EDM table 7: 0.5 Mimg), at most ema_rampup x the images seen so far."""
    def decay(step: int) -> float:
        half = recipe.ema_halflife_kimg * 1000
        if recipe.ema_rampup is not None:
            half = min(half, (step + 1) * batch * recipe.ema_rampup)
        return 0.5 ** (batch / max(half, 1e-8))
    return decay


def _train(recipe, model, loss_fn, ema_decays, *, images, checkpoint_path, device, distributed, progress, hooks,
           resume, checkpoint_every) -> TrainState:
    # Without a process group train() itself explains how to start one.
    world = torch.distributed.get_world_size() if distributed and torch.distributed.is_initialized() else 1
    batch = rank_batch_size(recipe.batch_size, world)
    images = load_images(recipe) if images is None else images
    labels = torch.zeros(len(images), dtype=torch.long)  # unconditional: labels are not used
    memory = torch.channels_last if recipe.channels_last else torch.contiguous_format

    def batch_fn(g):
        x, _ = random_batch(images, labels, batch, g)
        return x.to(device).contiguous(memory_format=memory)

    ema_decays = dict(ema_decays, ema=_ema_decay(recipe, recipe.batch_size))
    return train(model, loss_fn, batch_fn, steps=recipe.steps, lr=recipe.lr, warmup=recipe.warmup,
                 grad_clip=recipe.grad_clip, ema_decays=ema_decays, seed=recipe.seed, device=device,
                 bf16=recipe.bf16, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                 resume=resume, meta={"recipe": recipe_to_dict(recipe)}, hooks=hooks,
                 log_every=max(recipe.steps // 50, 1), progress=progress, distributed=distributed)


def train_cifar_teacher(recipe: CifarEDMRecipe, *, images=None, checkpoint_path=None, device="cpu",
                        distributed=False, progress=True, hooks=(), resume=True, checkpoint_every=0):
    """Train the EDM teacher (EDM eq. 8); returns (EMA denoiser in eval mode, train state)."""
    if not isinstance(recipe, CifarEDMRecipe):
        raise TypeError(f"train_cifar_teacher needs a CifarEDMRecipe (cifar_recipe('edm')), got {type(recipe).__name__}")

    def loss_fn(D, x0, ctx):
        return edm_loss(D, x0, generator=ctx.generator, p_mean=recipe.p_mean, p_std=recipe.p_std,
                        sigma_data=recipe.sigma_data)

    state = _train(recipe, build_image_model(recipe), loss_fn, {}, images=images, checkpoint_path=checkpoint_path,
                   device=device, distributed=distributed, progress=progress, hooks=hooks, resume=resume,
                   checkpoint_every=checkpoint_every)
    return state.emas["ema"].eval(), state


def train_cifar_cd(teacher, recipe: CifarCDRecipe, *, images=None, checkpoint_path=None, device="cpu",
                   distributed=False, progress=True, hooks=(), resume=True, checkpoint_every=0):
    """Consistency distillation (CM Algorithm 2) of `teacher` (a denoiser or a checkpoint path); returns (EMA f, state)."""
    if not isinstance(recipe, CifarCDRecipe):
        raise TypeError(f"train_cifar_cd needs a CifarCDRecipe (cifar_recipe('cd')), got {type(recipe).__name__}")
    if not isinstance(teacher, nn.Module):
        teacher, t_recipe = load_cifar(teacher)
        if (t_recipe.classes, t_recipe.resolution) != (recipe.classes, recipe.resolution):
            raise ValueError(f"the teacher was trained on classes={t_recipe.classes} at {t_recipe.resolution}px, the "
                             f"CD recipe asks for {recipe.classes} at {recipe.resolution}px; use the same data")
    teacher = teacher.to(device).eval().requires_grad_(False)
    model = build_image_model(recipe)
    if recipe.init_from_teacher:  # CM sec. 6: the student starts from the teacher's weights
        try:
            model.net.load_state_dict(teacher.net.state_dict())
        except (AttributeError, RuntimeError) as err:
            raise ValueError("init_from_teacher=True needs a teacher Precond(UNet) with the recipe's network size; "
                             "use replace(recipe, init_from_teacher=False) otherwise") from err
    distance = get_distance("pseudo_huber", c=recipe.huber_c) if recipe.distance == "pseudo_huber" else recipe.distance

    def loss_fn(f, x0, ctx):
        return cd_loss(f, ctx.emas["target"], teacher, x0, N=recipe.N, solver=recipe.solver, distance=distance,
                       generator=ctx.generator, sigma_min=recipe.sigma_min, sigma_max=recipe.sigma_max, rho=recipe.rho)

    state = _train(recipe, model, loss_fn, {"target": recipe.target_decay}, images=images,
                   checkpoint_path=checkpoint_path, device=device, distributed=distributed, progress=progress,
                   hooks=hooks, resume=resume, checkpoint_every=checkpoint_every)
    return state.emas["ema"].eval(), state


def train_cifar_ct(recipe: CifarICTRecipe, *, images=None, checkpoint_path=None, device="cpu", distributed=False,
                   progress=True, hooks=(), resume=True, checkpoint_every=0):
    """Improved consistency training (iCT; CM Algorithm 3 with N(k) of iCT eq. 8) from scratch; returns (EMA f, state)."""
    if not isinstance(recipe, CifarICTRecipe):
        raise TypeError(f"train_cifar_ct needs a CifarICTRecipe (cifar_recipe('ict')), got {type(recipe).__name__}")

    def loss_fn(f, x0, ctx):
        return ict_loss(f, x0, k=ctx.step, K=max(recipe.steps, 1), generator=ctx.generator, c=recipe.huber_c,
                        s0=recipe.s0, s1=recipe.s1, p_mean=recipe.p_mean, p_std=recipe.p_std,
                        sigma_min=recipe.sigma_min, sigma_max=recipe.sigma_max, rho=recipe.rho)

    state = _train(recipe, build_image_model(recipe), loss_fn, {}, images=images, checkpoint_path=checkpoint_path,
                   device=device, distributed=distributed, progress=progress, hooks=hooks, resume=resume,
                   checkpoint_every=checkpoint_every)
    return state.emas["ema"].eval(), state


def load_cifar(path, *, which: str = "ema", device="cpu"):
    """Rebuild a CIFAR-10 model from a checkpoint's JSON metadata and load its weights: (model, recipe)."""
    recipe = _recipe_from_dict(read_checkpoint_meta(path)["recipe"])
    model = build_image_model(recipe)
    load_checkpoint(path, model, which=which)
    return model.to(device).eval().requires_grad_(False), recipe


# ---------------------------------------------------------------- sampling and FD


def sampling_sigmas(recipe, steps: int | None = None) -> torch.Tensor:
    """The teacher's Karras grid (18 Heun steps = 35 NFE by default), or [sigma_max, (levels,) 0] for a CM."""
    if isinstance(recipe, CifarEDMRecipe):
        return karras_sigmas(steps or 18, recipe.sigma_min, recipe.sigma_max, recipe.rho)
    steps = steps or 1
    if steps == 1:
        return torch.tensor([recipe.sigma_max, 0.0], dtype=torch.float64)
    return karras_sigmas(steps, TWO_STEP_SIGMA, recipe.sigma_max, recipe.rho).double()


def nfe(recipe, sigmas) -> int:
    """Network evaluations of one sample: Heun 2 per step but 1 for the last; a CM 1 per level."""
    n = len(sigmas) - 1
    return 2 * n - 1 if isinstance(recipe, CifarEDMRecipe) else n


@torch.no_grad()
def sample_images(model, recipe, n: int, *, steps: int | None = None, sigmas=None, seed: int = 0,
                  batch_size: int = 256) -> torch.Tensor:
    """n samples (n, 3, R, R) in [-1, 1] (clipped, as a saved image): Heun (EDM Alg. 1) or CM Algorithm 1."""
    grid = sampling_sigmas(recipe, steps) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch_size):
        z = torch.randn(min(batch_size, n - i), 3, recipe.resolution, recipe.resolution, generator=g)
        x = (grid[0] * z).float().to(device)
        if isinstance(recipe, CifarEDMRecipe):
            x = sample_heun(model, x, grid)
        else:
            x = sample_consistency(model, x, grid, generator=g, sigma_min=recipe.sigma_min)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def image_grid(x: torch.Tensor, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """Tile images (B, 3, H, W) in [-1, 1] or uint8 into one (rows*(H+pad)+pad, ..., 3) uint8 array for imshow."""
    x = x if x.dtype == torch.uint8 else from_model_range(x)
    b, _, h, w = x.shape
    rows = math.ceil(b / nrow)
    grid = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def _to32(x: torch.Tensor) -> torch.Tensor:
    """16x16 -> 32x32 by pixel repetition (the FD classifier reads 32x32); 32x32 unchanged."""
    f = 32 // x.shape[-1]
    return x if f == 1 else x.repeat_interleave(f, -1).repeat_interleave(f, -2)


def fd_reference(recipe, classifier=None, split: str = "test", **load_kwargs):
    """FD reference statistics (mu, cov) of the real `split` images of the recipe's classes and resolution."""
    return feature_stats(_to32(load_images(recipe, split, **load_kwargs)), classifier)


def image_fd(samples: torch.Tensor, reference, classifier=None) -> float:
    """The course's FD (metrics_images.fd, not FID) of samples at 16 or 32 px against reference statistics."""
    return fd(_to32(samples), reference, classifier=classifier)


def fd_floor(recipe, n: int, reference, classifier=None, *, seed: int = 0, images=None) -> float:
    """The real-vs-real floor: FD of n random training images (same classes, resolution) against the reference."""
    images = load_images(recipe) if images is None else images
    if n > len(images):
        raise ValueError(f"the floor needs n <= {len(images)} training images, got n={n}")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return image_fd(images[idx], reference, classifier)
