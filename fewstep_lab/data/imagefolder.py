"""Any folder of images as a latent domain: ``--data imagefolder:PATH`` (for LCF and latent models on your data).

The folder holds images directly (``PATH/*.png|jpg|jpeg|bmp|webp``: unlabelled) or in class
subfolders (``PATH/<class>/*``: labels are the sorted folder names -> 0..k-1). All images must
share one size; square images larger than the autoencoder's resolution are resized to it with
antialiasing (bilinear with a box prefilter, torch's ``antialias=True``); others are refused. Every
way a folder can be wrong (missing, empty, no images, an unreadable image, mixed sizes, not square,
too small) raises one clear error that names the problem and the fix. Images are decoded once per
domain (PIL); their latents are cached like CIFAR-10's (outside the folder). The default
autoencoder is the profile's CIFAR-10 one (``LatentDomain``). FD is against the folder's own images
(there is no test split): a floor of n folder images against all of them is optimistic, since
they are part of the reference. No paper: this is plumbing around latent_domain.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cifar10_domain import Cifar10
from .domain import register_domain
from .download import DataUnavailableError
from .latent_domain import LATENT_NETS, LatentDomain, LatentRecipe

__all__ = ["ImageFolderLatentRecipe", "ImageFolderLatent", "load_image_folder", "IMAGE_FOLDER_SUFFIXES"]

IMAGE_FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_LAYOUT = "PATH/*.png|jpg (unlabelled) or PATH/<class>/*.png|jpg (labelled by folder name)"


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_FOLDER_SUFFIXES and not p.name.startswith(".")


def _list(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """(image files, their labels, class names) of a folder, or a ValueError naming what is wrong."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        raise ValueError(f"the image folder {folder} is empty; put images in it ({_LAYOUT})")
    subdirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if _is_image(p)]
    if subdirs and loose:
        raise ValueError(f"the image folder {folder} mixes images ({loose[0].name}, ...) and class folders "
                         f"({subdirs[0].name}/, ...); move the loose images into a class folder, or remove the folders")
    if not subdirs:
        if not loose:
            others = ", ".join(p.name for p in entries[:3])
            raise ValueError(f"the image folder {folder} holds no images ({len(entries)} other files: {others}"
                             f"{', ...' if len(entries) > 3 else ''}); images must end in "
                             f"{', '.join(IMAGE_FOLDER_SUFFIXES)} ({_LAYOUT})")
        return loose, [], []
    files, labels = [], []
    for k, sub in enumerate(subdirs):
        found = sorted(p for p in sub.iterdir() if _is_image(p))
        if not found:
            raise ValueError(f"the class folder {sub} holds no images (ending in {', '.join(IMAGE_FOLDER_SUFFIXES)}); "
                             "add images to it or remove it")
        files += found
        labels += [k] * len(found)
    return files, labels, [p.name for p in subdirs]


def load_image_folder(path, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """(images (N, 3, R, R) uint8 at `resolution`, labels (N,) int64 or None, class names) of an image folder."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataUnavailableError(f"the image folder {folder} does not exist; pass an existing folder "
                                   f"(--data imagefolder:PATH, {_LAYOUT})")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder; pass the folder that holds the images ({_LAYOUT})")
    files, labels, classes = _list(folder)
    arrays, sizes = [], {}
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot read the image {f} ({type(err).__name__}: {err}); "
                             "delete or replace it (it may be damaged or not an image)") from None
        sizes.setdefault(arr.shape[:2], f)
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise ValueError(f"the images of {folder} differ in size: {f1.name} is {s1[1]}x{s1[0]}, {f2.name} is "
                             f"{s2[1]}x{s2[0]}; resize them all to one square size (at least {resolution}x{resolution})")
        arrays.append(arr)
    h, w = next(iter(sizes))
    if h != w or h < resolution:
        problem = "not square" if h != w else f"smaller than the autoencoder's {resolution}x{resolution}"
        raise ValueError(f"the images of {folder} are {w}x{h}, {problem}; crop or resize them to a square of at "
                         f"least {resolution}x{resolution} (they are resized to {resolution}x{resolution})")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if h != resolution:  # downsampling with antialiasing (a box prefilter), then back to uint8
        images = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return images, (torch.tensor(labels, dtype=torch.long) if classes else None), classes


@dataclass(frozen=True)
class ImageFolderLatentRecipe(LatentRecipe):
    """A folder of images (an absolute path; see load_image_folder), seen through an autoencoder."""

    folder: str = ""  # "" only as the dataclass default: the domain refuses it when it is used

    def check(self) -> None:
        super().check()
        if not isinstance(self.folder, str):
            raise ValueError(f"folder must be a path string, got {self.folder!r}")


@register_domain
class ImageFolderLatent(LatentDomain):
    name, recipe_cls = "imagefolder", ImageFolderLatentRecipe
    data_keys = ("folder", "ae_profile")
    profiles = {"smoke": dict(LATENT_NETS["smoke"], ae_profile="smoke"),
                "cpu": dict(LATENT_NETS["cpu"], ae_profile="cpu"),
                "gpu": dict(LATENT_NETS["gpu"], ae_profile="gpu")}

    def __init__(self, recipe, *, root=None, autoencoder=None):
        super().__init__(recipe, root=root, autoencoder=autoencoder)
        self._classes = None

    train_defaults = Cifar10.train_defaults

    @property
    def data_folder(self) -> Path:
        if not self.recipe.folder.strip():
            raise ValueError("the imagefolder domain needs a folder: --data imagefolder:PATH (folder='PATH')")
        return Path(self.recipe.folder).expanduser().resolve()

    def _load_pixels(self):
        images, labels, self._classes = load_image_folder(self.data_folder, self.resolution)
        return images, labels

    @property
    def classes(self) -> list[str]:
        """The class folder names (label k is classes[k]); [] for an unlabelled folder. Lists, decodes nothing."""
        if self._classes is None:
            folder = self.data_folder
            if not folder.is_dir():
                self.images  # noqa: B018  (raises the folder's error)
            self._classes = _list(folder)[2]
        return self._classes

    @property
    def num_classes(self):
        """The number of class folders, or None for a folder of loose images."""
        return len(self.classes) or None

    def reference_images(self):
        return self.images

    def default_ae_recipe(self):
        from ..autoencoder import autoencoder_recipe

        return autoencoder_recipe(self.recipe.ae_profile)
