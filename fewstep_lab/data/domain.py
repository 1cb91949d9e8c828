"""What a data domain is: training batches, the network that fits the data, and how samples are scored.

A domain is a class registered by name (``toy2d``: every 2-D dataset, with the exact mixture
denoisers; ``cifar10``: CIFAR-10 pixels at 32 or 16 px; ``cifar10-latent`` and ``imagefolder:PATH``: latents of a KL autoencoder, decoded for evaluation). An
instance wraps one data recipe and says:

- ``shape``: the shape of one sample; ``noise(n, generator)``: standard normal draws of it;
- ``batch_fn(batch_size, device, labels=False)``: ``fn(generator) -> x0`` (or ``(x0, labels)``);
- ``make_net(noise_scale=1.0, dropout=None)``: the bare network ``F(x_in, c_noise, cond)``,
  sized by the data recipe (an MLP for 2-D, the U-Net for images);
- ``exact_denoiser``: the closed-form denoiser when the data has one (else None);
- ``evaluate(D, sampler, sigmas, n=, seeds=, **sampler_kwargs)`` and ``floor(n, seeds)``: the
  domain's metric (sliced W2 for 2-D, FD for images) and its data-vs-data floor;
- ``same_data(other_recipe)``: whether a teacher trained on ``other_recipe`` saw the same data;
- ``num_classes``: the class count of labelled data (else None); ``generate(..., cond=...)``
  slices a batch-first condition (labels, or a tuple such as LCM's (labels, w)) per batch.

Nothing here knows which method made a model. Class attributes ``profiles`` (data recipe per
profile) and ``train_defaults`` (training numbers every method shares on this domain, per
profile) feed ``recipes`` (see its docstring for the order). No paper: this is the contract.
"""

from __future__ import annotations

import torch

__all__ = ["Domain", "DOMAINS", "register_domain"]

DOMAINS: dict[str, type] = {}


class Domain:
    name: str = ""
    recipe_cls: type = None
    profiles: dict = {}  # {profile: {data recipe field: value}}
    train_defaults: dict = {}  # {profile: {TrainRecipe field: value}}
    shape: tuple = ()

    def __init__(self, recipe, *, root=None):
        if not isinstance(recipe, self.recipe_cls):
            raise TypeError(f"the {self.name} domain needs a {self.recipe_cls.__name__}, got {type(recipe).__name__}")
        self.recipe, self.root = recipe, root

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, *self.shape, generator=generator)

    exact_denoiser = None
    num_classes = None  # labelled data: the number of classes (the nets' label slot num_classes = none)

    @property
    def bf16(self) -> bool:
        """Train under bf16 autocast: the recipe's ``bf16`` field when it has one (image domains)."""
        return bool(getattr(self.recipe, "bf16", False))

    @property
    def memory_format(self):
        """channels_last when the recipe asks for it (image domains), else the contiguous format."""
        return torch.channels_last if getattr(self.recipe, "channels_last", False) else torch.contiguous_format

    default_n = 50_000  # samples per evaluation
    default_seeds = 3
    metric = "metric"

    def postprocess(self, x: torch.Tensor) -> torch.Tensor:
        """What a finished sample becomes (images: clipped to [-1, 1], as saved)."""
        return x

    @torch.no_grad()
    def generate(self, D, sampler: str, sigmas, n: int, *, seed: int = 0, batch_size: int | None = None,
                 device=None, **sampler_kwargs) -> torch.Tensor:
        """n samples of `sampler` driven by D on `sigmas`, in batches, from one generator seeded with `seed`."""
        from ..sampling import get_sampler

        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of samples must be an integer >= 1, got {n!r}")
        fn, grid = get_sampler(sampler), torch.as_tensor(sigmas, dtype=torch.float64)
        if device is None:
            params = getattr(D, "parameters", None)
            p = next(params(), None) if callable(params) else None
            device = p.device if p is not None else torch.device("cpu")
        g, out, batch_size = torch.Generator().manual_seed(seed), [], batch_size or n
        cond = sampler_kwargs.pop("cond", None)
        for i in range(0, n, batch_size):
            x = (grid[0] * self.noise(min(batch_size, n - i), g)).to(torch.float32).to(device)
            if cond is not None:  # batch-first conditions (labels, or a tuple such as (labels, w)) are sliced
                sampler_kwargs["cond"] = _slice_cond(cond, i, i + len(x), n, device)
            x = fn(D, x, grid, generator=g, **sampler_kwargs)
            out.append(self.postprocess((x[0] if isinstance(x, tuple) else x).float()).cpu())
        return torch.cat(out)

    def same_data(self, other) -> bool:
        return other == self.recipe

    def __repr__(self) -> str:
        return f"<{self.name} domain: {self.recipe}>"


def _slice_cond(cond, i: int, j: int, n: int, device):
    """Rows i:j of a batch-first condition: a (n, ...) tensor, or a tuple of them (scalars and None kept)."""
    if isinstance(cond, (tuple, list)):
        return tuple(_slice_cond(c, i, j, n, device) for c in cond)
    if isinstance(cond, torch.Tensor) and cond.ndim > 0:
        if cond.shape[0] != n:
            raise ValueError(f"cond must hold one entry per sample ({n}), got shape {tuple(cond.shape)}")
        return cond[i:j].to(device)
    return cond


def register_domain(cls: type) -> type:
    """Class decorator: add a Domain subclass to the registry under cls.name."""
    if not (isinstance(cls, type) and issubclass(cls, Domain)) or not cls.name:
        raise TypeError("register_domain takes a Domain subclass with a non-empty .name")
    DOMAINS[cls.name] = cls
    return cls
