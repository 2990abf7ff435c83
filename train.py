"""Train MobileNetV3 on ImageNet-style folders with AMP, an EMA of the weights and Adam.

Demo (no data needed; generates a small shapes dataset under data/demo and trains on the CPU):
    python train.py

One GPU, the 2021 predecessor's configuration (Large 0.5, batch 128, Adam 5e-3, AMP, EMA 0.9999, 224 px):
    python train.py --data-path /data/imagenet --arch large --width-mult 0.5 -b 128 --lr 5e-3 --opt adam \
        --ema-decay 0.9999 --img-size 224

Several GPUs on one node (batch size is per process), or several nodes (run on each node):
    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --data-path ...

Resume after a crash or preemption (same command line is safe to re-run):
    python train.py --data-path /data/imagenet --resume auto
"""
import argparse
import contextlib
import math
import os
import pickle
import sys
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch_ema import ExponentialMovingAverage
from tqdm import tqdm

import dataset
import model as model_lib
import utils
from evaluate import evaluate
from utils import UserError

DEMO_DEFAULTS = {"img_size": 64, "epochs": 8}      # small images and few epochs: about a minute on a laptop CPU
IMAGENET_DEFAULTS = {"img_size": 224, "epochs": 200}  # the predecessor trained 203 epochs
MAX_NONFINITE_STREAK = 20
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train MobileNetV3 (demo data when --data-path is omitted).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--data-path", default=None, help="dataset root (see README for layouts); omitted: demo data")
    group.add_argument("-j", "--workers", type=int, default=None,
                       help="loader processes per process (default: cores/2 when training on the CPU, else cores, at most 8)")
    group.add_argument("--img-size", type=int, default=None, help="training crop size (default 224; demo 64)")
    group.add_argument("--val-resize-size", type=int, default=None, help="validation resize (default crop/0.875)")
    group.add_argument("--val-crop-size", type=int, default=None, help="validation center crop (default --img-size)")
    group.add_argument("--min-scale", type=float, default=0.08, help="RandomResizedCrop smallest area fraction")
    group.add_argument("--auto-augment", default=None, choices=["ra", "ta_wide", "imagenet"], help="RandAugment, TrivialAugment or AutoAugment")
    group.add_argument("--random-erase", type=float, default=0.0, help="random erasing probability")
    group.add_argument("--mixup-alpha", type=float, default=0.0, help="mixup alpha (0: off)")
    group.add_argument("--cutmix-alpha", type=float, default=0.0, help="cutmix alpha (0: off)")
    group.add_argument("--norm", default="imagenet", choices=sorted(dataset.NORMS), help="normalization statistics")
    group.add_argument("--strict-data", action="store_true", help="stop on an unreadable image instead of skipping it")
    group.add_argument("--decode-on", default="workers", choices=["workers", "device"],
                       help="where training JPEGs are decoded: loader workers (CPU), or the training device in "
                            "batches (nvjpeg on CUDA; for few CPU cores per GPU; crop and flip only)")

    group = parser.add_argument_group("Model")
    group.add_argument("--arch", default="large", choices=model_lib.ARCHS, help="MobileNetV3 variant (paper, Tables 1 and 2)")
    group.add_argument("--width-mult", type=float, default=0.5, help="width multiplier (the predecessor used 0.5)")
    group.add_argument("--num-classes", type=int, default=None, help="default: number of training classes")
    group.add_argument("--dropout", type=float, default=0.2, help="before the last layer (paper: keep 0.8)")
    group.add_argument("--bn-momentum", type=float, default=0.01, help="PyTorch BN momentum (0.01 = TF decay 0.99, paper 6.1)")
    group.add_argument("--pretrained", default=None, help="'torchvision' (needs internet) or a state-dict file")

    group = parser.add_argument_group("Optimization")
    group.add_argument("--epochs", type=int, default=None, help="default 200; demo 8")
    group.add_argument("-b", "--batch-size", type=int, default=128, help="images per process and step")
    group.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    group.add_argument("--opt", default="adam", choices=["adam", "adamw", "sgd", "rmsprop"])
    group.add_argument("--lr", type=float, default=5e-3)
    group.add_argument("--momentum", type=float, default=0.9, help="SGD/RMSprop momentum")
    group.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=0.0)
    group.add_argument("--wd-norm-bias", action="store_true", help="also decay BN and bias parameters (off by default)")
    group.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "step", "legacy", "constant"],
                       help="legacy = x0.99 every 3 epochs, as the predecessor")
    group.add_argument("--lr-step-size", type=int, default=30, help="epochs between decays (step)")
    group.add_argument("--lr-gamma", type=float, default=0.1, help="decay factor (step)")
    group.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length")
    group.add_argument("--label-smoothing", type=float, default=0.0)
    group.add_argument("--clip-grad-norm", type=float, default=0.0, help="0: no clipping")
    group.add_argument("--ema-decay", type=float, default=0.9999, help="0 disables the EMA")

    group = parser.add_argument_group("Speed and devices")
    group.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision (default: on, except on CPUs without native bf16, where it is ~10x slower)")
    group.add_argument("--amp-dtype", default="auto", choices=["auto", "float16", "bfloat16"],
                       help="auto: float16 + GradScaler on CUDA, bfloat16 elsewhere")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="default: on for CUDA and CPU (measured, see README)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--sync-bn", action="store_true", help="synchronized BatchNorm across processes")
    group.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    group.add_argument("--seed", type=int, default=0)

    group = parser.add_argument_group("Logging and checkpoints")
    group.add_argument("--output-dir", default="checkpoints")
    group.add_argument("--log-dir", default="runs")
    group.add_argument("--run-name", default=None, help="TensorBoard run folder (default: from arch and width)")
    group.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for <output-dir>/last.pth if present")
    group.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    group.add_argument("--print-freq", type=int, default=10, help="steps between logged training metrics")
    group.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (smoke runs)")
    return parser


def validate_args(args):
    """Reject bad values with one line before anything starts."""
    positive = {"--batch-size": args.batch_size, "--accum-steps": args.accum_steps, "--eval-every": args.eval_every,
                "--print-freq": args.print_freq, "--lr-step-size": args.lr_step_size}
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise UserError(f"--lr must be a positive number (got {args.lr})")
    if not math.isfinite(args.width_mult) or args.width_mult <= 0:
        raise UserError(f"--width-mult must be positive (got {args.width_mult})")
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be at least 1 (got {args.epochs})")
    for flag, value in {"--img-size": args.img_size, "--val-crop-size": args.val_crop_size,
                        "--val-resize-size": args.val_resize_size}.items():
        if value is not None and value < 32:
            raise UserError(f"{flag} must be at least 32 pixels (got {value})")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more (got {args.workers})")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1) (got {args.ema_decay})")
    if not 0 < args.min_scale <= 1:
        raise UserError(f"--min-scale must be in (0, 1] (got {args.min_scale})")
    for flag, value in {"--weight-decay": args.weight_decay, "--label-smoothing": args.label_smoothing,
                        "--mixup-alpha": args.mixup_alpha, "--cutmix-alpha": args.cutmix_alpha,
                        "--clip-grad-norm": args.clip_grad_norm, "--warmup-epochs": args.warmup_epochs,
                        "--random-erase": args.random_erase, "--max-steps": args.max_steps}.items():
        if not value >= 0:
            raise UserError(f"{flag} must be 0 or more (got {value})")
    if args.label_smoothing >= 1 or args.random_erase > 1 or not 0 <= args.dropout < 1:
        raise UserError("--label-smoothing and --dropout must be below 1, --random-erase at most 1")
    if args.decode_on == "device" and (args.auto_augment or args.random_erase):
        raise UserError("--decode-on device does the crop and flip only: drop --auto-augment and --random-erase, "
                        "or decode on the workers")
    if args.data_path is not None and not os.path.isdir(args.data_path):
        raise UserError(f"--data-path {args.data_path} is not a folder")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise UserError(f"--resume file not found: {args.resume}")
    if args.pretrained not in (None, "torchvision") and not os.path.isfile(args.pretrained):
        raise UserError(f"--pretrained file not found: {args.pretrained}")


# ---------------------------------------------------------------- building blocks of the recipe

def make_optimizer(model, args, device):
    """BN and bias parameters get no weight decay unless --wd-norm-bias (standard practice for MobileNets)."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 and not args.wd_norm_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach kernels are the fast path on CPU and GPU; fused Adam/AdamW is faster still on CUDA.
    fast = {"fused": True} if device.type == "cuda" and args.opt in ("adam", "adamw") else {"foreach": True}
    if args.opt == "adam":
        return torch.optim.Adam(groups, lr=args.lr, **fast)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, **fast)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0, foreach=True)
    # TF-style RMSprop settings from the paper (section 6.1: momentum 0.9, decay 0.9)
    return torch.optim.RMSprop(groups, lr=args.lr, alpha=0.9, eps=0.0316, momentum=args.momentum, foreach=True)


def lr_factor(step, steps_per_epoch, args):
    """Learning-rate multiplier at an optimizer step: linear warm-up, then the chosen schedule, per step."""
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    epoch = step / steps_per_epoch
    if args.lr_scheduler == "cosine":
        total = max(1, args.epochs * steps_per_epoch - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / total)))
    if args.lr_scheduler == "step":
        return args.lr_gamma ** int(epoch // args.lr_step_size)
    if args.lr_scheduler == "legacy":
        return 0.99 ** int(epoch // 3)
    return 1.0


def warm_up_bn_momentum(model, step, momentum):
    """BN momentum 0.01 (paper) averages the statistics of the last ~100 steps, while the weights early in
    training change much faster than that, so a short run (or the first epoch of a long one) evaluates with
    statistics of a network that no longer exists. Until step ~1/(10 x momentum) use momentum 1/(1 + step/10):
    the running statistics then cover about the last 10% of the steps, and the paper's value afterwards."""
    value = max(momentum, 1.0 / (1.0 + step / 10))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = value


def make_ema(model, decay):
    """EMA of the parameters AND the float BN buffers (running mean/var), so EMA weights come with matching
    statistics. torch-ema's num_updates warm-up uses decay min(d, (1+n)/(10+n)): usable from the first epoch."""
    if decay <= 0:
        return None
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return ExponentialMovingAverage(tensors, decay=decay)


def ema_state_dict(model, ema):
    with ema.average_parameters():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_step(model, images, targets, criterion, scaler, autocast, accum_steps=1):
    """Forward and backward of one micro-batch under autocast. Returns (logits, loss), detached."""
    with autocast():
        logits = model(images)
        loss = criterion(logits, targets)
    (scaler.scale(loss / accum_steps) if scaler else loss / accum_steps).backward()
    return logits.detach(), loss.detach()


def optimizer_step(optimizer, scaler, parameters, clip_grad_norm=0.0):
    """Apply the accumulated gradients unless they are not finite; returns whether the update was applied.

    The test is on the norm of the gradients of all micro-batches, after DDP's all-reduce, so every rank takes
    the same decision. Gradients are unscaled first (GradScaler, CUDA fp16) so clipping sees the true norm.
    Reading the norm is the one host sync per step; on CUDA fp16 the GradScaler makes the same one anyway.
    """
    if scaler:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = nn.utils.get_total_norm(grads)
    finite = bool(torch.isfinite(norm))
    if finite:
        if clip_grad_norm > 0:
            nn.utils.clip_grads_with_norm_(parameters, clip_grad_norm, norm)
        if scaler:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler:
        scaler.update()  # after a non-finite step this lowers the loss scale
    optimizer.zero_grad(set_to_none=True)
    return finite


# ---------------------------------------------------------------- the loop

def train_one_epoch(ctx, epoch, start_batch):
    """Train one epoch from micro-batch start_batch (non-zero after a mid-epoch resume).

    Returns "done", "stopped" (signal or --max-steps; state saved by caller) or "diverged".
    """
    a, model, optimizer = ctx.args, ctx.model, ctx.optimizer
    model.train()
    ctx.sampler.set_epoch(epoch, skip_batches=start_batch, batch_size=a.batch_size)
    mean, std = dataset.NORMS[a.norm]
    steps_per_epoch = ctx.steps_per_epoch
    window = {"loss": torch.zeros((), device=ctx.device), "top1": torch.zeros((), device=ctx.device), "n": 0}
    epoch_sum = torch.zeros(3, dtype=utils.sum_dtype(ctx.device), device=ctx.device)  # loss sum, top-1 hits, images
    epoch_start = window_start = time.perf_counter()
    data_wait = 0.0
    status = "done"
    batch = start_batch
    bar = tqdm(total=len(ctx.loader) + start_batch, initial=start_batch, desc=f"epoch {epoch + 1}/{a.epochs}",
               disable=not ctx.show_progress, dynamic_ncols=True, leave=False)
    fetch_start = time.perf_counter()
    for images, targets in ctx.loader:
        data_wait += time.perf_counter() - fetch_start
        if ctx.compile_clock == 0.0:  # --compile: the first forward and backward compile the model
            ctx.compile_clock = time.perf_counter()
        images, targets = ctx.train_set.batch_to(ctx.device, images, targets)
        images = dataset.normalize_batch(images, mean, std, ctx.channels_last)
        if ctx.mixup is not None:
            images, targets = ctx.mixup(images, targets)
        if ctx.step == 0 and batch == 0 and ctx.writer:
            log_augmented_images(ctx.writer, images, mean, std)
        if batch % a.accum_steps == 0:  # first micro-batch of an update: remember the BN statistics
            torch._foreach_copy_(ctx.bn_backup, ctx.bn_buffers)
        batch += 1
        is_update = batch % a.accum_steps == 0
        for group, base_lr in zip(optimizer.param_groups, ctx.base_lrs):
            group["lr"] = base_lr * lr_factor(ctx.step, steps_per_epoch, a)
        if ctx.step * a.bn_momentum <= 10 and not a.compile:  # a changing float would recompile every step
            warm_up_bn_momentum(model, ctx.step, a.bn_momentum)
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not is_update else contextlib.nullcontext()
        with sync:
            logits, loss = train_step(model, images, targets, ctx.criterion, ctx.scaler, ctx.autocast, a.accum_steps)
        if is_update:
            # a non-finite loss gives non-finite gradients: that update is skipped and counted
            if optimizer_step(optimizer, ctx.scaler, ctx.params, a.clip_grad_norm):
                ctx.nonfinite_streak = 0
            else:
                # the forward passes already moved the BN running statistics (maybe to NaN): take them back
                torch._foreach_copy_(ctx.bn_buffers, ctx.bn_backup)
                ctx.nonfinite_steps += 1
                ctx.nonfinite_streak += 1
            if ctx.ema is not None:
                ctx.ema.update()
            ctx.step += 1
            if ctx.compile_clock:
                loss.item()  # wait for the device, once
                seconds = time.perf_counter() - ctx.compile_clock
                if ctx.rank == 0:
                    tqdm.write(f"torch.compile: the first step took {seconds:.1f}s (compiling)")
                if ctx.writer:
                    ctx.writer.add_scalar("perf/compile_first_step_sec", seconds, ctx.step)
                ctx.compile_clock = None
        hits = utils.correct_topk(logits, targets, (1,))[0]
        window["loss"] += loss.float()
        window["top1"] += hits
        window["n"] += targets.shape[0]
        epoch_sum[0] += loss.to(epoch_sum.dtype) * targets.shape[0]  # no new device tensors: no hidden syncs
        epoch_sum[1] += hits
        epoch_sum[2] += targets.shape[0]
        bar.update(1)
        if is_update and ctx.step % a.print_freq == 0:
            # the only host syncs of the loop: once every --print-freq steps
            elapsed = time.perf_counter() - window_start
            batches = window["n"] / targets.shape[0]
            loss_avg = window["loss"].item() / max(batches, 1)
            top1_avg = 100 * window["top1"].item() / max(window["n"], 1)
            lr = optimizer.param_groups[0]["lr"]
            speed = window["n"] * ctx.world_size / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{loss_avg:.3f}", top1=f"{top1_avg:.1f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
            if ctx.writer:
                w = ctx.writer
                w.add_scalar("train/loss", loss_avg, ctx.step)
                w.add_scalar("train/top1", top1_avg, ctx.step)
                w.add_scalar("train/lr", lr, ctx.step)
                w.add_scalar("train/images_per_sec", speed, ctx.step)
                w.add_scalar("train/data_wait_fraction", data_wait / max(elapsed, 1e-9), ctx.step)
                if ctx.device.type == "cuda":
                    w.add_scalar("train/gpu_memory_mb", utils.peak_memory_mb(ctx.device), ctx.step)
            window = {"loss": torch.zeros((), device=ctx.device), "top1": torch.zeros((), device=ctx.device), "n": 0}
            window_start, data_wait = time.perf_counter(), 0.0
        if ctx.nonfinite_streak >= MAX_NONFINITE_STREAK:
            status = "diverged"
            break
        # every rank must stop at the same step, whichever of them got the signal
        if is_update and (utils.any_rank(ctx.stop) or (a.max_steps and ctx.step >= a.max_steps)):
            if batch < len(ctx.loader) + start_batch:
                status = "stopped"
            ctx.batch_in_epoch = batch
            break
        fetch_start = time.perf_counter()
    bar.close()
    if ctx.compile_clock:  # no update this epoch (a resumed epoch's last micro-batches): time the next one afresh
        ctx.compile_clock = 0.0
    optimizer.zero_grad(set_to_none=True)  # micro-batches left over when accum_steps does not divide the epoch
    if status == "done":
        ctx.batch_in_epoch = 0
    utils.all_reduce_sum(epoch_sum)
    loss_sum, hits, count = epoch_sum.tolist()
    ctx.last_train = {"loss": loss_sum / max(count, 1), "top1": 100 * hits / max(count, 1),
                      "time": time.perf_counter() - epoch_start, "images": int(count)}
    return status


def log_augmented_images(writer, images, mean, std):
    import torchvision
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    grid = torchvision.utils.make_grid((images[:32].float() * std + mean).clamp(0, 1), nrow=8)
    writer.add_image("train/augmented_batch", grid.cpu(), 0)


def checkpoint_state(ctx, epoch):
    a = ctx.args
    state = {
        "format": utils.CHECKPOINT_FORMAT,
        "model": ctx.model_without_ddp.state_dict(),
        "model_config": model_lib.model_config(ctx.model_without_ddp),
        "ema": ctx.ema.state_dict() if ctx.ema else None,
        "ema_model": ema_state_dict(ctx.model_without_ddp, ctx.ema) if ctx.ema else None,
        "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict() if ctx.scaler else None,
        "epoch": epoch,                  # epoch in progress (0-based)
        "batch_in_epoch": ctx.batch_in_epoch,  # micro-batches of that epoch already done (0: epoch not started)
        "step": ctx.step,
        "best_top1": ctx.best_top1,
        "best_weights": ctx.best_weights,
        "metrics": ctx.metrics,
        "nonfinite_steps": ctx.nonfinite_steps,
        "rng": ctx.rng_states,            # one per rank: each rank's dropout/mixup stream resumes exactly
        "world_size": ctx.world_size,
        "args": dict(vars(a)),
        "classes": list(ctx.classes),
        "class_names": list(ctx.class_names),
        "norm": a.norm,
        "val_resize_size": a.val_resize_size,
        "val_crop_size": a.val_crop_size,
    }
    return state


def save(ctx, epoch, name="last.pth"):
    """Rank 0 writes; never saves weights that are not finite (a diverged model never replaces a good checkpoint).
    Returns whether the checkpoint was written. Every rank must call it (the RNG states are gathered)."""
    ctx.rng_states = utils.gather_objects(utils.get_rng_state())
    if ctx.rank != 0:
        return True
    if ctx.nonfinite_streak or not utils.check_finite(ctx.model_without_ddp):
        print(f"warning: {'the last steps had a non-finite loss' if ctx.nonfinite_streak else 'weights are not finite'}"
              f"; keeping the previous {name}", file=sys.stderr)
        return False
    utils.save_checkpoint(checkpoint_state(ctx, epoch), os.path.join(ctx.args.output_dir, name))
    return True


def resume(ctx, path):
    ckpt = utils.load_checkpoint(path)
    if ckpt.get("format") != utils.CHECKPOINT_FORMAT:
        raise utils.CheckpointError(f"{path} is not a checkpoint of this project")
    want = model_lib.model_config(ctx.model_without_ddp)
    have = ckpt["model_config"]
    for key in ("arch", "width_mult", "num_classes"):
        if have.get(key) != want.get(key):
            raise utils.CheckpointError(f"cannot resume from {path}: it was trained with {key}={have.get(key)!r}, "
                                        f"this run has {key}={want.get(key)!r}")
    if list(ckpt.get("classes", [])) != list(ctx.classes):
        raise utils.CheckpointError(f"cannot resume from {path}: its class list differs from this dataset's")
    if ckpt["batch_in_epoch"]:
        a, saved = ctx.args, ckpt["args"]
        now = (a.batch_size, a.accum_steps, ctx.world_size)
        then = (saved["batch_size"], saved["accum_steps"], ckpt.get("world_size", 1))
        if now != then:
            raise utils.CheckpointError(f"{path} stopped inside an epoch with batch size, accum steps and processes "
                                        f"{then}; resume it with the same (this run has {now})")
    ctx.model_without_ddp.load_state_dict(ckpt["model"])
    try:
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:
        raise utils.CheckpointError(f"cannot resume the optimizer from {path} ({e}); was --opt or --wd-norm-bias "
                                    "changed?") from None
    if ctx.scaler and ckpt.get("scaler"):
        ctx.scaler.load_state_dict(ckpt["scaler"])
    if ctx.ema is not None and ckpt.get("ema"):
        ctx.ema.load_state_dict(ckpt["ema"])
        ctx.ema.decay = ctx.args.ema_decay  # the decay given now wins over the saved one
    ctx.step = ckpt["step"]
    ctx.best_top1 = ckpt["best_top1"]
    ctx.best_weights = ckpt["best_weights"]
    ctx.metrics = ckpt.get("metrics", {})
    ctx.nonfinite_steps = ckpt.get("nonfinite_steps", 0)
    ctx.batch_in_epoch = ckpt["batch_in_epoch"]
    rng = ckpt["rng"]
    utils.set_rng_state(rng[ctx.rank] if isinstance(rng, list) and len(rng) == ctx.world_size else
                        rng[0] if isinstance(rng, list) else rng)
    return ckpt["epoch"]


class Context:
    """Everything the loop needs, in one place (a plain namespace)."""


def resolve_defaults(args, device):
    """Fill in the defaults that depend on the data (demo or not) and on the device, as --help says."""
    defaults = DEMO_DEFAULTS if args.data_path is None else IMAGENET_DEFAULTS
    args.img_size = args.img_size or defaults["img_size"]
    args.epochs = args.epochs or defaults["epochs"]
    args.val_crop_size = args.val_crop_size or args.img_size
    args.val_resize_size = args.val_resize_size or round(args.val_crop_size / 0.875)
    if args.amp is None:
        args.amp = device.type != "cpu" or utils.cpu_has_native_bf16()
    if args.channels_last is None:  # faster on CUDA and, measured with benchmark.py, 1.24x on the CPU too
        args.channels_last = device.type in ("cuda", "cpu")
    if args.workers is None:
        args.workers = utils.default_workers(device)
    return args


def build_data(args, rank, world_size, device):
    """(splits, train set, val set, train loader, val loader) for this rank; makes the demo data if needed."""
    if args.data_path is None:
        if rank == 0:
            args.data_path = dataset.make_demo_dataset(DEMO_DIR)
        args.data_path = utils.broadcast_object(args.data_path if rank == 0 else None)
    splits = dataset.find_dataset(args.data_path)
    if splits.val is None:
        raise UserError(f"no validation split found under {args.data_path} (see README: accepted layouts)")
    if args.decode_on == "device":
        dataset.EncodedImageFiles.check_device(device)
        train_set = dataset.EncodedImageFiles(splits.train, args.img_size, args.min_scale, strict=args.strict_data)
    else:
        train_set = dataset.ImageFiles(splits.train, dataset.train_transform(args.img_size, args.auto_augment,
                                       args.random_erase, args.norm, args.min_scale), strict=args.strict_data)
    val_set = dataset.ImageFiles(splits.val, dataset.val_transform(args.val_resize_size, args.val_crop_size),
                                 strict=args.strict_data)
    train_sampler = dataset.EpochSampler(len(train_set), shuffle=True, seed=args.seed, num_replicas=world_size,
                                         rank=rank, drop_last=True)
    val_sampler = dataset.EpochSampler(len(val_set), shuffle=False, num_replicas=world_size, rank=rank)
    pin, nice = device.type == "cuda", utils.worker_nice(device)
    train_loader = dataset.build_loader(train_set, train_sampler, args.batch_size, args.workers, train=True,
                                        pin_memory=pin and args.decode_on == "workers", worker_nice=nice)
    val_loader = dataset.build_loader(val_set, val_sampler, args.batch_size, args.workers, train=False,
                                      pin_memory=pin, worker_nice=nice)
    train_sampler.set_epoch(0)
    if len(train_loader) < args.accum_steps:
        raise UserError(f"the training split has {len(train_set)} images: too few for one step of "
                        f"{args.batch_size} x {args.accum_steps} x {world_size} processes; lower --batch-size")
    return splits, train_set, val_set, train_loader, val_loader


def build_context(args, rank=0, world_size=1, device=torch.device("cpu")):
    """Data, model, optimizer, EMA and precision for training with args, as a Context; nothing runs yet.
    main adds resuming, torch.compile, DDP and TensorBoard; benchmark.py uses it as it is."""
    demo = args.data_path is None
    resolve_defaults(args, device)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    utils.seed_everything(args.seed + rank)
    if rank == 0:
        utils.prepare_output_dir(args.output_dir)

    splits, train_set, val_set, train_loader, val_loader = build_data(args, rank, world_size, device)
    num_classes = args.num_classes or len(splits.classes)
    if num_classes < len(splits.classes):
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(splits.classes)} classes in the data")

    net = model_lib.build_model(args.arch, args.width_mult, num_classes, dropout=args.dropout, bn_momentum=args.bn_momentum)
    num_params, madds = model_lib.count_params(net), model_lib.count_madds(net, args.img_size)
    if args.pretrained:
        try:
            model_lib.load_pretrained(net, args.pretrained)
        except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            reason = "not a readable state dict" if isinstance(e, pickle.UnpicklingError) else e
            raise UserError(f"--pretrained {args.pretrained}: {reason}") from None
    if args.sync_bn and world_size > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU)")
    if args.sync_bn and world_size > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)

    ctx = Context()
    ctx.args, ctx.rank, ctx.world_size, ctx.device = args, rank, world_size, device
    ctx.stop, ctx.writer, ctx.show_progress = None, None, rank == 0
    ctx.splits, ctx.classes, ctx.class_names = splits, splits.classes, splits.class_names
    ctx.train_set, ctx.val_set, ctx.loader, ctx.val_loader = train_set, val_set, train_loader, val_loader
    ctx.sampler = train_loader.sampler
    ctx.model = ctx.model_without_ddp = net
    ctx.num_params, ctx.madds, ctx.demo = num_params, madds, demo
    ctx.params = list(net.parameters())
    ctx.bn_buffers = [b for b in net.buffers() if b.is_floating_point()]
    ctx.bn_backup = [b.detach().clone() for b in ctx.bn_buffers]
    ctx.optimizer = make_optimizer(net, args, device)
    ctx.base_lrs = [args.lr for _ in ctx.optimizer.param_groups]
    ctx.ema = make_ema(net, args.ema_decay)
    ctx.autocast, ctx.scaler, ctx.precision = utils.precision_for(device, args.amp, args.amp_dtype)
    ctx.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    ctx.mixup = dataset.make_mixup_cutmix(args.mixup_alpha, args.cutmix_alpha, num_classes)
    ctx.channels_last = args.channels_last
    ctx.steps_per_epoch = len(train_loader) // args.accum_steps
    ctx.step, ctx.best_top1, ctx.best_weights, ctx.metrics = 0, -1.0, None, {}
    ctx.nonfinite_steps, ctx.nonfinite_streak, ctx.batch_in_epoch = 0, 0, 0
    ctx.compile_clock = None
    return ctx


def main(args):
    validate_args(args)
    rank, world_size, device = utils.setup_distributed(args.device)
    stop = utils.StopRequest()
    say = print if rank == 0 else (lambda *a, **k: None)
    ctx = build_context(args, rank, world_size, device)
    ctx.stop = stop
    demo, splits, net = ctx.demo, ctx.splits, ctx.model_without_ddp

    start_epoch = 0
    resume_path = os.path.join(args.output_dir, "last.pth") if args.resume == "auto" else args.resume
    # rank 0 decides, so that every rank resumes or none does (multi-node runs need a shared --output-dir)
    if utils.broadcast_object(bool(resume_path) and os.path.isfile(resume_path)):
        start_epoch = resume(ctx, resume_path)
        say(f"resumed from {resume_path}: epoch {start_epoch + 1}, step {ctx.step}"
            + (f", batch {ctx.batch_in_epoch} of the epoch" if ctx.batch_in_epoch else ""))
    elif args.resume == "auto":
        say(f"--resume auto: no {resume_path} yet, starting fresh")

    model = net
    if args.compile:
        model = torch.compile(net)
        ctx.compile_clock = 0.0  # train_one_epoch times the first step, which compiles
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx.model = model

    ctx.writer = None
    run_name = args.run_name or f"mobilenetv3_{args.arch}_{args.width_mult:g}"
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events a killed run wrote after its last checkpoint: no duplicated steps on resume
        ctx.writer = SummaryWriter(os.path.join(args.log_dir, run_name), purge_step=ctx.step + 1)

    say(f"device {device} x{world_size} | precision {ctx.precision} | channels_last {args.channels_last}"
        f" | MobileNetV3-{args.arch.capitalize()} {args.width_mult:g}: {ctx.num_params / 1e6:.2f}M params, "
        f"{ctx.madds / 1e6:.1f}M MAdds at {args.img_size}px")
    say(f"data {args.data_path} ({splits.layout}{', demo' if demo else ''}): {len(splits.train)} train / "
        f"{len(splits.val)} val images, {len(splits.classes)} classes | batch {args.batch_size} x {args.accum_steps} "
        f"x {world_size} = {args.batch_size * args.accum_steps * world_size} | {ctx.steps_per_epoch} steps/epoch, "
        f"{args.epochs} epochs")

    status = "done"
    for epoch in range(start_epoch, args.epochs):
        status = train_one_epoch(ctx, epoch, ctx.batch_in_epoch)
        if status == "diverged":
            raise UserError(f"the loss was not finite for {MAX_NONFINITE_STREAK} steps in a row at step {ctx.step}: "
                            f"training stopped, last good checkpoint kept in {args.output_dir}. "
                            "Try a lower --lr or --clip-grad-norm")
        if status == "stopped":
            saved = save(ctx, epoch)
            break
        t = ctx.last_train
        say(f"epoch {epoch + 1}/{args.epochs}: train loss {t['loss']:.4f} top-1 {t['top1']:.2f}% "
            f"({t['time']:.1f}s, {t['images'] / max(t['time'], 1e-9):.0f} img/s)")
        if ctx.writer:
            ctx.writer.add_scalar("epoch/train_loss", t["loss"], ctx.step)
            ctx.writer.add_scalar("epoch/train_top1", t["top1"], ctx.step)
            ctx.writer.add_scalar("epoch/time_sec", t["time"], ctx.step)
        skipped = ctx.train_set.skipped + ctx.val_set.skipped
        if skipped:
            say(f"warning: {skipped} unreadable image(s) skipped so far (see the lines above)")
        last_epoch = epoch + 1 == args.epochs
        if (epoch + 1) % args.eval_every == 0 or last_epoch:
            validate_and_track_best(ctx, epoch)
        saved = save(ctx, epoch + 1)
        if utils.any_rank(stop) or (args.max_steps and ctx.step >= args.max_steps):
            status = "stopped"
            break

    if ctx.writer:
        final = {f"hparam/{k}": v for k, v in ctx.metrics.items() if isinstance(v, (int, float))}
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        ctx.writer.add_hparams(hparams, final or {"hparam/best_top1": ctx.best_top1}, run_name=".")
        ctx.writer.close()
    if status == "stopped":
        why = f"{stop.signal_name} received" if stop else f"--max-steps {args.max_steps} reached"
        if saved:
            say(f"{why}: saved {os.path.join(args.output_dir, 'last.pth')} at step {ctx.step}. "
                f"Resume with the same command plus --resume auto")
        else:
            say(f"{why}: the weights were not saved (see the warning); the previous checkpoint is kept")
        return 0
    if rank == 0:
        best = os.path.join(args.output_dir, "best.pth")
        data_flag = "" if demo else f" --data-path {args.data_path}"
        print(f"done: best top-1 {ctx.best_top1:.2f}% ({ctx.best_weights} weights) after {args.epochs} epochs, "
              f"{ctx.nonfinite_steps} non-finite steps skipped")
        print(f"evaluate:    python evaluate.py {best}{data_flag}")
        print(f"tensorboard: tensorboard --logdir {args.log_dir}")
    return 0


def validate_and_track_best(ctx, epoch):
    a, net = ctx.args, ctx.model_without_ddp
    show = ctx.rank == 0
    # DDP syncs BN statistics only at each forward: give every rank rank 0's (the ones saved) before scoring
    utils.broadcast_tensors(list(net.buffers()) + (list(ctx.ema.shadow_params) if ctx.ema else []))
    results = {"raw": evaluate(net, ctx.val_loader, ctx.device, ctx.autocast, a.norm, ctx.channels_last,
                               show_progress=show)}
    if ctx.ema is not None:
        with ctx.ema.average_parameters():
            results["ema"] = evaluate(net, ctx.val_loader, ctx.device, ctx.autocast, a.norm, ctx.channels_last,
                                      desc="val (ema)", show_progress=show)
    line = []
    for name, r in results.items():
        prefix = "val" if name == "raw" else "val_ema"
        line.append(f"{prefix} loss {r['loss']:.4f} top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}%")
        if ctx.writer:
            for key in ("loss", "top1", "top5"):
                ctx.writer.add_scalar(f"{prefix}/{key}", r[key], ctx.step)
    which = max(results, key=lambda k: (results[k]["top1"], k == "ema"))  # ties go to the EMA
    top1 = results[which]["top1"]
    is_best = top1 > ctx.best_top1
    if is_best:
        ctx.best_top1, ctx.best_weights = top1, which
    ctx.metrics = {"val_top1": results["raw"]["top1"], "val_top5": results["raw"]["top5"],
                   "val_loss": results["raw"]["loss"], "val_images": results["raw"]["images"], "epoch": epoch + 1,
                   "best_top1": ctx.best_top1}
    if "ema" in results:
        ctx.metrics.update({"val_ema_top1": results["ema"]["top1"], "val_ema_top5": results["ema"]["top5"],
                            "val_ema_loss": results["ema"]["loss"]})
    if is_best:
        save(ctx, epoch + 1, "best.pth")
    if ctx.rank == 0:
        print("  " + " | ".join(line) + (f"  * new best ({which})" if is_best else ""))
    net.train()


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, get_args_parser().parse_args()))
