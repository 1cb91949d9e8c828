"""Low-rank adapters (LoRA; Hu et al. 2021), written out here rather than taken from peft: the adapter is
part of the lesson (LCM-LoRA, Luo et al. 2023, is "teacher weights + a small trained difference").

A frozen layer with weight W (nn.Linear, or nn.Conv2d with any kernel) gets named adapters a, each a
pair A_a (r x in[, k, k]) and B_a (out x r) of rank r, and computes

    y = W x + b + sum_a  lambda_a (alpha_a / r_a) B_a A_a x,

with B_a initialised to zero (a fresh adapter leaves the model unchanged, bit for bit) and A_a as
nn.Linear's default. For a convolution, A_a is a convolution with W's kernel, stride and padding
into r channels and B_a a 1x1 convolution back (peft's layout), so B_a A_a is again a k x k kernel.
lambda_a (``set_scale``) is the adapter's weight at use time: LCM-LoRA's acceleration vector and a
style vector are combined as W + lambda_1 dW_1 + lambda_2 dW_2 (LCM-LoRA sec. 3, eq. 4).

The wrapper keeps the base layer's ``weight`` and ``bias`` under their own names, so a wrapped
model's state dict is the plain model's plus ``<layer>.lora_A.<name>`` / ``<layer>.lora_B.<name>``:
base checkpoints load into it unchanged. ``lora_state_dict`` / ``save_adapter`` keep only one
adapter's tensors (a safetensors file: tensors and a JSON header, never pickled code).
``merge`` folds lambda (alpha / r) B A into W (no extra cost at sampling) and ``unmerge`` takes it
out again (to float rounding).
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write_bytes

__all__ = ["LoRALayer", "inject_lora", "lora_layers", "set_scale", "lora_state_dict", "save_adapter",
           "load_adapter", "read_adapter_meta", "merge", "unmerge", "count_trainable", "AdapterError"]


class AdapterError(ValueError):
    """An adapter file does not fit the model (other layers, ranks or shapes), or is not an adapter file."""


class LoRALayer(nn.Module):
    """A frozen nn.Linear / nn.Conv2d (weight and bias kept under their own names) plus named low-rank adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, got {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise TypeError("LoRA wraps ordinary convolutions only (groups=1, zero padding)")
        self.conv = isinstance(base, nn.Conv2d)
        self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation) if self.conv else {}
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.alpha, self.scale, self.merged = {}, {}, {}  # per adapter; merged: the factor folded into W

    def add(self, name: str, rank: int, alpha: float | None = None) -> None:
        if not name.isidentifier():
            raise ValueError(f"an adapter name must be an identifier (letters, digits, _), got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"this layer has an adapter named {name!r} already")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"the LoRA rank must be an integer >= 1, got {rank!r}")
        out_f, in_f = self.weight.shape[:2]
        A = torch.empty(rank, in_f, *self.weight.shape[2:], dtype=self.weight.dtype, device=self.weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's / nn.Conv2d's default init
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(out_f, rank, dtype=A.dtype, device=A.device))
        self.alpha[name], self.scale[name] = float(rank if alpha is None else alpha), 1.0

    def factor(self, name: str) -> float:
        """lambda (alpha / r): what multiplies B A."""
        return self.scale[name] * self.alpha[name] / self.lora_B[name].shape[1]

    def delta(self, name: str) -> torch.Tensor:
        """B A as a weight of W's shape (unscaled)."""
        A, B = self.lora_A[name], self.lora_B[name]
        return (B @ A.flatten(1)).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            y = F.conv2d(x, self.weight, self.bias, **self.conv_args)
        else:
            y = F.linear(x, self.weight, self.bias)
        for name, A in self.lora_A.items():
            c = self.factor(name)
            if name in self.merged or c == 0:
                continue
            B = self.lora_B[name]
            h = F.conv2d(x, A, **self.conv_args) if self.conv else F.linear(x, A)
            y = y + c * (F.conv2d(h, B[:, :, None, None]) if self.conv else F.linear(h, B))
        return y

    def extra_repr(self) -> str:
        kind = "Conv2d" if self.conv else "Linear"
        ranks = {n: B.shape[1] for n, B in self.lora_B.items()}
        return f"{kind} {tuple(self.weight.shape)}, adapters (rank) {ranks}, scales {self.scale}"


def lora_layers(model: nn.Module, name: str | None = None) -> dict[str, LoRALayer]:
    """{qualified name: layer} of the model's LoRA layers (those holding adapter `name`, if given)."""
    return {k: m for k, m in model.named_modules() if isinstance(m, LoRALayer) and (name is None or name in m.lora_A)}


def inject_lora(module: nn.Module, rank: int, alpha: float | None = None, targets=(nn.Linear, nn.Conv2d),
                name: str = "default", exclude=()) -> list[str]:
    """Add adapter `name` (rank r, alpha: default r) to every `targets` layer of `module` whose qualified name
    contains none of the strings in `exclude`; base layers are wrapped once (LoRALayer). Everything else in
    `module` is frozen (base weights, biases, norms, embeddings and earlier adapters): only the new adapter
    trains. Returns the names of the adapted layers."""
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    module.requires_grad_(False)
    done = []
    for qual, child in list(module.named_modules()):
        if not qual or any(e in qual for e in exclude):
            continue
        if isinstance(child, LoRALayer):
            layer = child
        elif isinstance(child, targets) and isinstance(child, (nn.Linear, nn.Conv2d)):
            layer = _wrap(module, qual)
        else:
            continue
        layer.add(name, rank, alpha)
        done.append(qual)
    if not done:
        raise ValueError(f"no layer of {type(module).__name__} matched targets {targets} (exclude {exclude})")
    return done


def set_scale(model: nn.Module, name: str, scale: float) -> None:
    """Set adapter `name`'s weight lambda in every layer (unmerge it first if merged)."""
    layers = _layers_of(model, name)
    if any(name in m.merged for m in layers.values()):
        raise ValueError(f"adapter {name!r} is merged into the weights: unmerge(model, {name!r}) before rescaling")
    for m in layers.values():
        m.scale[name] = float(scale)


def _layers_of(model, name):
    layers = lora_layers(model, name)
    if not layers:
        known = sorted({n for m in lora_layers(model).values() for n in m.lora_A})
        raise KeyError(f"the model has no adapter {name!r}; it has {known}")
    return layers


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Only adapter `name`'s tensors: {'<layer>.lora_A': A, '<layer>.lora_B': B} (the adapter's own file)."""
    out = {}
    for qual, m in _layers_of(model, name).items():
        out[f"{qual}.lora_A"] = m.lora_A[name].detach().cpu().contiguous()
        out[f"{qual}.lora_B"] = m.lora_B[name].detach().cpu().contiguous()
    return out


def save_adapter(path, model: nn.Module, name: str = "default", meta: dict | None = None) -> None:
    """Write adapter `name` as a safetensors file (atomically): its tensors, alpha, and `meta` (JSON) in the header."""
    from safetensors.torch import save

    layers = _layers_of(model, name)
    alphas = {qual: m.alpha[name] for qual, m in layers.items()}
    header = {"format": "fewstep-lora-1", "alpha": json.dumps(alphas), "meta": json.dumps(dict(meta or {}))}
    atomic_write_bytes(path, save(lora_state_dict(model, name), metadata=header))


def _read(path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as err:
        raise AdapterError(f"{path} is not a safetensors file or is damaged ({type(err).__name__})") from None
    if header.get("format") != "fewstep-lora-1":
        raise AdapterError(f"{path} is not a fewstep LoRA adapter (save_adapter writes them)")
    return header, tensors


def read_adapter_meta(path) -> dict:
    """The JSON `meta` stored by save_adapter."""
    return json.loads(_read(path)[0]["meta"])


def load_adapter(path, model: nn.Module, name: str = "default", *, scale: float = 1.0) -> dict:
    """Add adapter `name` to `model` from a save_adapter file (layers wrapped as needed); returns its meta.

    The file must name exactly layers of `model` with fitting shapes; otherwise AdapterError says what differs.
    """
    header, tensors = _read(path)
    alphas = json.loads(header["alpha"])
    mods = dict(model.named_modules())
    missing = sorted(q for q in alphas if not isinstance(mods.get(q), (nn.Linear, nn.Conv2d, LoRALayer)))
    if missing or set(tensors) != {f"{q}.lora_{ab}" for q in alphas for ab in "AB"}:
        raise AdapterError(f"{path} does not fit this model: it adapts layers the model lacks ({missing[:4]}"
                           f"{' ...' if len(missing) > 4 else ''}); was it trained on another network?")
    for q in alphas:
        A, B, W = tensors[f"{q}.lora_A"], tensors[f"{q}.lora_B"], mods[q].weight
        if A.shape[1:] != W.shape[1:] or B.shape != (W.shape[0], A.shape[0]):
            raise AdapterError(f"{path} does not fit this model: layer {q} has weight {tuple(W.shape)}, the adapter "
                               f"A {tuple(A.shape)}, B {tuple(B.shape)} (another network size?)")
    for q, alpha in alphas.items():
        A, B = tensors[f"{q}.lora_A"], tensors[f"{q}.lora_B"]
        layer = mods[q] if isinstance(mods[q], LoRALayer) else _wrap(model, q)
        layer.add(name, A.shape[0], alpha)
        with torch.no_grad():
            layer.lora_A[name].copy_(A)
            layer.lora_B[name].copy_(B)
        layer.lora_A[name].requires_grad_(False)
        layer.lora_B[name].requires_grad_(False)
        layer.scale[name] = float(scale)
    return json.loads(header["meta"])


def _wrap(model, qual) -> LoRALayer:
    parent_name, _, attr = qual.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = LoRALayer(getattr(parent, attr))
    setattr(parent, attr, layer)
    return layer


@torch.no_grad()
def merge(model: nn.Module, name: str = "default") -> None:
    """W <- W + lambda (alpha / r) B A in every layer of adapter `name` (computed in float64, then rounded)."""
    for m in _layers_of(model, name).values():
        if name in m.merged:
            raise ValueError(f"adapter {name!r} is merged already")
        c = m.factor(name)
        m.weight.copy_((m.weight.double() + c * m.delta(name).double()).to(m.weight.dtype))
        m.merged[name] = c


@torch.no_grad()
def unmerge(model: nn.Module, name: str = "default") -> None:
    """Undo merge: W <- W - c B A with the factor c that was merged."""
    for m in _layers_of(model, name).values():
        if name not in m.merged:
            raise ValueError(f"adapter {name!r} is not merged")
        c = m.merged.pop(name)
        m.weight.copy_((m.weight.double() - c * m.delta(name).double()).to(m.weight.dtype))


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
