"""The ``fewstep`` command (also ``python -m fewstep_lab``): train, sample, evaluate, benchmark, run the course.

    fewstep train  --method cd --data 8gaussians --teacher runs/toy/edm.pt --out runs/toy/cd.pt
    fewstep train  --method edm --data cifar10 --profile cpu --out runs/cifar/edm.pt   (also under torchrun)
    fewstep sample --ckpt runs/toy/cd.pt --out samples.png
    fewstep eval   --ckpt runs/toy/cd.pt --steps 1 2 --n 50000 --seeds 3
    fewstep bench  --profile cpu
    fewstep course --profile smoke
    fewstep data   cifar10 [--download]
    fewstep autoencoder --data cifar10 --profile cpu --out runs/checkpoints/ae.pt   (latent diffusion's first stage)

Any registered method trains on any data domain through the one pipeline (``pipeline.py``).
Arguments are turned into recipe fields here and nowhere else. Every failure is one line,
``fewstep <command>: error: ...``, and a non-zero exit; set FEWSTEP_DEBUG=1 (or pass --debug)
for the Python traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "build_parser"]

_PROFILE_HELP = "smoke | cpu | gpu (default: $FEWSTEP_PROFILE, else gpu with CUDA, else cpu)"


def _add_run_args(p):
    p.add_argument("--profile", default=None, help=_PROFILE_HELP)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: best available)")
    p.add_argument("--root", default=None, help="image data folder (default: $FEWSTEP_DATA or the usual places)")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    ap = argparse.ArgumentParser(prog="fewstep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks (also FEWSTEP_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train any registered method on any data domain (also under torchrun)")
    _add_run_args(p)
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="a registered method")
    p.add_argument("--data", "--dataset", dest="data", default="8gaussians",
                   help="a data domain (toy2d, cifar10, cifar10-latent), imagefolder:PATH (a folder of your images, "
                        "seen through an autoencoder), or a toy dataset name (8gaussians, checkerboard, ...)")
    p.add_argument("--teacher", default=None,
                   help="for distillation (cd, pd): a diffusion teacher's checkpoint, or 'exact' (toy mixtures)")
    p.add_argument("--steps", type=int, default=None, help="override the profile's number of training steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any method or data recipe field, e.g. --set mu0=0.9 (repeatable)")
    p.add_argument("--out", required=True, help="checkpoint path (resumed if it holds this run)")
    p.add_argument("--restart", action="store_true",
                   help="start afresh; the old checkpoint is replaced when the new run writes its first one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help="draw samples from a checkpoint (or exact:<toy dataset>)")
    p.add_argument("--ckpt", required=True, help="checkpoint path, or 'exact:<dataset>' for the exact mixture denoiser")
    p.add_argument("--sampler", default=None, help="sampler name (default: the method's own)")
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps (default: the method's own)")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=None,
                   help="class of a class-conditional model (default: samples cycle over the classes)")
    p.add_argument("--w", type=float, default=None,
                   help="guidance scale w of a class-conditional model (LCM convention: diffusers' guidance_scale "
                        "= 1 + w; default: no guidance; an LCM needs one)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: best available)")
    p.add_argument("--out", required=True, help=".png (scatter plot or image grid), .npy, or .csv (2-D)")

    p = sub.add_parser("eval", help="the domain's metric of a checkpoint's samples (sliced W2 or FD), with the floor")
    _add_run_args(p)
    p.add_argument("--ckpt", required=True, help="checkpoint path, or 'exact:<dataset>' for the exact mixture denoiser")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, nargs="*", default=None, help="sampling steps, several allowed")
    p.add_argument("--n", type=int, default=None, help="samples per seed (default: 50,000 for 2-D, 1,000 for images)")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default: 3 for 2-D, 1 for images)")
    p.add_argument("--w", type=float, default=None,
                   help="guidance scale of a class-conditional model (scored per class on labelled 2-D data)")

    p = sub.add_parser("course", help="execute the notebooks headless, writing executed copies under runs/")
    p.add_argument("--profile", default=None, help=_PROFILE_HELP)
    p.add_argument("--out", default="runs/course")
    p.add_argument("--only", nargs="*", default=None, help="notebook numbers or name parts, e.g. 01 03")
    p.add_argument("--inplace", action="store_true", help="overwrite the notebooks with their executed versions")
    p.add_argument("--student", metavar="OUT", default=None,
                   help="instead of executing: write the student edition (solutions replaced by stubs) to folder OUT")
    p.add_argument("--slides", metavar="OUT", default=None,
                   help="instead of executing: write a reveal.js deck per notebook to folder OUT (needs nbconvert)")

    p = sub.add_parser("bench", help="the seed paper's table on toy 2-D data: quality vs NFE for every method")
    p.add_argument("--profile", default=None, help=_PROFILE_HELP)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: best available)")
    p.add_argument("--datasets", nargs="*", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--out", default="runs/bench")

    p = sub.add_parser("autoencoder", help="train a KL autoencoder on CIFAR-10 (for latent diffusion); "
                                          "prints its PSNR and the FD of reconstructions")
    _add_run_args(p)
    p.add_argument("--data", default="cifar10", choices=["cifar10"], help="the images (CIFAR-10, as the profile picks)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an AutoencoderRecipe field, e.g. --set steps=500 (repeatable)")
    p.add_argument("--out", required=True, help="checkpoint path (resumed if it holds this autoencoder)")
    p.add_argument("--restart", action="store_true", help="start afresh, replacing the checkpoint")
    p.add_argument("--n", type=int, default=1000, help="images for PSNR and FD (default 1,000)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("data", help="where the datasets are found; --download fetches CIFAR-10 (needs internet)")
    p.add_argument("name", choices=["cifar10"])
    p.add_argument("--root", default=None, help="dataset folder (default: $FEWSTEP_DATA or the usual places)")
    p.add_argument("--download", action="store_true")
    return ap


def _handlers():
    from . import commands

    return {"train": commands.cmd_train, "sample": commands.cmd_sample, "eval": commands.cmd_eval,
            "course": commands.cmd_course, "bench": commands.cmd_bench, "data": commands.cmd_data,
            "autoencoder": commands.cmd_autoencoder}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FEWSTEP_DEBUG", "") not in ("", "0")
    try:
        _handlers()[args.command](args)
    except KeyboardInterrupt:
        print(f"fewstep {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line; --debug shows the traceback
        if debug:
            raise
        print(f"fewstep {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    return 0


def _message(err: Exception) -> str:
    import errno

    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"the disk is full ({err.filename or 'while writing'}); free some space and rerun"
    text = str(err).strip() or type(err).__name__
    first = " ".join(text.split())  # one line
    if isinstance(err, (ValueError, FileNotFoundError, KeyError, PermissionError, IsADirectoryError, RuntimeError,
                        OSError, TypeError)):
        return first
    return f"{type(err).__name__}: {first} (rerun with FEWSTEP_DEBUG=1 for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
