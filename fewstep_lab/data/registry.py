"""The data-domain registry: names to Domain classes (see domain.py), the built-in ones loaded on first use.

``get_domain(name)`` and ``resolve_data(word)`` (a --data word: a domain name or a toy dataset
name) are what the pipeline and the command line call. A domain registered from outside the
package (``register_domain``) is found the same way.
"""

from __future__ import annotations

from .domain import DOMAINS, register_domain

__all__ = ["DOMAINS", "register_domain", "get_domain", "resolve_data"]


def _builtins() -> None:
    from . import cifar10_domain, toy2d_domain  # noqa: F401  (each registers itself)


def get_domain(name: str) -> type:
    """The registered domain class `name`, or a ValueError listing the known ones."""
    _builtins()
    if name not in DOMAINS:
        raise ValueError(f"unknown data domain {name!r}; registered: {', '.join(sorted(DOMAINS))}")
    return DOMAINS[name]


def resolve_data(spec: str) -> tuple[str, dict]:
    """A --data word -> (domain name, data recipe overrides).

    A domain name ('toy2d', 'cifar10') takes the profile's defaults; a toy dataset name
    ('8gaussians', 'checkerboard', ...) is the toy2d domain with that dataset.
    """
    _builtins()
    if spec in DOMAINS:
        return spec, {}
    from .toy2d import DATASETS

    if spec in DATASETS:
        return "toy2d", {"dataset": spec}
    raise ValueError(f"unknown data {spec!r}; choose a domain ({', '.join(sorted(DOMAINS))}) or a toy dataset "
                     f"({', '.join(sorted(DATASETS))})")
