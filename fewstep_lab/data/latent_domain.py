"""Latent domains: diffusion on the latents of a KL autoencoder, decoded for evaluation (Rombach et al. 2022).

Latent diffusion (Rombach et al. 2022, sec. 3-4) trains the diffusion model on z = s * E(x), the
scaled latent of a frozen first-stage autoencoder (``nets/autoencoder.py``; s = 1 / std of the
training latents, sec. 4.3.2), and decodes samples with G(z / s). A latent domain is that
view of an image set: batches are the (cached) latent means of the training images (each with
its mirror image's latent, chosen with p = 1/2: DDPM's flips, done before encoding); the net is
the U-Net at the latent's size and channels; ``postprocess`` decodes, so ``generate``/``sample``
return images in [-1, 1]; quality is the course's FD (``metrics_images``, not FID) of the decoded
samples and, for class-conditional CIFAR-10 samples, the shipped classifier's accuracy on them
(``metrics_images.classifier_accuracy``: the guidance-fidelity analogue of a CLIP score).

Two domains share this code: ``cifar10-latent`` (CIFAR-10 classes at 16 or 32 px, labels = CIFAR
class indices, FD against the test images of the recipe's classes) and ``imagefolder`` (any
folder of images, ``--data imagefolder:PATH``; see ``imagefolder.py``). Without an
``autoencoder`` path, a recipe uses the profile's default autoencoder under ``runs/checkpoints``,
trained there on first use (under a lock: once, whoever asks first), so that
``fewstep train --method ddpm-cfg --data cifar10-latent`` works in one command. Encodings are
cached outside the data folder (``autoencoder.encode_images``), keyed by the autoencoder's weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..metrics import mean_std
from ..nets.unet import UNet
from .cifar10_domain import Cifar10, Cifar10Recipe, CifarImagesRecipe, ImageEvalResult, UNetRecipe, _to32, load_images
from .domain import Domain, register_domain

__all__ = ["LatentRecipe", "Cifar10LatentRecipe", "LatentDomain", "Cifar10Latent", "LatentEvalResult",
           "LATENT_NETS"]

# U-Nets for 8x8 latents: the levels are 8, 4 (and 2) pixels; the bottleneck always has attention.
LATENT_NETS = {
    "smoke": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0),
    # 1.34M parameters with 10 classes; about 0.1-0.3 s per batch of 32 on one busy CPU thread.
    "cpu": dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(), dropout=0.0),
    "gpu": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=2, attn_resolutions=(4,), dropout=0.1,
                bf16=True, channels_last=True),
}


@dataclass(frozen=True)
class LatentRecipe(UNetRecipe):
    """The autoencoder (a checkpoint path, or None: the default of ``ae_profile``) and the latent U-Net."""

    autoencoder: str | None = None
    ae_profile: str = "gpu"  # which autoencoder_recipe trains the default autoencoder
    attn_resolutions: tuple[int, ...] = (4,)
    dropout: float = 0.1

    def choices(self) -> dict:
        return {**super().choices(), "ae_profile": ("smoke", "cpu", "gpu")}

    def check(self) -> None:
        super().check()
        if self.autoencoder is not None and (not isinstance(self.autoencoder, str) or not self.autoencoder.strip()):
            raise ValueError(f"autoencoder must be None or a checkpoint path, got {self.autoencoder!r}")


@dataclass(frozen=True)
class Cifar10LatentRecipe(CifarImagesRecipe, LatentRecipe):
    """CIFAR-10 images as Cifar10Recipe picks them (classes, resolution, count, source), seen through an autoencoder."""

    def image_recipe(self) -> Cifar10Recipe:
        return Cifar10Recipe(classes=self.classes, resolution=self.resolution, train_images=self.train_images,
                             source=self.source)


@dataclass
class LatentEvalResult(ImageEvalResult):
    """FD of decoded samples (and, for labelled samples, the classifier's accuracy on them) per sampler."""

    accuracy: float | None = None
    accuracy_std: float | None = None
    seconds_per_image: float = 0.0  # sampling and decoding, per image

    def row(self) -> str:
        acc = "" if self.accuracy is None else f"  acc {self.accuracy:.3f} ± {self.accuracy_std:.3f}"
        return (f"{self.sampler:>14} steps {self.steps:>4}  NFE {self.nfe:>6.0f}  FD {self.fd_mean:9.3f} ± "
                f"{self.fd_std:.3f}{acc}  {1000 * self.seconds_per_image:.2f} ms/image (with decoding)")


def _labels_of(cond):
    """The labels in a condition: a (n,) tensor, or the first item of a tuple such as LCM's (labels, w)."""
    if isinstance(cond, (tuple, list)):
        cond = cond[0] if cond else None
    return cond if isinstance(cond, torch.Tensor) and cond.ndim == 1 else None


class LatentDomain(Domain):
    """Shared by the latent domains: the autoencoder, cached latents, batches, the U-Net, decoding, FD, accuracy.

    A subclass says which pixels: ``_load_pixels() -> (uint8 images, labels or None)``,
    ``reference_images()`` (what FD compares with), ``default_ae_recipe()``, ``data_folder``.
    """

    recipe_cls = LatentRecipe
    labels_are_cifar = False  # whether labels are CIFAR-10 classes (then the classifier's accuracy is reported)
    default_n, default_seeds, metric = 1000, 1, "FD"

    def __init__(self, recipe, *, root=None, autoencoder=None):
        super().__init__(recipe, root=root)
        self._ae, self._ae_recipe = autoencoder, None
        self._pixels = self._labels = self._latents = None
        self._classifier = self._reference = None

    # -------------------------------------------------------------- what a subclass gives
    data_folder = None

    def _load_pixels(self):
        raise NotImplementedError

    def reference_images(self) -> torch.Tensor:
        raise NotImplementedError

    def default_ae_recipe(self):
        raise NotImplementedError

    # -------------------------------------------------------------- the autoencoder
    def default_ae_path(self) -> Path:
        """runs/checkpoints/autoencoder_<profile>_<hash of its recipe>.pt: one file per autoencoder recipe."""
        from ..paths import run_path

        r = self.default_ae_recipe()
        key = hashlib.sha1(json.dumps(asdict(r), sort_keys=True).encode()).hexdigest()[:8]
        return run_path("checkpoints", f"autoencoder_{self.recipe.ae_profile}_{key}.pt")

    @property
    def ae_recipe(self):
        """The autoencoder's recipe (read from its checkpoint, or the default's), without loading weights."""
        from ..autoencoder import autoencoder_recipe_of

        if self._ae_recipe is None:  # read once: shape is asked for at every batch
            self._ae_recipe = (autoencoder_recipe_of(Path(self.recipe.autoencoder).expanduser())
                               if self.recipe.autoencoder is not None else self.default_ae_recipe())
        return self._ae_recipe

    @property
    def autoencoder(self):
        """The frozen KLAutoencoder: the recipe's checkpoint, else the default one (trained here on first use)."""
        if self._ae is None:
            from ..autoencoder import load_autoencoder, load_or_train_autoencoder

            if self.recipe.autoencoder is not None:
                ae = load_autoencoder(Path(self.recipe.autoencoder).expanduser())
            else:
                ae = load_or_train_autoencoder(self.default_ae_recipe(), self.default_ae_path(), root=self.root)
            self.check_autoencoder(ae)
            self._ae = ae
        return self._ae

    def check_autoencoder(self, ae) -> None:
        """Refuse an autoencoder that cannot read these images (a subclass's rule)."""

    @property
    def shape(self):
        return self._ae.latent_shape if self._ae is not None else self.ae_recipe.latent_shape

    @property
    def resolution(self) -> int:
        return self._ae.config["resolution"] if self._ae is not None else self.ae_recipe.resolution

    # -------------------------------------------------------------- data
    @property
    def images(self) -> torch.Tensor:
        """The training images (N, 3, R, R) uint8, loaded on first use."""
        if self._pixels is None:
            self._pixels, self._labels = self._load_pixels()
        return self._pixels

    @property
    def labels(self) -> torch.Tensor | None:
        self.images  # noqa: B018  (loads both)
        return self._labels

    @property
    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents of the training images, latents of their mirror images), float32 (N, c, h, w), cached on disk."""
        if self._latents is None:
            from ..autoencoder import encode_images

            kw = dict(cache=True, data_folder=self.data_folder)
            self._latents = (encode_images(self.autoencoder, self.images, **kw),
                             encode_images(self.autoencoder, self.images, flip=True, **kw))
        return self._latents

    def batch_fn(self, batch_size: int, device="cpu", *, labels: bool = False):
        """fn(generator) -> latents (B, c, h, w) drawn uniformly, each mirrored with p = 1/2; with labels, (z, y)."""
        z, z_flip = self.latents
        if labels and self.labels is None:
            raise ValueError(f"{self.name} data here have no labels (an image folder without class subfolders); "
                             "use a method that trains without labels, or sort the images into PATH/<class>/ folders")
        ys = self.labels

        def fn(g):
            idx = torch.randint(len(z), (batch_size,), generator=g, device=g.device).cpu()
            mirror = (torch.rand(batch_size, generator=g, device=g.device) < 0.5).cpu()
            x = torch.where(mirror[:, None, None, None], z_flip[idx], z[idx])
            x = x.to(device).contiguous(memory_format=self.memory_format)
            return (x, ys[idx].to(device)) if labels else x
        return fn

    def make_net(self, *, noise_scale: float = 1.0, dropout: float | None = None, num_classes: int | None = None,
                 guidance_embed: bool = False):
        """The U-Net on latents (in/out channels = latent channels, resolution = latent size)."""
        r, (c, h, _) = self.recipe, self.shape
        extra = {"guidance_embed": True} if guidance_embed else {}  # only nets that embed w take the argument
        net = UNet(in_channels=c, out_channels=c, resolution=h, model_channels=r.model_channels,
                   channel_mult=r.channel_mult, num_blocks=r.num_blocks, attn_resolutions=r.attn_resolutions,
                   dropout=r.dropout if dropout is None else dropout, emb_scale=noise_scale,
                   num_classes=num_classes, **extra)
        return net.to(memory_format=torch.channels_last) if r.channels_last else net

    # -------------------------------------------------------------- encoding and decoding
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (uint8, or float in [-1, 1]) -> scaled latent means s * E(x), float32 on the CPU (not cached)."""
        from ..autoencoder import encode_images
        from .images import from_model_range

        images = images if images.dtype == torch.uint8 else from_model_range(images)
        return encode_images(self.autoencoder, images.cpu())

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images G(z / s) in [-1, 1], on z's device."""
        ae = self.autoencoder
        if ae.scaling_factor.device != z.device:
            ae.to(z.device)
        return ae.from_latent(z.float()).clamp(-1, 1)

    def postprocess(self, x):
        return self.decode(x)

    # -------------------------------------------------------------- quality
    def classifier(self):
        if self._classifier is None:
            from ..metrics_images import load_fd_classifier
            self._classifier = load_fd_classifier()
        return self._classifier

    def reference(self):
        """FD reference statistics (mu, cov) of ``reference_images()``."""
        if self._reference is None:
            from ..metrics_images import feature_stats
            self._reference = feature_stats(_to32(self.reference_images()), self.classifier())
        return self._reference

    def fd(self, images: torch.Tensor) -> float:
        """The course's FD (not FID) of images (16 or 32 px) against the reference."""
        from ..metrics_images import fd
        return fd(_to32(images), self.reference(), classifier=self.classifier())

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float | None:
        """The shipped classifier's accuracy on images asked to show CIFAR-10 classes `labels` (None: not CIFAR labels).

        Entries labelled "no label" (num_classes) are left out; None when none is left.
        """
        if not self.labels_are_cifar:
            return None
        from ..metrics_images import classifier_accuracy

        keep = labels.cpu() < 10
        if not keep.any():
            return None
        return classifier_accuracy(_to32(images[keep]), labels.cpu()[keep], classifier=self.classifier())

    def reference_accuracy(self, n: int | None = None) -> dict | None:
        """The classifier's accuracy on n labelled test images and on their reconstructions G(E(x)): the ceiling
        for ``accuracy`` of generated images (16 px images are read at 32 px by pixel repetition). None: not CIFAR."""
        if not self.labels_are_cifar:
            return None
        from ..metrics_images import classifier_accuracy

        images, labels = self.reference_images(with_labels=True)
        images, labels = images[:n], labels[:n]
        recon = torch.cat([self.decode(self.encode(images[i:i + 256])) for i in range(0, len(images), 256)])
        return {name: classifier_accuracy(_to32(x), labels, classifier=self.classifier())
                for name, x in (("real", images), ("reconstructed", recon))}

    def balanced_labels(self, n: int) -> torch.Tensor:
        """n labels cycling over the recipe's classes (the class-balanced condition for evaluation)."""
        if self.labels is None:
            raise ValueError("these data have no labels")
        classes = torch.unique(self.labels)
        return classes[torch.arange(n) % len(classes)]

    def evaluate(self, D, sampler: str, sigmas, *, n: int = 1000, seeds=(0,), progress: bool = False,
                 batch_size: int = 256, **sampler_kwargs) -> LatentEvalResult:
        """FD of n decoded samples per seed (mean ± std over seeds) and, given labels in ``cond``, the accuracy.

        ``cond``: a (n,) tensor of labels, or a tuple whose first item is them (LCM's (labels, w)).
        Time per image counts sampling and decoding.
        """
        calls = [0]

        def counted(x, sigma, cond=None):
            calls[0] += 1
            return D(x, sigma, cond)

        device = next(D.parameters()).device if isinstance(D, nn.Module) else torch.device("cpu")
        labels = _labels_of(sampler_kwargs.get("cond"))
        from tqdm.auto import tqdm

        fds, accs, secs = [], [], 0.0
        for s in tqdm(seeds, desc=f"FD {sampler}", disable=not progress, leave=False):
            t0, calls[0] = time.perf_counter(), 0
            x = self.generate(counted, sampler, sigmas, n, seed=s, batch_size=batch_size, device=device,
                              **sampler_kwargs)
            secs += time.perf_counter() - t0
            fds.append(self.fd(x))
            if labels is not None:
                accs.append(self.accuracy(x, labels))
        m, sd = mean_std(fds)
        acc = (None, None) if not accs or accs[0] is None else mean_std(accs)
        per_image = secs / len(seeds) / n
        return LatentEvalResult(sampler, len(sigmas) - 1, calls[0] / math.ceil(n / batch_size), m, sd,
                                per_image * 10_000, accuracy=acc[0], accuracy_std=acc[1], seconds_per_image=per_image)

    def floor(self, n: int, seeds=(0,)) -> tuple[float, float]:
        """FD of n random training images (pixels, not decoded) against the reference: (mean, std)."""
        if n > len(self.images):
            raise ValueError(f"the floor needs n <= {len(self.images)} training images, got n={n}")
        vals = [self.fd(self.images[torch.randperm(len(self.images), generator=torch.Generator().manual_seed(s))[:n]])
                for s in seeds]
        return mean_std(vals)

    def _ae_identity(self, recipe) -> str:
        """What identifies the autoencoder of a recipe: its resolved checkpoint path (the default's when None)."""
        if recipe.autoencoder is not None:
            return str(Path(recipe.autoencoder).expanduser().resolve())
        other = type(self)(recipe, root=self.root)
        return str(other.default_ae_path().resolve())

    def same_data(self, other) -> bool:
        """Same images (the subclass's data fields) seen through the same autoencoder checkpoint."""
        keys = self.data_keys
        return (isinstance(other, self.recipe_cls) and all(getattr(other, k) == getattr(self.recipe, k) for k in keys)
                and self._ae_identity(other) == self._ae_identity(self.recipe))

    data_keys: tuple = ()


@register_domain
class Cifar10Latent(LatentDomain):
    name, recipe_cls = "cifar10-latent", Cifar10LatentRecipe
    num_classes = 10  # CIFAR-10 class indices 0..9; label 10 is "no label" (classifier-free guidance)
    labels_are_cifar = True
    data_keys = ("classes", "resolution", "train_images", "source", "ae_profile")
    # smoke: the shipped sample (40 training images of each class) at 16 px; cpu: 10,000 training
    # images of the ten classes at 16 px (latents 4x8x8); gpu: all of CIFAR-10 at 32 px (4x8x8).
    profiles = {
        "smoke": dict(LATENT_NETS["smoke"], resolution=16, source="sample", ae_profile="smoke"),
        "cpu": dict(LATENT_NETS["cpu"], resolution=16, train_images=10_000, ae_profile="cpu"),
        "gpu": dict(LATENT_NETS["gpu"], resolution=32, ae_profile="gpu"),
    }
    train_defaults = Cifar10.train_defaults

    def _load_pixels(self):
        return load_images(self.recipe.image_recipe(), root=self.root, with_labels=True)

    def reference_images(self, with_labels: bool = False):
        """The test images of the recipe's classes (class-balanced as CIFAR-10's test set is); with labels too."""
        return load_images(self.recipe.image_recipe(), "test", root=self.root, with_labels=with_labels)

    def default_ae_recipe(self):
        from ..autoencoder import autoencoder_recipe

        r = self.recipe
        return autoencoder_recipe(r.ae_profile, classes=r.classes, resolution=r.resolution,
                                  train_images=r.train_images, source=r.source)

    @property
    def data_folder(self):
        from .images import find_cifar10

        return find_cifar10("sample" if self.recipe.source == "sample" else self.root)

    def check_autoencoder(self, ae) -> None:
        if ae.config["resolution"] != self.recipe.resolution:
            raise ValueError(f"the autoencoder {self.recipe.autoencoder} reads {ae.config['resolution']} px images; "
                             f"the data recipe asks for {self.recipe.resolution} px: pass resolution="
                             f"{ae.config['resolution']} or an autoencoder trained at {self.recipe.resolution} px")

