"""Prints the cost of one-step consistency sampling relative to a bare forward pass of its network.

The issue's target: sample_consistency with one noise level costs <= 1.05x the network's own
forward pass (the scalings and the sampler add only elementwise work). Both are timed in the
same process, interleaved, median of repeated runs; the ratio is what to read (timings on a
shared machine are noisy).

    python scripts/bench_one_step.py            # toy MLP (2-D) and the cpu-profile U-Net
"""

import statistics
import time

import torch

from fewstep_lab.nets.mlp import MLP
from fewstep_lab.nets.unet import UNet, unet_sizes
from fewstep_lab.precond import Precond, get_scalings
from fewstep_lab.sampling import sample_consistency


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure(name, net, shape, repeats):
    f = Precond(net, get_scalings("consistency")).eval()
    sigmas = torch.tensor([80.0, 0.0])
    x = 80.0 * torch.randn(shape)
    c_noise = torch.full((shape[0],), torch.tensor(80.0).log().item() / 4)
    x_in = x / (80.0**2 + 0.25) ** 0.5
    bare = lambda: net(x_in, c_noise)  # noqa: E731
    one_step = lambda: sample_consistency(f, x, sigmas)  # noqa: E731
    for fn in (bare, one_step):
        fn()  # warm-up
    t_bare, t_step = [], []
    for _ in range(5):  # interleave so that load changes hit both alike
        t_bare.append(_median_time(bare, repeats))
        t_step.append(_median_time(one_step, repeats))
    b, s = statistics.median(t_bare), statistics.median(t_step)
    print(f"{name:<34} bare forward {b * 1e3:8.2f} ms   one-step sampling {s * 1e3:8.2f} ms   ratio {s / b:.3f}")
    return s / b


if __name__ == "__main__":
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    measure("MLP 4x128, batch 50,000 (2-D)", MLP(), (50_000, 2), repeats=5)
    measure("U-Net cpu profile, batch 16, 32x32", UNet(**unet_sizes["cpu"]), (16, 3, 32, 32), repeats=3)
