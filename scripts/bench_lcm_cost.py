"""Prints the cost of one LCM sampling step against a bare forward pass of its student plus one decoder call.

Issue 10's target: one step of ``sample_lcm`` (the boundary scalings, the w-embedding, the
re-noising) costs <= 1.05x a bare forward pass of the student's network, plus one decoder call
for latent models (samples are images only after decoding). Both sides are timed in the same
process, interleaved, median of repeated runs; read the ratio (timings on a shared machine are
noisy). Also prints the wall time per image of 1/2/4-step latent LCM sampling including decoding.

    python scripts/bench_lcm_cost.py            # toy MLP (2-D) and the cpu-profile latent U-Net + decoder
"""

import statistics

import torch
from bench_one_step import _median_time  # scripts/ is on sys.path when run as a script

from fewstep_lab.nets.autoencoder import KLAutoencoder, autoencoder_sizes
from fewstep_lab.nets.mlp import MLP
from fewstep_lab.nets.unet import UNet
from fewstep_lab.data.latent_domain import LATENT_NETS
from fewstep_lab.precond import Precond, get_scalings
from fewstep_lab.sampling import sample_lcm


def _interleaved(fns, repeats, rounds=5):
    for fn in fns:
        fn()  # warm-up
    out = [[] for _ in fns]
    for _ in range(rounds):  # interleave so that load changes hit all alike
        for times, fn in zip(out, fns):
            times.append(_median_time(fn, repeats))
    return [statistics.median(t) for t in out]


@torch.no_grad()
def measure(name, net, shape, num_classes, repeats, decoder=None):
    f = Precond(net, get_scalings("lcm")).eval()
    B, sigma = shape[0], 80.0
    x = sigma * torch.randn(shape)
    labels = torch.arange(B) % num_classes
    cond = (labels, torch.full((B,), 3.0))
    c_noise = torch.full((B,), torch.tensor(sigma).log().item() / 4)
    x_in = x / (sigma**2 + 0.25) ** 0.5
    decode = decoder or (lambda z: z)
    bare = lambda: decode(net(x_in, c_noise, cond))  # noqa: E731
    one_step = lambda: decode(sample_lcm(f, x, torch.tensor([sigma, 0.0]), cond=cond))  # noqa: E731
    b, s = _interleaved([bare, one_step], repeats)
    extra = " + decoder" if decoder else ""
    print(f"{name:<44} bare forward{extra} {b * 1e3:8.2f} ms   one LCM step{extra} {s * 1e3:8.2f} ms   "
          f"ratio {s / b:.3f}")
    return f, x, cond


@torch.no_grad()
def per_image(f, x, cond, decoder, steps=(1, 2, 4), repeats=3):
    grids = {k: torch.cat([torch.linspace(80.0, 0.5, k), torch.zeros(1)]) for k in steps}
    fns = [lambda g=g: decoder(sample_lcm(f, x, g, cond=cond)) for g in grids.values()]
    for k, t in zip(steps, _interleaved(fns, repeats, rounds=3)):
        print(f"  latent LCM, {k} step(s) + decoding: {t / x.shape[0] * 1e3:.2f} ms per image")


if __name__ == "__main__":
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    measure("MLP 4x128 + w-embedding, batch 50,000 (2-D)", MLP(num_classes=4, guidance_embed=True).eval(),
            (50_000, 2), 4, repeats=5)
    ae = KLAutoencoder(**autoencoder_sizes["cpu"]).eval()
    c, h, w = ae.latent_shape
    sizes = {k: v for k, v in LATENT_NETS["cpu"].items() if k not in ("bf16", "channels_last")}
    unet = UNet(in_channels=c, out_channels=c, resolution=h, num_classes=10, guidance_embed=True, **sizes).eval()
    f, x, cond = measure(f"latent U-Net (cpu) {c}x{h}x{w}, batch 64, 16 px decoder", unet, (64, c, h, w), 10,
                         repeats=3, decoder=ae.from_latent)
    per_image(f, x, cond, ae.from_latent)
