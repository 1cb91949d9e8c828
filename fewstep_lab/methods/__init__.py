"""The method registry: one name per method, one module per family.

    diffusion.py    edm (EDM teacher), ddpm (DDPM epsilon-prediction)
    consistency.py  cd, ct, ict (consistency distillation / training / improved training)
    progressive.py  pd (progressive distillation)
    guided.py       edm-cfg (class-conditional EDM teacher with label dropout, for guidance)
    guided.py also  ddpm-cfg (class-conditional DDPM epsilon teacher, LCM's Stable-Diffusion-like teacher)
    lcm.py          lcm (latent consistency distillation of a guided teacher)
    lcf.py          lcf (latent consistency fine-tuning of an LCM on new data, no teacher)
    lora.py         lcm-lora (LCD into a LoRA of the teacher), lora (style LoRA); combine, export_adapter

A new method is one new module that subclasses ``Method`` and calls ``register``; code outside
the package can register its own (see the README's "How to add a method").
"""

from __future__ import annotations

from .base import Method, copy_teacher_net, sampler_nfe

__all__ = ["Method", "register", "unregister", "get_method", "METHODS", "copy_teacher_net", "sampler_nfe"]

METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add `method` (an instance) to the registry under method.name; returns it."""
    if not isinstance(method, Method) or not method.name:
        raise TypeError("register() takes a Method instance with a non-empty .name")
    if method.name in METHODS and not replace:
        raise ValueError(f"a method named {method.name!r} is registered already; pass replace=True to override")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register their own clean up with this)."""
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method `name`, or a ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import consistency, diffusion, guided, lcf, lcm, lora, progressive  # noqa: E402,F401  (each registers)
