"""Runs fewstep_lab.metrics_images.fid() end to end on small image sets and prints three values.

Needs torch-fidelity (which fewstep_lab does not install; it imports torchvision, so put it in
an environment whose torch matches that torchvision). With FEWSTEP_INCEPTION_WEIGHTS naming
torch-fidelity's real weights-inception-2015-12-05-6726825d.pth the values are real FIDs (of
tiny sets, hence strongly biased upwards); otherwise the script writes a stand-in file with
the same architecture and *random* weights, which checks the plumbing but whose values are
not FIDs. Nothing is downloaded.

    python scripts/check_fid.py            # 48 images per set, about 70 s on one CPU thread
    python scripts/check_fid.py --n 16     # about 25 s

Expected: fid(a, a) ~ 0, and fid(a, a') (a second draw of a's distribution) well below
fid(a, b) (a visibly different distribution).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

try:
    from fewstep_lab import metrics_images as mi
except ImportError:  # run from a checkout where the package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fewstep_lab import metrics_images as mi


def standin_inception_weights(path, seed: int = 0) -> Path:
    """Write torch-fidelity's Inception-v3 state dict with random weights to ``path``; return it.

    Same keys and shapes as the real file, so fid() loads it through the ordinary path, but the
    values are random: FIDs computed from it are not FIDs. Convolutions get He-normal weights
    (the default init shrinks activations layer after layer, leaving features near zero).
    Downloads nothing: the constructor's download is replaced by an empty dict, its
    load_state_dict by a no-op.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
         mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


def image_sets(n: int, seed: int = 0):
    """a, a' (two draws of one distribution) and b (another), as (n, 3, 32, 32) floats in [-1, 1].

    a and a': smooth random colour fields (low-frequency noise, upsampled); b: white noise.
    """
    g = torch.Generator().manual_seed(seed)

    def smooth():
        low = torch.randn(n, 3, 4, 4, generator=g)
        return torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False).tanh()

    return smooth(), smooth(), torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=48, help="images per set (default 48)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    given = os.environ.get(mi.INCEPTION_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        if given and Path(given).expanduser().is_file():
            print(f"weights: {given} (from {mi.INCEPTION_ENV}); if it is torch-fidelity's real "
                  f"file, the values below are FIDs of {args.n}-image sets, biased upwards at this size")
        else:
            if given:
                print(f"{mi.INCEPTION_ENV}={given} is not a file; using random stand-in weights")
            os.environ[mi.INCEPTION_ENV] = str(standin_inception_weights(Path(tmp) / "standin.pth"))
            print("weights: RANDOM STAND-IN Inception-v3 (right architecture, random values): "
                  "this checks the plumbing only; the values below are NOT FIDs")
        a, a2, b = image_sets(args.n)
        same = mi.fid(a, a, batch_size=args.batch_size)
        draws = mi.fid(a, a2, batch_size=args.batch_size)
        other = mi.fid(a, b, batch_size=args.batch_size)
    print(f"fid(a, a)  = {same:.6g}    (same images: ~0)")
    print(f"fid(a, a') = {draws:.6g}    (two draws of one distribution)")
    print(f"fid(a, b)  = {other:.6g}    (a different distribution: larger)")
    ok = abs(same) < 1e-3 * other and draws < other
    print("OK" if ok else "UNEXPECTED: see the lines above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
