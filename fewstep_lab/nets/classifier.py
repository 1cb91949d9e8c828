"""A small residual CIFAR-10 classifier whose pooled features define the course's "FD".

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium", Sec. 3, the distance between Gaussians fitted to Inception-v3 pool
features) needs an ImageNet network that these machines cannot download. The course ships
this network instead, trained on CIFAR-10 by scripts/train_fd_classifier.py, and calls the
same distance on its features "FD" (fewstep_lab/metrics_images.py): comparable inside the
course, never with published FID numbers.

Architecture, chosen for a 2-core CPU budget: a 2x2 stride-2 "patchify" stem (Liu et al.
2022, "A ConvNet for the 2020s", Sec. 2.3) takes 32x32 images to 16x16 at once, so no layer
runs at full resolution; then two stages of conv-BN-ReLU, 2x2 max-pool and one residual
block ``x + f(x)`` (He et al. 2016, "Deep Residual Learning", eq. 1), the layout of the fast
ResNet-9 CIFAR-10 baselines at a quarter of their width; global average pooling gives the
``features`` (``widths[-1]``-dimensional, 128 by default) and one linear layer the logits.
Default size: 463,690 parameters (1.9 MB of float32), 19 M multiply-adds per 32x32 image;
the shipped weights reach 75.3% test accuracy after 2.5 epochs (31 min on a shared 2-core CPU).
Inputs are images in [-1, 1] (``fewstep_lab.data.images.to_model_range``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CifarClassifier"]


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class _Residual(nn.Module):
    """``x + f(x)`` with f two conv-BN-ReLU layers (He et al. 2016, eq. 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.f = nn.Sequential(_conv_bn_relu(channels, channels), _conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class CifarClassifier(nn.Module):
    """Patchify stem + two residual stages + global average pooling (see the module docstring)."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10):
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {widths}")
        w0, w1, w2 = (int(w) for w in widths)
        self.widths, self.num_classes = (w0, w1, w2), int(num_classes)
        self.body = nn.Sequential(
            _conv_bn_relu(3, w0, kernel=2, stride=2),           # 32x32 -> 16x16 patches
            _conv_bn_relu(w0, w1), nn.MaxPool2d(2), _Residual(w1),  # -> 8x8
            _conv_bn_relu(w1, w2), nn.MaxPool2d(2), _Residual(w2),  # -> 4x4
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(w2, self.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (globally average-pooled) features, (B, 3, 32, 32) in [-1, 1] -> (B, d)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (B, 3, 32, 32) in [-1, 1] -> (B, num_classes)."""
        return self.head(self.features(x))
