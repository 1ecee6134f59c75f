"""Train a CIFAR-size RLA-ResNet on scikit-learn's bundled handwritten digits (offline, ~1,800 images).

    python examples/train.py --epochs 5                      # rla_resnet20, 16x16 inputs
    python examples/train.py --backend torch --amp --channels-last --arch rla_resnet29_bottleneck
    torchrun --nproc_per_node=2 examples/train.py --sync-bn  # DDP, BatchNorm statistics over both ranks
    python examples/train.py --arch rlagru_small --epochs 3 --plot gru.png   # ConvGRU-cell RLA-ResNet

The ImageNet-layout families (rlagru_*/rlalstm_* RLA-ResNets, (ds)rla_mobilenetv2*) take 3-channel
inputs with sides a multiple of 32: for them the digits are repeated to 3 channels at 32 px.
``rlagru_small`` / ``rlalstm_small`` are those RLA-ResNets shrunk to one bottleneck per stage with
widths 16..128 (a few seconds per epoch on a CPU); the released names build the full networks.

The 8x8 digit images are upsampled (bilinear) to --size pixels and standardised; 20% are held out.
Prints the loss as it trains (tqdm) and the held-out accuracy after every epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import rla_ext
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import rla_ext
from rla_ext import models


def load_digits(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> x_train (N, 1, size, size), y_train (N,), x_test, y_test; a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise SystemExit("this example needs scikit-learn for its bundled digits data: pip install scikit-learn") \
            from exc
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


# Small configurations of the ImageNet-layout recurrent-cell RLA-ResNets: (class name, layers, widths).
SMALL = {"rlagru_small": ("RLAgru_ResNet", (1, 1, 1, 1), (16, 32, 64, 128)),
         "rlalstm_small": ("RLAlstm_ResNet", (1, 1, 1, 1), (16, 32, 64, 128))}
IMAGENET_LAYOUT = ("rlagru_", "rlalstm_", "rla_mobilenetv2", "dsrla_mobilenetv2")


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, int, int]:
    """-> (model, input channels, input size) for --arch."""
    if args.arch in SMALL:
        cls, layers, widths = SMALL[args.arch]
        model = getattr(models, cls)(layers, num_classes=10, rla_channel=args.rla_channel, widths=widths,
                                     backend=args.backend)
        return model, 3, max(32, (args.size + 31) // 32 * 32)
    if args.arch.startswith(IMAGENET_LAYOUT):
        model = models.get_model(args.arch, num_classes=10, rla_channel=args.rla_channel, backend=args.backend)
        return model, 3, max(32, (args.size + 31) // 32 * 32)
    model = models.get_model(args.arch, num_classes=10, rla_channel=args.rla_channel, backend=args.backend,
                             in_channels=1, shared_blocks=args.shared_blocks)
    return model, 1, args.size


def plot(path: str, losses: list[float], accuracy: list[float], steps_per_epoch: int, title: str) -> None:
    """A PNG of the training loss per step and the held-out accuracy per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    acc = ax.twinx()
    acc.plot([steps_per_epoch * (i + 1) for i in range(len(accuracy))], [100 * a for a in accuracy], "o-",
             color="tab:red")
    acc.set_ylabel("held-out accuracy (%)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="rla_resnet20", help="a CIFAR-size model, e.g. rla_resnet20, rla_resnet32, "
                                                           "rla_resnet29_bottleneck")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--size", type=int, default=16, help="input resolution (the 8x8 digits are upsampled)")
    p.add_argument("--rla-channel", type=int, default=16)
    p.add_argument("--backend", default=None, help="rla_ext backend: torch, cpp, cuda, triton or auto")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="parameter and input dtype (float64: bit-level comparisons between backends)")
    p.add_argument("--shared-blocks", action="store_true", help="the shared-block recurrence variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over all ranks (convert_sync_batchnorm)")
    p.add_argument("--json", default=None, help="write per-step losses and accuracies to this file")
    p.add_argument("--plot", default=None, help="save a PNG of the loss and held-out accuracy curves here")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, autocast) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        with autocast():
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train()
    return correct / len(y)


def main(argv: list[str] | None = None) -> dict:
    """Train; returns {"losses": [...], "accuracy": [...per epoch], "seconds": float}."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # torchrun sets WORLD_SIZE / RANK / LOCAL_RANK: data-parallel training, each rank a slice of every batch.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dtype = getattr(torch, args.dtype)
    model, in_channels, size = build_model(args)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in load_digits(size, args.seed))
    x_tr, x_te = (t.expand(-1, in_channels, -1, -1).to(dtype).contiguous(memory_format=fmt) for t in (x_tr, x_te))
    model = model.to(device, dtype=dtype, memory_format=fmt)
    if args.sync_bn:
        from rla_ext.nn import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    def autocast():
        if args.amp:
            return torch.autocast(device.type, dtype=amp_dtype)
        return contextlib.nullcontext()

    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety
        tqdm = None
    steps_per_epoch = (len(y_tr) + args.batch_size - 1) // args.batch_size
    total = steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps,
                                                                            steps_per_epoch * args.epochs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(total, 1), pct_start=0.15)
    quiet = rank != 0  # one progress bar and report, from rank 0
    bar = tqdm(total=total, disable=args.no_progress or quiet, desc=args.arch) if tqdm else None
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses: list[float] = []
    accuracy: list[float] = []
    start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y_tr), generator=gen).to(device)
        for i in range(0, len(perm), args.batch_size):
            if step >= total:
                break
            idx = perm[i:i + args.batch_size]
            if len(idx) < 2 * world:  # BatchNorm needs two samples per rank in training
                continue
            idx = idx[rank::world]
            with autocast():
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        accuracy.append(evaluate(model, x_te, y_te, 256, autocast))
        msg = f"epoch {epoch + 1}: loss {losses[-1]:.4f}  held-out accuracy {100 * accuracy[-1]:.2f}%"
        (bar.write if bar is not None and not bar.disable else print)(msg)
        if step >= total:
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    backend = args.backend or rla_ext.get_backend()
    if backend == "auto":
        backend = f"auto -> {rla_ext.available_backends(device)[0]}"
    print(f"done: {step} steps in {seconds:.1f} s, backend {backend}, final held-out accuracy "
          f"{100 * accuracy[-1]:.2f}%")
    result = {"losses": losses, "accuracy": accuracy, "seconds": seconds, "steps": step}
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(result))
    if args.plot and rank == 0:
        plot(args.plot, losses, accuracy, steps_per_epoch, f"{args.arch} on digits, backend {backend}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
