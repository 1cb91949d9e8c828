"""The data-domain registry: names to Domain classes (see domain.py), the built-in ones loaded on first use.

``get_domain(name)`` and ``resolve_data(word)`` (a --data word: a domain name or a toy dataset
name) are what the pipeline and the command line call. A domain registered from outside the
package (``register_domain``) is found the same way.
"""

from __future__ import annotations

from .domain import DOMAINS, register_domain

__all__ = ["DOMAINS", "register_domain", "get_domain", "resolve_data"]


def _builtins() -> None:
    from . import cifar10_domain, imagefolder, latent_domain, toy2d_domain  # noqa: F401  (each registers itself)


def get_domain(name: str) -> type:
    """The registered domain class `name`, or a ValueError listing the known ones."""
    _builtins()
    if name not in DOMAINS:
        raise ValueError(f"unknown data domain {name!r}; registered: {', '.join(sorted(DOMAINS))}")
    return DOMAINS[name]


def resolve_data(spec: str) -> tuple[str, dict]:
    """A --data word -> (domain name, data recipe overrides).

    A domain name ('toy2d', 'cifar10', 'cifar10-latent') takes the profile's defaults; a toy dataset
    name ('8gaussians', 'checkerboard', ...) is the toy2d domain with that dataset; 'imagefolder:PATH'
    is the imagefolder domain on that folder (stored as an absolute path).
    """
    _builtins()
    if spec.startswith("imagefolder:"):
        from pathlib import Path

        folder = spec.split(":", 1)[1].strip()
        if not folder:
            raise ValueError("imagefolder: needs a folder, e.g. --data imagefolder:path/to/images")
        return "imagefolder", {"folder": str(Path(folder).expanduser().resolve())}
    if spec == "imagefolder":
        raise ValueError("the imagefolder domain needs a folder: --data imagefolder:PATH")
    if spec in DOMAINS:
        return spec, {}
    from .toy2d import DATASETS

    if spec in DATASETS:
        return "toy2d", {"dataset": spec}
    raise ValueError(f"unknown data {spec!r}; choose a domain ({', '.join(sorted(DOMAINS))}) or a toy dataset "
                     f"({', '.join(sorted(DATASETS))}) or imagefolder:PATH")
