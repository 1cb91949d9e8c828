"""The CIFAR-10 pixel domain: 32x32 (or 16x16 by 2x2 average pooling) images, a U-Net, FD.

Data: ``data/images.py`` decodes CIFAR-10 once (official python format or an ImageFolder tree)
and caches it; a recipe picks classes, resolution and a count. Batches are uniform draws with
random horizontal flips, in [-1, 1] (DDPM, Ho et al. 2020, sec. 3.3 and appendix B). The network
is the DDPM++ U-Net of ``nets/unet.py`` (EDM's SongUNet). Quality is the course's FD (Fréchet
distance in the features of the shipped CIFAR-10 classifier, ``metrics_images``; not FID) against
the test images of the same classes, beside the real-vs-real floor.

Profiles: ``smoke`` is 40 'automobile' images at 16 px from the small sample shipped with the
package and a 200k-parameter net (seconds); ``cpu`` the 5,000 'automobile' training images at
16 px and a 1.3M-parameter net (minutes on 2 cores: mechanics and curves, not CIFAR quality);
``gpu`` all of CIFAR-10 at 32 px, a 37.9M-parameter net (0.68x DDPM++), bf16 and channels_last.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..metrics import mean_std
from ..nets.unet import UNet, unet_sizes
from ..recipes import Recipe
from .domain import Domain, register_domain
from .images import CLASSES, from_model_range, load_cifar10, random_batch

__all__ = ["CifarImagesRecipe", "UNetRecipe", "Cifar10Recipe", "Cifar10", "ImageEvalResult", "load_images", "image_grid"]


@dataclass(frozen=True)
class CifarImagesRecipe(Recipe):
    """Which CIFAR-10 images: classes, resolution, count, source (the pixel, latent and autoencoder recipes share it)."""

    classes: tuple[str, ...] | None = None  # None: all ten
    resolution: int = 32  # 32, or 16 (2x2 average pooling)
    train_images: int | None = None  # None: every training image of the chosen classes
    source: str = "auto"  # "auto": FEWSTEP_DATA, ./data/cifar10, ../shared; "sample": the shipped sample

    def choices(self) -> dict:
        return {**super().choices(), "source": ("auto", "sample"), "resolution": (16, 32)}

    def check(self) -> None:
        super().check()
        if self.classes is not None and (not self.classes or set(self.classes) - set(CLASSES)):
            raise ValueError(f"classes must be None or names from {CLASSES}, got {self.classes}")
        if self.train_images is not None and (not isinstance(self.train_images, int) or self.train_images < 1):
            raise ValueError(f"train_images must be None or an integer >= 1, got {self.train_images!r}")


@dataclass(frozen=True)
class UNetRecipe(Recipe):
    """The U-Net's sizes (nets/unet.py) and its precision and memory layout (the pixel and latent domains)."""

    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    num_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.13
    bf16: bool = False
    channels_last: bool = False

    def check(self) -> None:
        super().check()
        if not isinstance(self.model_channels, int) or self.model_channels < 1 or not self.channel_mult:
            raise ValueError("model_channels must be >= 1 and channel_mult non-empty")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class Cifar10Recipe(CifarImagesRecipe, UNetRecipe):
    """Which images (classes, resolution, count, source) and the U-Net that models them."""


def load_images(recipe: Cifar10Recipe, split: str = "train", *, root=None, cache_dir=None,
                with_labels: bool = False):
    """The recipe's images as (N, 3, R, R) uint8: its classes, its resolution (2x2 average pooling), its count.

    With ``with_labels``, ``(images, labels)``: labels (N,) int64 are the CIFAR-10 class indices
    0..9 (``CLASSES`` order, also when the recipe keeps only some classes).
    """
    k = 10 if recipe.classes is None else len(recipe.classes)
    n = recipe.train_images if split == "train" else None
    # load_cifar10's limit is class-balanced: 10 * ceil(n / k) holds ceil(n / k) of each wanted class.
    limit = None if n is None or 10 * math.ceil(n / k) >= 50_000 else 10 * math.ceil(n / k)
    root = "sample" if recipe.source == "sample" else root
    images, labels = load_cifar10(root, split, cache_dir=cache_dir, limit=limit)
    if recipe.classes is not None:
        keep = torch.isin(labels, torch.tensor([CLASSES.index(c) for c in recipe.classes]))
        images, labels = images[keep], labels[keep]
    images, labels = images[:n], labels[:n]
    if recipe.resolution == 16:
        images = nn.functional.avg_pool2d(images.float(), 2).round().to(torch.uint8)
    return (images.contiguous(), labels.long().contiguous()) if with_labels else images.contiguous()


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


@dataclass
class ImageEvalResult:
    sampler: str
    steps: int
    nfe: float
    fd_mean: float
    fd_std: float
    seconds_per_10k: float

    def row(self) -> str:
        return (f"{self.sampler:>14} steps {self.steps:>4}  NFE {self.nfe:>6.0f}  FD {self.fd_mean:9.3f} ± "
                f"{self.fd_std:.3f}  {self.seconds_per_10k:.1f} s/10k")


_SMALL_NET = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
_CPU_NET = dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)


@register_domain
class Cifar10(Domain):
    name, recipe_cls = "cifar10", Cifar10Recipe
    profiles = {
        "smoke": dict(_SMALL_NET, classes=("automobile",), resolution=16, train_images=40, source="sample"),
        "cpu": dict(_CPU_NET, classes=("automobile",), resolution=16),
        "gpu": dict(unet_sizes["gpu"], bf16=True, channels_last=True),
    }
    # EDM's EMA (half-life 500 kimg, ramp-up 0.05) and CM's batch 512 on a GPU; a short memory and
    # batch 32 for the minutes of the cpu profile.
    train_defaults = {
        "smoke": dict(batch_size=8, warmup=0, ema_halflife_kimg=0.05, ema_rampup=0.05),
        "cpu": dict(batch_size=32, warmup=50, ema_halflife_kimg=5.0, ema_rampup=0.1),
        "gpu": dict(batch_size=512, warmup=5000, ema_halflife_kimg=500.0, ema_rampup=0.05),
    }

    num_classes = 10  # CIFAR-10 class indices 0..9; label 10 is "no label" (classifier-free guidance)

    def __init__(self, recipe, *, root=None, images: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        super().__init__(recipe, root=root)
        if labels is not None and (images is None or len(labels) != len(images)):
            raise ValueError("labels= needs images= of the same length")
        self._images, self._labels = images, labels
        self._classifier = self._reference = None

    @property
    def shape(self):
        return (3, self.recipe.resolution, self.recipe.resolution)

    @property
    def images(self) -> torch.Tensor:
        """The training images (N, 3, R, R) uint8, loaded on first use."""
        if self._images is None:
            self._images, self._labels = load_images(self.recipe, root=self.root, with_labels=True)
        return self._images

    @property
    def labels(self) -> torch.Tensor:
        """The training images' CIFAR-10 class indices (N,) int64 (0..9), loaded with the images."""
        if self._labels is None:
            if self._images is not None:  # images given without labels: read them from the data
                images, labels = load_images(self.recipe, root=self.root, with_labels=True)
                if not torch.equal(images, self._images):
                    raise ValueError("the images given to this domain are not the recipe's: pass labels= too")
                self._labels = labels
            else:
                self.images  # noqa: B018  (loads both)
        return self._labels

    default_n, default_seeds, metric = 1000, 1, "FD"

    def batch_fn(self, batch_size: int, device="cpu", *, labels: bool = False):
        """fn(generator) -> x0 (B, 3, R, R) in [-1, 1], flipped at random; with labels, (x0, class indices)."""
        images = self.images
        ys = self.labels if labels else torch.zeros(len(images), dtype=torch.long)

        def fn(g):
            x, y = random_batch(images, ys, batch_size, g)
            x = x.to(device).contiguous(memory_format=self.memory_format)
            return (x, y.to(device)) if labels else x
        return fn

    def make_net(self, *, noise_scale: float = 1.0, dropout: float | None = None, num_classes: int | None = None,
                 guidance_embed: bool = False):
        """The U-Net; num_classes: class-conditional (label num_classes = no label); guidance_embed: takes w too."""
        r = self.recipe
        extra = {"guidance_embed": True} if guidance_embed else {}  # only nets that embed w take the argument
        net = UNet(resolution=r.resolution, model_channels=r.model_channels, channel_mult=r.channel_mult,
                   num_blocks=r.num_blocks, attn_resolutions=r.attn_resolutions,
                   dropout=r.dropout if dropout is None else dropout, emb_scale=noise_scale,
                   num_classes=num_classes, **extra)
        # channels_last (NHWC) lets cuDNN use tensor-core convolution kernels without transposes.
        return net.to(memory_format=torch.channels_last) if r.channels_last else net

    # ---------------------------------------------------------------- FD
    def classifier(self):
        if self._classifier is None:
            from ..metrics_images import load_fd_classifier
            self._classifier = load_fd_classifier()
        return self._classifier

    def reference(self):
        """FD reference statistics (mu, cov) of the test images of the recipe's classes and resolution."""
        if self._reference is None:
            from ..metrics_images import feature_stats
            self._reference = feature_stats(_to32(load_images(self.recipe, "test", root=self.root)),
                                            self.classifier())
        return self._reference

    def fd(self, samples: torch.Tensor) -> float:
        """The course's FD (metrics_images.fd, not FID) of samples at 16 or 32 px against the reference."""
        from ..metrics_images import fd
        return fd(_to32(samples), self.reference(), classifier=self.classifier())

    def postprocess(self, x):
        return x.clamp(-1, 1)

    def evaluate(self, D, sampler: str, sigmas, *, n: int = 1000, seeds=(0,), progress: bool = False,
                 batch_size: int = 256, **sampler_kwargs) -> ImageEvalResult:
        """FD of n samples per seed, mean ± std over seeds; NFE counted (per sampling call of one batch)."""
        calls = [0]

        def counted(x, sigma, cond=None):
            calls[0] += 1
            return D(x, sigma, cond)

        p = next(D.parameters(), None) if isinstance(D, nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")
        from tqdm.auto import tqdm

        values, secs = [], 0.0
        for s in tqdm(seeds, desc=f"FD {sampler}", disable=not progress, leave=False):
            t0, calls[0] = time.perf_counter(), 0
            x = self.generate(counted, sampler, sigmas, n, seed=s, batch_size=batch_size, device=device,
                              **sampler_kwargs)
            secs += time.perf_counter() - t0
            values.append(self.fd(x))
        m, sd = mean_std(values)
        return ImageEvalResult(sampler, len(sigmas) - 1, calls[0] / math.ceil(n / batch_size), m, sd,
                               secs / len(seeds) * 10_000 / n)

    def floor(self, n: int, seeds=(0,)) -> tuple[float, float]:
        """FD of n random training images (same classes and resolution) against the reference: (mean, std)."""
        if n > len(self.images):
            raise ValueError(f"the floor needs n <= {len(self.images)} training images, got n={n}")
        vals = [self.fd(self.images[torch.randperm(len(self.images), generator=torch.Generator().manual_seed(s))[:n]])
                for s in seeds]
        return mean_std(vals)

    def same_data(self, other) -> bool:
        keys = ("classes", "resolution", "train_images", "source")
        return isinstance(other, Cifar10Recipe) and all(getattr(other, k) == getattr(self.recipe, k) for k in keys)
