"""Latent diffusion's first stage on CIFAR-10: train, load, measure and apply a KL autoencoder.

``train_autoencoder`` fits ``nets.autoencoder.KLAutoencoder`` with ``losses.autoencoder`` through
the course's one training loop (``train.train``: checkpoints, resume, NaN stop, lock, atomic
writes), then sets the latent scaling factor to 1 / std of the encoded training set's latent
means (Rombach et al. 2022, sec. 4.3.2 and appendix G; Stable Diffusion's 0.18215) and stores it
in the checkpoint (a buffer of the state dict). The run is described by an ``AutoencoderRecipe``
stored as JSON in the checkpoint's metadata (never pickled). ``evaluate_autoencoder`` reports the
reconstruction PSNR of test images and the course's FD (``metrics_images``, not FID) of the
reconstructions of training images against the test reference, beside the FD of the same
training images themselves: the gap is what the autoencoder costs a latent model that
reproduced its training latents exactly. ``encode_images`` turns uint8 images into (scaled)
latent means, optionally cached on disk outside the data folder, keyed by the autoencoder's
weights and the images. No other paper: the rest is plumbing.

Measured (cpu profile: 16x16x3 -> 4x8x8, 159k parameters, 1,200 steps of 32 images, one thread on
a shared 2-core machine): test PSNR 26.1 dB (training images 25.9 dB); FD of 1,000 reconstructed
training images 0.60 against 0.04 for the images themselves; scaling factor 0.545; encoding the
10,000 training images took 6.9 s. The shipped classifier reads 16 px test images (repeated to
32 px) right 34.7% of the time and their reconstructions 25.6% (``reference_accuracy`` of
cifar10-latent): the ceiling for the accuracy of generated 16 px images.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoints import CheckpointError, load_checkpoint, read_checkpoint_meta, save_checkpoint
from .data.images import to_model_range
from .io import FileLock, LockedError
from .nets.autoencoder import KLAutoencoder, autoencoder_sizes
from .data.cifar10_domain import CifarImagesRecipe
from .recipes import _finite, apply_overrides, recipe_from_fields

__all__ = ["AutoencoderRecipe", "autoencoder_recipe", "build_autoencoder", "train_autoencoder", "load_autoencoder",
           "load_or_train_autoencoder", "autoencoder_recipe_of", "latent_std", "psnr", "reconstruct",
           "evaluate_autoencoder", "encode_images", "autoencoder_key", "ENCODE_COUNT"]

FORMAT = 1  # of the "autoencoder" entry of a checkpoint's metadata


@dataclass(frozen=True)
class AutoencoderRecipe(CifarImagesRecipe):
    """Which images (as Cifar10Recipe), the autoencoder's sizes, its loss weights and its optimisation."""

    latent_channels: int = 4
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 1
    kl_weight: float = 1e-6  # LDM's KL-f4/f8 configs (with the loss per pixel sum, see losses/autoencoder.py)
    feature_weight: float = 0.0  # > 0: the shipped classifier's features as a perceptual-loss stand-in
    steps: int = 20_000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 0
    grad_clip: float | None = 1.0
    seed: int = 0

    def check(self) -> None:
        super().check()
        for name in ("latent_channels", "channels", "num_blocks", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.channel_mult or self.resolution % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"channel_mult {self.channel_mult} must be non-empty with 2**(levels-1) dividing the "
                             f"resolution {self.resolution}")
        if not isinstance(self.steps, int) or self.steps < 0 or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"steps and warmup must be integers >= 0, got {self.steps!r} and {self.warmup!r}")
        _finite("lr", self.lr, positive=True)
        _finite("kl_weight", self.kl_weight, nonneg=True)
        _finite("feature_weight", self.feature_weight, nonneg=True)
        if self.grad_clip is not None:
            _finite("grad_clip", self.grad_clip, positive=True)

    def net_kwargs(self) -> dict:
        return dict(latent_channels=self.latent_channels, channels=self.channels, channel_mult=self.channel_mult,
                    num_blocks=self.num_blocks, resolution=self.resolution)

    def image_recipe(self):
        """The Cifar10Recipe of the same images (its network fields unused)."""
        from .data.cifar10_domain import Cifar10Recipe

        return Cifar10Recipe(classes=self.classes, resolution=self.resolution, train_images=self.train_images,
                             source=self.source)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        r = self.resolution // 2 ** (len(self.channel_mult) - 1)
        return (self.latent_channels, r, r)


def _sizes(p: str) -> dict:
    return {k: v for k, v in autoencoder_sizes[p].items()}


# Per profile: smoke = the shipped sample (400 images of the ten classes at 16 px), seconds;
# cpu = 10,000 training images of the ten classes at 16 px (0.07 s of CPU per step on one thread:
# 1,200 steps took 172 s of wall time on the shared 2-core machine under a load of 4-8);
# gpu = all of CIFAR-10 at 32 px (not measured here: no GPU).
PROFILES = {
    "smoke": dict(_sizes("smoke"), source="sample", steps=20, batch_size=16, lr=2e-3),
    "cpu": dict(_sizes("cpu"), train_images=10_000, steps=1200, batch_size=32, lr=1e-3),
    "gpu": dict(_sizes("gpu"), steps=40_000, batch_size=128, lr=5e-4, warmup=500),
}


def autoencoder_recipe(profile: str | None = None, **overrides) -> AutoencoderRecipe:
    """The AutoencoderRecipe of a profile (smoke | cpu | gpu), with field overrides."""
    from .profiles import get_profile

    return apply_overrides(AutoencoderRecipe(), {**PROFILES[get_profile(profile)], **overrides})


def build_autoencoder(recipe: AutoencoderRecipe) -> KLAutoencoder:
    """A fresh autoencoder; its weights depend only on recipe.seed (the caller's RNG state is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return KLAutoencoder(**recipe.net_kwargs())


# ----------------------------------------------------------------------------- encoding

ENCODE_COUNT = [0]  # images encoded by encode_images so far in this process (the tests read it)


@torch.no_grad()
def _encode_means(ae: KLAutoencoder, images: torch.Tensor, batch_size: int, flip: bool = False) -> torch.Tensor:
    device = ae.scaling_factor.device
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i:i + batch_size]).to(device)
        out.append(ae.encode(x.flip(-1) if flip else x)[0].float().cpu())
    ENCODE_COUNT[0] += len(images)
    return torch.cat(out) if out else torch.zeros(0, *ae.latent_shape)


def autoencoder_key(ae: KLAutoencoder) -> str:
    """A fingerprint of the autoencoder's weights and scaling factor (its whole state dict)."""
    h = hashlib.sha256()
    for name, t in sorted(ae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _images_key(images: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def encode_images(ae: KLAutoencoder, images: torch.Tensor, *, batch_size: int = 256, flip: bool = False,
                  cache: bool = False, cache_dir=None, data_folder=None) -> torch.Tensor:
    """uint8 images (N, 3, R, R) -> the scaled latent means scaling_factor * E(x), float32 (N, c, R/f, R/f).

    flip: encode the mirror images instead. cache: keep the result in ``cache_dir`` (else env
    FEWSTEP_CACHE, else ~/.cache/fewstep_lab; never inside ``data_folder``), keyed by the
    autoencoder's weights (``autoencoder_key``) and the images, written atomically.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"encode_images takes uint8 images (N, 3, R, R), got {images.dtype} {tuple(images.shape)}")
    ae.eval()
    scale = float(ae.scaling_factor)
    if not cache:
        return _encode_means(ae, images, batch_size, flip) * scale
    from safetensors.torch import load_file, save

    from .data.images import resolve_cache_dir
    from .io import atomic_write_bytes

    folder = resolve_cache_dir(cache_dir, Path(data_folder or "/nonexistent/fewstep-no-data-folder").resolve())
    path = folder / "latents" / f"latents-{autoencoder_key(ae)}-{_images_key(images)}{'-flip' if flip else ''}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["latents"]
        except Exception:  # a damaged cache is only a cache: encode again
            path.unlink(missing_ok=True)
    latents = (_encode_means(ae, images, batch_size, flip) * scale).contiguous()
    atomic_write_bytes(path, save({"latents": latents}))
    return latents


@torch.no_grad()
def reconstruct(ae: KLAutoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """from_latent(to_latent(x)) of uint8 images, clipped to [-1, 1]: float32 (N, 3, R, R) on the CPU."""
    device, out = ae.scaling_factor.device, []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i:i + batch_size]).to(device)
        out.append(ae.from_latent(ae.to_latent(x)).clamp(-1, 1).float().cpu())
    return torch.cat(out)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio 10 log10(2^2 / MSE) of images in [-1, 1] (data range 2), averaged over images.

    uint8 images are mapped to [-1, 1] first; an image pair with MSE 0 counts as 100 dB.
    """
    x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
    y = to_model_range(y) if y.dtype == torch.uint8 else y.float()
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"psnr needs two image batches of one shape (B, C, H, W), got {tuple(x.shape)}, {tuple(y.shape)}")
    mse = (x - y).pow(2).flatten(1).mean(1).double()
    return float(torch.where(mse > 0, 10 * torch.log10(4.0 / mse.clamp_min(1e-20)), torch.full_like(mse, 100.0)).mean())


# ----------------------------------------------------------------------------- training and loading

def _meta(recipe: AutoencoderRecipe, scaled: bool) -> dict:
    return {"autoencoder": {"format": FORMAT, "recipe": asdict(recipe), "net": {**recipe.net_kwargs(), "in_channels": 3},
                            "scaled": scaled}}


def _stored_recipe(path: Path) -> tuple[AutoencoderRecipe, dict]:
    meta = read_checkpoint_meta(path)
    entry = meta.get("autoencoder")
    if not isinstance(entry, dict):
        what = f"a {meta['run'].get('method')} model" if isinstance(meta.get("run"), dict) else "something else"
        raise CheckpointError(f"{path} holds {what}, not an autoencoder; train one with "
                              f"`fewstep autoencoder --data cifar10 --out {path.name}` or pass the right file")
    if entry.get("format") != FORMAT:
        raise CheckpointError(f"{path} holds an autoencoder in an unknown format ({entry.get('format')!r}); retrain it")
    try:
        recipe = recipe_from_fields(AutoencoderRecipe, entry.get("recipe"))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has an invalid autoencoder description ({err}); retrain it") from None
    return recipe, {**entry, "step": meta["step"]}


def _comparable(recipe: AutoencoderRecipe) -> dict:
    return {k: v for k, v in asdict(recipe).items() if k != "steps"}


@torch.no_grad()
def latent_std(ae: KLAutoencoder, images: torch.Tensor, batch_size: int = 256) -> float:
    """The standard deviation of all entries of the (unscaled) latent means E(x) of uint8 images."""
    s1 = s2 = 0.0
    n = 0
    device = ae.scaling_factor.device
    for i in range(0, len(images), batch_size):
        m = ae.encode(to_model_range(images[i:i + batch_size]).to(device))[0].double()
        s1, s2, n = s1 + float(m.sum()), s2 + float(m.pow(2).sum()), n + m.numel()
    return ((s2 - s1 * s1 / n) / (n - 1)) ** 0.5


def train_autoencoder(recipe: AutoencoderRecipe, *, checkpoint_path=None, progress: bool = True, root=None,
                      restart: bool = False, device=None, checkpoint_every: int = 0) -> KLAutoencoder:
    """Train the recipe's autoencoder (train.train), then set its scaling factor = 1 / std of the training latents.

    With checkpoint_path: resumed when it holds this recipe (a larger ``steps`` extends it; a
    finished one is just loaded), refused when it holds another (unless restart=True), and
    rewritten at the end with the scaling factor in the state dict. Returns the autoencoder in
    eval mode, frozen.
    """
    from .data.cifar10_domain import Cifar10, _to32
    from .losses.autoencoder import autoencoder_loss
    from .profiles import get_device
    from .train import train

    path = None if checkpoint_path is None else Path(checkpoint_path)
    if path is not None and path.is_file() and not restart:
        stored, entry = _stored_recipe(path)
        if _comparable(stored) != _comparable(recipe):
            raise ValueError(f"{path} holds another autoencoder recipe ({stored}); pass --restart (restart=True) "
                             "to replace it, or choose another --out")
        if entry["scaled"] and entry["step"] >= recipe.steps:
            return load_autoencoder(path, device=device or "cpu")
    device = get_device(device)
    ae = build_autoencoder(recipe)
    pixels = Cifar10(recipe.image_recipe(), root=root)
    feature_fn = None
    if recipe.feature_weight > 0:
        from .metrics_images import load_fd_classifier

        classifier = load_fd_classifier(device=device)
        feature_fn = lambda x: classifier.features(_to32(x))  # noqa: E731

    def loss_fn(model, x, ctx):
        return autoencoder_loss(model, x, kl_weight=recipe.kl_weight, generator=ctx.generator,
                                feature_fn=feature_fn, feature_weight=recipe.feature_weight)

    state = train(ae, loss_fn, pixels.batch_fn(recipe.batch_size, device), steps=recipe.steps, lr=recipe.lr,
                  warmup=recipe.warmup, grad_clip=recipe.grad_clip, seed=recipe.seed, device=device,
                  checkpoint_path=path, checkpoint_every=checkpoint_every, resume=not restart,
                  meta=_meta(recipe, scaled=False), log_every=max(min(100, recipe.steps // 50), 1), progress=progress)
    # LDM's choice: rescale latents to unit standard deviation over the training set.
    std = latent_std(ae, pixels.images)
    if not std > 0:
        raise ValueError(f"the encoded training latents have standard deviation {std}; the autoencoder collapsed: "
                         "train it longer or with another lr")
    ae.scaling_factor.fill_(1.0 / std)
    if path is not None:
        with FileLock(path, purpose="writing the autoencoder's scaling factor into"):
            save_checkpoint(path, state, _meta(recipe, scaled=True))
    return ae.eval().requires_grad_(False)


def load_autoencoder(path, *, device="cpu") -> KLAutoencoder:
    """The autoencoder of a checkpoint written by train_autoencoder: eval mode, frozen, scaling factor set."""
    path = Path(path)
    recipe, entry = _stored_recipe(path)
    if not entry["scaled"]:
        raise CheckpointError(f"{path} holds an autoencoder whose training has not finished (step {entry['step']} "
                              f"of {recipe.steps}, no scaling factor yet); rerun `fewstep autoencoder` with "
                              f"--out {path} to finish it")
    ae = KLAutoencoder(**recipe.net_kwargs())
    load_checkpoint(path, ae, which="model")
    return ae.to(device).eval().requires_grad_(False)


def autoencoder_recipe_of(path) -> AutoencoderRecipe:
    """The AutoencoderRecipe stored in a checkpoint (no weights loaded)."""
    return _stored_recipe(Path(path))[0]


def load_or_train_autoencoder(recipe: AutoencoderRecipe, path, *, root=None, progress: bool = True, device=None,
                              wait_s: float = 3600.0) -> KLAutoencoder:
    """The autoencoder at `path`, trained there first (under a lock) when missing or unfinished.

    Used by the latent domains for their default autoencoder: several processes asking at once
    train it once; the others wait for it (up to wait_s seconds).
    """
    path = Path(path)
    gate = FileLock(path.with_name(path.name + ".first-use"), purpose="training the default autoencoder")
    t0 = time.monotonic()
    while True:
        try:
            with gate:
                if path.is_file():
                    stored, entry = _stored_recipe(path)
                    if _comparable(stored) == _comparable(recipe) and entry["scaled"] and entry["step"] >= recipe.steps:
                        return load_autoencoder(path, device=device or "cpu")
                print(f"training the autoencoder {path} once ({recipe.steps} steps)", flush=True)
                return train_autoencoder(recipe, checkpoint_path=path, progress=progress, root=root, device=device,
                                         restart=not _resumable(path, recipe),
                                         checkpoint_every=max(recipe.steps // 10, 1))
        except LockedError:
            if time.monotonic() - t0 > wait_s:
                raise
            time.sleep(2.0)


def _resumable(path: Path, recipe: AutoencoderRecipe) -> bool:
    if not path.is_file():
        return True
    try:
        return _comparable(_stored_recipe(path)[0]) == _comparable(recipe)
    except (CheckpointError, FileNotFoundError):
        return False


def evaluate_autoencoder(ae: KLAutoencoder, recipe: AutoencoderRecipe, *, n: int = 1000, root=None,
                         batch_size: int = 256) -> dict:
    """PSNR of n test images' reconstructions; FD of n training images' reconstructions and of the images themselves.

    Both FDs are against the test images of the recipe's classes (the cifar10 domain's
    reference): ``fd_recon - fd_floor`` is what decoding costs a latent model that reproduced
    its training latents exactly. Returns dict(psnr, psnr_train, fd_recon, fd_floor, n, n_test).
    """
    from .data.cifar10_domain import Cifar10, load_images

    pixels = Cifar10(recipe.image_recipe(), root=root)
    g = torch.Generator().manual_seed(0)
    test = load_images(recipe.image_recipe(), "test", root=root)
    test = test[torch.randperm(len(test), generator=g)[:n]]
    n_train = min(n, len(pixels.images))
    # the floor's own choice of training images (Cifar10.floor, seed 0)
    train_idx = torch.randperm(len(pixels.images), generator=torch.Generator().manual_seed(0))[:n_train]
    train = pixels.images[train_idx]
    rec_train = reconstruct(ae, train, batch_size)
    return dict(psnr=psnr(reconstruct(ae, test, batch_size), test), psnr_train=psnr(rec_train, train),
                fd_recon=pixels.fd(rec_train), fd_floor=pixels.fd(train), n=n_train, n_test=len(test))
