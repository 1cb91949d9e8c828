"""Train the CIFAR-10 classifier whose features define the course's FD, and ship its weights.

Writes ``<out>/cifar10_classifier.safetensors`` (weights only) and ``<out>/cifar10_classifier.json``
(architecture kwargs, test accuracy, the command, seed, data source, date, timings). Recipe,
sized for a 2-core CPU: SGD with Nesterov momentum, a one-cycle learning rate (linear warm-up
then linear decay to zero, Smith & Topin 2019), label smoothing (Szegedy et al. 2016, Sec. 7),
random crops with reflect padding and horizontal flips; each epoch is a fresh permutation.

    python scripts/train_fd_classifier.py --epochs 2.5 --threads 2

That command made the shipped weights: 489 steps of 256 in 30.7 min at 68 img/s on a 2-core
CPU shared with other jobs (load average ~10; short runs on a quieter machine reached
180-230 img/s, i.e. about 10 min), 75.3% accuracy on the 10,000 test images of the JPEG copy.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn

from fewstep_lab.data.images import find_cifar10, load_cifar10, to_model_range
from fewstep_lab.nets.classifier import CifarClassifier

ASSETS = Path(__file__).resolve().parents[1] / "fewstep_lab" / "assets"


def augment(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the reflect-padded image (shift in [-pad, pad]^2) and random left-right flip."""
    b, _, h, w = images.shape
    x = to_model_range(images)
    if pad > 0:
        padded = Fn.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (torch.arange(h)[None] + dy[:, None])[:, :, None]  # (B, H, 1)
        cols = (torch.arange(w)[None] + dx[:, None])[:, None, :]  # (B, 1, W)
        # Advanced indices around a slice: the result is (B, H, W, C).
        x = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous()


def one_cycle(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up to ``peak`` over the first ``warmup`` fraction, then linear decay to zero."""
    t = (step + 0.5) / total
    return peak * (t / warmup if t < warmup else (1.0 - t) / (1.0 - warmup))


@torch.inference_mode()
def accuracy(model: CifarClassifier, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on uint8 images."""
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(to_model_range(images[i:i + batch_size]))
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
    return correct / len(images)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="CIFAR-10 root (default: find_cifar10's places)")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default FEWSTEP_CACHE)")
    p.add_argument("--out", default=str(ASSETS), help="folder for the .safetensors and .json")
    p.add_argument("--epochs", type=float, default=2.5, help="passes over the train split (may be fractional)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of steps spent warming up")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--crop-pad", type=int, default=2, help="random-crop shift in pixels (0: flips only)")
    p.add_argument("--widths", type=int, nargs=3, default=[32, 64, 128])
    p.add_argument("--limit", type=int, default=None, help="train on a class-balanced subset (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for this run")
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    source = find_cifar10(args.data)
    train_x, train_y = load_cifar10(source, "train", cache_dir=args.cache_dir, limit=args.limit)
    test_x, test_y = load_cifar10(source, "test", cache_dir=args.cache_dir)
    n = len(train_x)

    kwargs = {"widths": list(args.widths), "num_classes": 10}
    model = CifarClassifier(**kwargs)
    n_params = sum(q.numel() for q in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    total = math.ceil(args.epochs * n / args.batch_size)
    g = torch.Generator().manual_seed(args.seed)
    print(f"{n_params:,} parameters; {n} train images; {total} steps of {args.batch_size}", flush=True)

    model.train()
    order, pos, t0 = torch.randperm(n, generator=g), 0, time.time()
    for step in range(total):
        if pos + args.batch_size > n:  # new epoch: a fresh permutation, the tail is dropped
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        x, y = augment(train_x[idx], args.crop_pad, g), train_y[idx]
        for group in opt.param_groups:
            group["lr"] = one_cycle(step, total, args.lr, args.warmup)
        logits = model(x)
        loss = Fn.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == total - 1:
            dt = time.time() - t0
            acc = float((logits.argmax(1) == y).float().mean())
            print(f"step {step + 1}/{total}  loss {loss.item():.3f}  batch acc {acc:.3f}  "
                  f"{(step + 1) * args.batch_size / dt:.0f} img/s  {dt / 60:.1f} min", flush=True)
    train_s = time.time() - t0

    model.eval()
    test_acc = accuracy(model, test_x, test_y)
    sub_x, sub_y = load_cifar10(source, "test", cache_dir=args.cache_dir, limit=200)
    sub_acc = accuracy(model, sub_x, sub_y)
    print(f"test accuracy {test_acc:.4f} (10k), {sub_acc:.3f} (first 200, class-balanced); "
          f"trained in {train_s / 60:.1f} min", flush=True)

    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "cifar10_classifier.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    info = {
        "model": "fewstep_lab.nets.classifier.CifarClassifier",
        "kwargs": kwargs,
        "parameters": n_params,
        "feature_dim": model.feature_dim,
        "test_accuracy": test_acc,
        "test_images": len(test_x),
        "test_accuracy_first200": sub_acc,
        "first200": "load_cifar10(split='test', limit=200): the first 20 test images of each class",
        "train_command": "python scripts/train_fd_classifier.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "hyperparameters": {k: getattr(args, k) for k in
                            ("epochs", "batch_size", "lr", "warmup", "weight_decay",
                             "label_smoothing", "crop_pad", "limit")},
        "steps": total,
        "train_images": n,
        "train_seconds": round(train_s, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "data_source": str(source),
        "data_note": ("CIFAR-10 (Krizhevsky 2009); if the source is the shared cifar10-jpeg copy, "
                      "it was re-encoded as JPEG quality 75, so accuracy and FD are for "
                      "comparisons inside this course only"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "size_bytes": weights.stat().st_size,
    }
    (out / "cifar10_classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {weights} ({info['size_bytes'] / 1e6:.2f} MB) and its .json", flush=True)
    return info


if __name__ == "__main__":
    main()
