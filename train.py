"""Train MobileNetV3 on ImageNet-style folders with AMP, an EMA of the weights and Adam.

Demo (no data needed; generates a small shapes dataset under data/demo and trains on the CPU):
    python train.py

One GPU, the 2021 predecessor's configuration (Large 0.5, batch 128, Adam 5e-3, AMP, EMA 0.9999, 224 px), or
another published recipe (recipes/), whose lr and EMA decay are scaled to this run's global batch:
    python train.py --data-path /data/imagenet --config recipes/original_2021.toml
    python train.py --data-path /data/imagenet --arch large --width-mult 0.5 -b 128 --lr 5e-3 --opt adam \
        --amp --ema-decay 0.9999 --img-size 224

Each run writes checkpoints/<run-name>/ (last.pth, best.pth, best_weights.pth) and runs/<run-name>/ (TensorBoard);
checkpoints/latest points to the newest run. Distillation: add --teacher checkpoints/<big run>/best_weights.pth.

Several GPUs on one node (batch size is per process), or several nodes (run on each node):
    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --data-path ...

Resume after a crash or preemption (same command line is safe to re-run):
    python train.py --data-path /data/imagenet --resume auto
"""
import os

# OpenMP threads that spin while they wait lose their time slices to any other busy process and then stall each
# other: next to one busy process, 4 training steps on the CPU took 38-44 s with spinning threads and 7 s with
# sleeping ones (docs/performance.md). Set before torch loads OpenMP; an OMP_WAIT_POLICY given by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import dataclasses
import math
import pickle
import re
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
# A GradScaler halves its scale at each overflow while it calibrates; below 1 the gradients overflow fp16 even
# unscaled, which is divergence, not calibration (train_on_batch)
MIN_LOSS_SCALE = 1.0
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")
CHECKPOINTS = "checkpoints"  # default parent of the run folders, relative to where train.py is started


def get_args_parser():
    parser = argparse.ArgumentParser(description="Train MobileNetV3 (demo data when --data-path is omitted).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, metavar="FILE.toml",
                        help="a recipe (see recipes/): its values become the defaults; flags given here still win")
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
    group.add_argument("--val-split-fraction", type=float, default=0.0,
                       help="for data without a validation split: hold out this fraction of each class's training "
                            "images (the same ones for a given --seed; evaluate.py finds them again)")
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
    group.add_argument("--teacher", default=None, metavar="CKPT",
                       help="knowledge distillation from this model (a checkpoint or best_weights.pth of this project, "
                            "or a torchvision state dict; any arch or width, the same classes)")
    group.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the distillation loss (0-1)")
    group.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature of distillation")
    group.add_argument("--pretrained", default=None,
                       help="'torchvision' (needs internet), a torchvision state-dict file, or a checkpoint or "
                            "best_weights.pth of this project (fine-tuning: a classifier of another size is skipped)")

    group = parser.add_argument_group("Optimization")
    group.add_argument("--epochs", type=int, default=None, help="default 200; demo 8")
    group.add_argument("-b", "--batch-size", type=int, default=128, help="images per process and step")
    group.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    group.add_argument("--opt", default="adam", choices=["adam", "adamw", "sgd", "rmsprop"])
    group.add_argument("--lr", type=float, default=5e-3)
    group.add_argument("--lr-base-batch", type=int, default=None,
                       help="the global batch --lr and --ema-decay were tuned for (a recipe's); when this run's "
                            "global batch differs, the lr is scaled by --lr-scaling and the EMA decay per step so "
                            "that its horizon in epochs stays the same")
    group.add_argument("--lr-scaling", default="linear", choices=["linear", "sqrt", "none"],
                       help="with --lr-base-batch: linear (SGD, RMSprop) or square root (Adam-type) lr scaling")
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
                       help="mixed precision (default: on, except on the CPU, where bf16 autocast measured slower than fp32)")
    group.add_argument("--amp-dtype", default="auto", choices=["auto", "float16", "bfloat16"],
                       help="auto: float16 + GradScaler on CUDA, bfloat16 elsewhere")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="default: on for CUDA and CPU (measured, see README)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--sync-bn", action="store_true", help="synchronized BatchNorm across processes")
    group.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    group.add_argument("--seed", type=int, default=0)

    group = parser.add_argument_group("Logging and checkpoints")
    group.add_argument("--output-dir", default=None,
                       help=f"this run's checkpoint folder (default: {CHECKPOINTS}/<run-name>, and "
                            f"{CHECKPOINTS}/latest points to the newest run)")
    group.add_argument("--log-dir", default="runs", help="TensorBoard folder; this run logs to <log-dir>/<run-name>")
    group.add_argument("--run-name", default=None,
                       help="default: <arch>_<width>_<date>-<time>, or the name of the --output-dir folder")
    group.add_argument("--resume", default=None,
                       help="checkpoint path, or 'auto': the run's last.pth if there is one (without --output-dir "
                            f"and --run-name: the latest run, {CHECKPOINTS}/latest)")
    group.add_argument("--overwrite", action="store_true",
                       help="start afresh in a run folder that holds another run's checkpoints or logs (they are "
                            "deleted); without it such a start is refused")
    group.add_argument("--keep-checkpoints", type=int, default=0, metavar="K",
                       help="also keep the raw weights of the last K epochs (epoch_NNNN.pth), for "
                            "`python export.py FILES --format average`")
    group.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    group.add_argument("--print-freq", type=int, default=10, help="steps between logged training metrics")
    group.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (smoke runs)")
    return parser


def validate_args(args):
    """Reject bad values with one line before anything starts."""
    positive = {"--batch-size": args.batch_size, "--accum-steps": args.accum_steps, "--eval-every": args.eval_every,
                "--print-freq": args.print_freq, "--lr-step-size": args.lr_step_size}
    if args.lr_base_batch is not None:
        positive["--lr-base-batch"] = args.lr_base_batch
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
    if not 0 <= args.val_split_fraction < 1:
        raise UserError(f"--val-split-fraction must be in [0, 1) (got {args.val_split_fraction})")
    if args.keep_checkpoints < 0:
        raise UserError(f"--keep-checkpoints must be 0 or more (got {args.keep_checkpoints})")
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
    if not 0 <= args.kd_alpha <= 1 or not args.kd_temperature > 0:
        raise UserError("--kd-alpha must be in [0, 1] and --kd-temperature positive")
    if args.teacher is not None and not os.path.isfile(args.teacher):
        raise UserError(f"--teacher file not found: {args.teacher}")
    if args.label_smoothing >= 1 or args.random_erase > 1 or not 0 <= args.dropout < 1:
        raise UserError("--label-smoothing and --dropout must be below 1, --random-erase at most 1")
    if args.decode_on == "device" and (args.auto_augment or args.random_erase):
        raise UserError("--decode-on device does the crop and flip only: drop --auto-augment and --random-erase, "
                        "or decode on the workers")
    if args.data_path is not None and not os.path.exists(args.data_path):
        raise UserError(f"--data-path {args.data_path} does not exist")
    if args.data_path is not None and not os.path.isdir(args.data_path):
        raise UserError(f"--data-path {args.data_path} is not a folder")
    if args.resume not in (None, "auto") and os.path.isdir(args.resume):
        raise UserError(f"--resume {args.resume} is a folder: give the checkpoint file in it (e.g. last.pth)")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise UserError(f"--resume file not found: {args.resume}")
    if args.pretrained not in (None, "torchvision") and not os.path.isfile(args.pretrained):
        raise UserError(f"--pretrained file not found: {args.pretrained}")


def parse_args(argv=None):
    """The command line, with a --config recipe's values as defaults (flags given on the command line win).

    A recipe is a TOML file: top-level keys are train.py's flags (dest names, e.g. batch_size = 128), and a
    [recipe] table holds what is not a flag: name, source, published_top1, not_reproduced, and the global batch
    its lr belongs to (global_batch) with its lr_scaling, which become --lr-base-batch and --lr-scaling."""
    parser = get_args_parser()
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=None)
    path = config.parse_known_args(argv)[0].config
    if path:
        try:
            parser.set_defaults(**read_recipe(path, parser))
        except UserError as e:
            parser.exit(2, f"error: {e}\n")
    return parser.parse_args(argv)


RECIPE_METADATA = {"name": str, "source": str, "published_top1": (int, float), "global_batch": int,
                   "lr_scaling": str, "not_reproduced": list, "proposed_flags": list}


def read_recipe(path, parser):
    """{flag dest: value} from a recipe file, checked against the parser; one-line UserError otherwise."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise UserError("--config needs Python 3.11 or newer (it reads TOML with the standard library)") from None
    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path} is not valid TOML ({e})") from None
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    meta = recipe.pop("recipe", {})
    if not isinstance(meta, dict):
        raise UserError(f"--config {path}: recipe must be a [recipe] table (name, source, published_top1, ...)")
    for key, value in meta.items():
        if key not in RECIPE_METADATA:
            raise UserError(f"--config {path}: unknown key {key!r} in [recipe] (known: {', '.join(RECIPE_METADATA)})")
        if not isinstance(value, RECIPE_METADATA[key]) or isinstance(value, bool):
            raise UserError(f"--config {path}: [recipe] {key} = {value!r} has the wrong type")
    defaults = {}
    for key, value in recipe.items():
        action = actions.get(key)
        if action is None:
            raise UserError(f"--config {path}: unknown key {key!r} (keys are train.py flags, e.g. batch_size)")
        switch = action.nargs == 0  # store_true and --x/--no-x flags
        wanted = bool if switch else action.type or str
        fits = isinstance(value, bool) if switch else (not isinstance(value, bool) and (
            isinstance(value, wanted) or (wanted is float and isinstance(value, int))))
        if not fits:
            raise UserError(f"--config {path}: {key} = {value!r} should be {wanted.__name__}")
        if action.choices is not None and value not in action.choices:
            raise UserError(f"--config {path}: {key} = {value!r} is not one of {', '.join(map(str, action.choices))}")
        defaults[key] = float(value) if wanted is float else value
    if "global_batch" in meta:
        defaults.setdefault("lr_base_batch", meta["global_batch"])
    if "lr_scaling" in meta:
        if meta["lr_scaling"] not in ("linear", "sqrt", "none"):
            raise UserError(f"--config {path}: [recipe] lr_scaling must be linear, sqrt or none")
        defaults.setdefault("lr_scaling", meta["lr_scaling"])
    return defaults


def scaled_to_global_batch(args, world_size):
    """(lr, EMA decay per step) for this run's global batch. With --lr-base-batch B and a global batch G, the lr
    is scaled by G/B (linear) or sqrt(G/B), and the EMA decay d becomes d ** (G/B): k times fewer steps an epoch
    then take d ** k each, so the EMA still averages over the same number of epochs."""
    if not args.lr_base_batch:
        return args.lr, args.ema_decay
    ratio = args.batch_size * args.accum_steps * world_size / args.lr_base_batch
    lr = args.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[args.lr_scaling]
    return lr, args.ema_decay ** ratio


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


def lr_factor(progress, args, steps_per_epoch):
    """Learning-rate multiplier for the update that starts at `progress` epochs into training (a float, so that
    a resume with another batch size or GPU count continues at the same point of the schedule): a linear warm-up
    over --warmup-epochs (rounded to whole steps), then the chosen schedule."""
    position = progress * steps_per_epoch  # updates so far, counted in this run's steps
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    if position < warmup_steps - 1e-6:
        return min(1.0, (position + 1) / warmup_steps)
    if args.lr_scheduler == "cosine":
        total = max(1, args.epochs * steps_per_epoch - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (position - warmup_steps) / total)))
    if args.lr_scheduler == "step":
        return args.lr_gamma ** int(progress // args.lr_step_size)
    if args.lr_scheduler == "legacy":
        return 0.99 ** int(progress // 3)
    return 1.0


def set_hyperparameters(optimizer, args, lr):
    """lr for this update, and the weight decay and momentum of args (a resumed run applies changed flags)."""
    decay_group = optimizer.param_groups[0]
    decay_group["weight_decay"] = args.weight_decay
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "momentum" in group:
            group["momentum"] = args.momentum
            if "nesterov" in group:
                group["nesterov"] = args.momentum > 0


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


def ema_checkpoint_state(ema):
    """torch-ema's state without `collected_params`, the copy of the raw weights average_parameters() leaves
    behind: it would double the EMA's share of every checkpoint and is never needed to resume."""
    state = ema.state_dict()
    state["collected_params"] = None
    return state


def distillation_loss(logits, targets, criterion, teacher_logits, alpha, temperature):
    """(1 - alpha) x the usual loss + alpha x T^2 x KL(teacher || student) on softmaxes at temperature T
    (Hinton et al., 2015: T^2 keeps the gradients' scale independent of T). Returns (loss, the KL term)."""
    student = torch.log_softmax(logits.float() / temperature, dim=1)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=1)
    kd = nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2
    return (1 - alpha) * criterion(logits, targets) + alpha * kd, kd


def load_teacher(args, classes, num_classes, device):
    """The teacher of --teacher, frozen, in eval mode, on the training device."""
    import evaluate
    with torch.random.fork_rng(devices=[]):  # building it must not move the student's random stream
        teacher, info = evaluate.load_model_for_eval(args.teacher)
    outputs = info["config"]["num_classes"]
    if info["norm"] != args.norm:
        raise UserError(f"--teacher {args.teacher} was trained with --norm {info['norm']}, this run uses --norm "
                        f"{args.norm}: the teacher would see wrongly normalized images")
    if info["classes"] is not None and list(info["classes"][:len(classes)]) != list(classes):
        raise UserError(f"--teacher {args.teacher} was trained on other classes than this dataset's")
    if outputs != num_classes:
        raise UserError(f"--teacher {args.teacher} has {outputs} outputs, this model {num_classes}")
    teacher.to(device).eval().requires_grad_(False)
    return teacher.to(memory_format=torch.channels_last) if args.channels_last else teacher


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
    the same decision. Gradients are unscaled first (GradScaler, fp16) so clipping sees the true norm.
    Reading the norm is the one host sync per step; with a GradScaler on CUDA the scaler makes the same one.
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
        scaler.update()  # after an overflow this halves the loss scale
    optimizer.zero_grad(set_to_none=True)
    return finite


# ---------------------------------------------------------------- the state of a run, and what it is built from

@dataclasses.dataclass
class TrainState:
    """The progress of a run: what a checkpoint saves besides the weights, optimizer, scaler and EMA, and exactly
    what a resume restores (its fields are top-level keys of every checkpoint)."""
    epoch: int = 0                   # the epoch in progress, 0-based (= epochs completed when batch_in_epoch is 0)
    batch_in_epoch: int = 0          # micro-batches of that epoch already trained
    step: int = 0                    # optimizer steps so far: TensorBoard's x axis, never rescaled
    best_top1: float = -1.0          # best validation top-1 of a checkpoint actually written as best.pth
    best_weights: str | None = None  # "raw" or "ema": which weights scored best_top1
    best_epoch: int = 0              # epochs completed when best.pth was written
    metrics: dict = dataclasses.field(default_factory=dict)  # the last validation's figures
    nonfinite_steps: int = 0         # updates skipped for a non-finite loss or a collapsed loss scale
    nonfinite_streak: int = 0        # of those, in a row up to now
    scaler_skips: int = 0            # fp16 updates GradScaler skipped to lower its scale: routine, not divergence
    validation_pending: bool = False  # stopped after an epoch's last step, before that epoch's validation

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, saved):
        for field in dataclasses.fields(self):
            if field.name in saved:
                setattr(self, field.name, saved[field.name])

    def progress(self, steps_per_epoch, accum_steps):
        """Epochs of training done at this point, as a float."""
        return self.epoch + (self.batch_in_epoch // accum_steps) / steps_per_epoch


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
        args.amp = device.type != "cpu"  # CPU bf16 autocast: 0.4-0.85x of fp32, even with AMX-BF16 (measured)
    if args.channels_last is None:  # faster on CUDA and, measured with benchmark.py, 1.24x on the CPU too
        args.channels_last = device.type in ("cuda", "cpu")
    if args.workers is None:
        args.workers = utils.default_workers(device)
    return args


def prepare_output(args, rank):
    """Checkpoint and TensorBoard folders, checked at start (rank 0 writes both)."""
    if rank == 0:
        utils.prepare_output_dir(args.output_dir)
        utils.prepare_log_dir(os.path.join(args.log_dir, run_name(args)))
    if args.data_path is None and rank == 0:
        dataset.make_demo_dataset(DEMO_DIR)


def run_name(args):
    """The TensorBoard run name: --run-name, else the name of the checkpoint folder (one folder per run)."""
    return args.run_name or os.path.basename(os.path.abspath(args.output_dir))


def choose_run_folder(args):
    """(checkpoint folder, run name, whether it is the latest run followed by --resume auto), decided on rank 0
    and broadcast by main. Every run gets its own folder: <output-dir> when given, else checkpoints/<run-name>
    with a new, time-stamped name (reserved at once, so two runs started in the same second get two), so that a
    second run never overwrites a first one's checkpoints or TensorBoard events. --resume auto without a folder
    continues the latest run (checkpoints/latest); --resume PATH continues in PATH's folder."""
    if args.output_dir is not None:
        folder = os.path.realpath(args.output_dir)  # checkpoints/latest/ given as a folder: the run it points to
        return folder, args.run_name or os.path.basename(folder), False
    if args.resume not in (None, "auto"):
        folder = os.path.dirname(os.path.realpath(args.resume))
        return folder, args.run_name or os.path.basename(folder), False
    latest = os.path.join(CHECKPOINTS, "latest")
    if args.resume == "auto" and not args.run_name and os.path.isdir(latest):
        folder = os.path.realpath(latest)
        return folder, os.path.basename(folder), True
    name = args.run_name or f"{args.arch}_{args.width_mult:g}_{time.strftime('%Y%m%d-%H%M%S')}"
    folder = os.path.join(CHECKPOINTS, name)
    for n in range(2, 1000):
        if args.run_name is not None:
            break
        try:
            os.makedirs(folder)  # reserved: a run started in the same second takes the next suffix
            break
        except FileExistsError:
            folder = os.path.join(CHECKPOINTS, f"{name}-{n}")
        except OSError:
            break  # an unwritable checkpoints/: prepare_output says so in one line
    return folder, os.path.basename(folder), False


# a run's files: what refuse_to_overwrite looks for in a run folder before a fresh start there
RUN_FILES = re.compile(r"(last|best|best_weights|epoch_\d{4})\.pth")


def refuse_to_overwrite(args, rank):
    """A fresh start (no --resume) never destroys another run's checkpoints or TensorBoard events, unless
    --overwrite asks for it: then they are deleted first (by rank 0)."""
    if args.resume is not None or rank != 0:
        return
    log_folder = os.path.join(args.log_dir, args.run_name)
    found = []
    if os.path.isdir(args.output_dir):
        found += [os.path.join(args.output_dir, name) for name in sorted(os.listdir(args.output_dir))
                  if RUN_FILES.fullmatch(name)]
    if os.path.isdir(log_folder):
        found += [os.path.join(log_folder, name) for name in sorted(os.listdir(log_folder)) if "tfevents" in name]
    if not found:
        return
    if not args.overwrite:
        raise UserError(f"{found[0]} belongs to an earlier run: add --resume auto to continue it, --overwrite to "
                        f"start afresh (deleting {plural(len(found), 'file')} of it), or choose another "
                        f"--output-dir / --run-name")
    try:
        for path in found:
            os.remove(path)
    except OSError as e:
        raise UserError(f"--overwrite: cannot delete {path}: {e.strerror or e}") from None


def point_latest_at(folder):
    """checkpoints/latest -> the run folder (a relative symbolic link, replaced atomically)."""
    folder = os.path.realpath(folder)
    if os.path.dirname(folder) != os.path.realpath(CHECKPOINTS) or os.path.basename(folder) == "latest":
        return
    link, tmp = os.path.join(CHECKPOINTS, "latest"), os.path.join(CHECKPOINTS, f".latest-{os.getpid()}")
    try:
        os.symlink(os.path.basename(folder), tmp)
        os.replace(tmp, link)
    except OSError:  # a filesystem without symbolic links, or a real folder named latest: no pointer
        with contextlib.suppress(OSError):
            os.remove(tmp)


def build_data(args, rank, world_size, device):
    """(splits, train set, val set, train loader, val loader) for this rank."""
    data_path = args.data_path or DEMO_DIR
    splits = dataset.find_dataset(data_path)
    if splits.val is not None and args.val_split_fraction:
        raise UserError(f"--val-split-fraction: {data_path} has a validation split already ({splits.layout})")
    if splits.val is None and args.val_split_fraction:
        splits.train, splits.val = dataset.split_validation(splits.train, args.val_split_fraction, args.seed)
        splits.layout += f"; validation: {args.val_split_fraction:g} of each training class, held out"
    if splits.val is None:
        raise UserError(f"no validation split found under {data_path}: add a val/ folder (see README: accepted "
                        "layouts) or hold out part of the training images with --val-split-fraction 0.05")
    if args.decode_on == "device":
        dataset.EncodedImageFiles.check_device(device)
        train_set = dataset.EncodedImageFiles(splits.train, args.img_size, args.min_scale, strict=args.strict_data)
    else:
        train_set = dataset.ImageFiles(splits.train, dataset.train_transform(args.img_size, args.auto_augment,
                                       args.random_erase, args.norm, args.min_scale), strict=args.strict_data)
    # unreadable validation images are left out and named, never replaced by a neighbour (which would count twice)
    val_set = dataset.ValidationImageFiles(splits.val, dataset.val_transform(args.val_resize_size,
                                           args.val_crop_size), strict=args.strict_data)
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


def pretrained_state(source):
    """What --pretrained names, for model.load_pretrained: "torchvision", or the state dict in a file: a torchvision
    state dict, or this project's checkpoint (its best weights) or best_weights.pth."""
    if source == "torchvision":
        return source
    ckpt = utils.load_checkpoint(source)
    if ckpt.get("format") == utils.WEIGHTS_FORMAT:
        return ckpt["model"]
    if ckpt.get("format") == utils.CHECKPOINT_FORMAT:
        return ckpt["ema_model"] if ckpt.get("best_weights") == "ema" and ckpt.get("ema_model") else ckpt["model"]
    return ckpt


def build_model(args, num_classes, device, world_size):
    net = model_lib.build_model(args.arch, args.width_mult, num_classes, dropout=args.dropout,
                                bn_momentum=args.bn_momentum)
    if args.pretrained:
        try:
            model_lib.load_pretrained(net, pretrained_state(args.pretrained))
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
    return net


def build_context(args, rank=0, world_size=1, device=torch.device("cpu")):
    """Data, model, optimizer, EMA and precision for training with args, as a Context; nothing runs yet.
    main adds resuming, torch.compile, DDP and TensorBoard; benchmark.py uses it as it is. Every rank-local
    failure here reaches every rank (utils.fail_together), so no rank waits for a peer that stopped."""
    demo = args.data_path is None
    resolve_defaults(args, device)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training shapes: pick the fastest convolution algorithms
    utils.seed_everything(args.seed + rank)
    utils.fail_together(prepare_output, args, rank)
    splits, train_set, val_set, train_loader, val_loader = utils.fail_together(build_data, args, rank, world_size,
                                                                               device)
    num_classes = args.num_classes or len(splits.classes)
    if num_classes < len(splits.classes):
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(splits.classes)} classes in the data")
    net = utils.fail_together(build_model, args, num_classes, device, world_size)

    ctx = Context()
    ctx.args, ctx.rank, ctx.world_size, ctx.device = args, rank, world_size, device
    ctx.stop, ctx.writer, ctx.show_progress = None, None, rank == 0
    ctx.splits, ctx.classes, ctx.class_names = splits, splits.classes, splits.class_names
    ctx.data_path = args.data_path or DEMO_DIR
    ctx.train_set, ctx.val_set, ctx.loader, ctx.val_loader = train_set, val_set, train_loader, val_loader
    ctx.sampler = train_loader.sampler
    ctx.model = ctx.model_without_ddp = net
    ctx.ddp = None
    ctx.num_params, ctx.madds, ctx.demo = model_lib.count_params(net), model_lib.count_madds(net, args.img_size), demo
    ctx.params = list(net.parameters())
    ctx.bn_buffers = [b for b in net.buffers() if b.is_floating_point()]
    ctx.bn_backup = [b.detach().clone() for b in ctx.bn_buffers]
    ctx.optimizer = make_optimizer(net, args, device)
    ctx.lr, ctx.ema_decay = scaled_to_global_batch(args, world_size)
    ctx.ema = make_ema(net, ctx.ema_decay)
    ctx.autocast, ctx.scaler, ctx.precision = utils.precision_for(device, args.amp, args.amp_dtype)
    ctx.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    ctx.teacher = utils.fail_together(load_teacher, args, splits.classes, num_classes, device) if args.teacher else None
    ctx.kd_sum = torch.zeros((), device=device)  # the distillation term since the last report
    ctx.mixup = dataset.make_mixup_cutmix(args.mixup_alpha, args.cutmix_alpha, num_classes)
    ctx.channels_last = args.channels_last
    ctx.steps_per_epoch = len(train_loader) // args.accum_steps
    ctx.state = TrainState()
    ctx.time_compile = bool(args.compile)  # the first update compiles the model: train_one_epoch times it
    ctx.update_loss_finite = None
    return ctx


# ---------------------------------------------------------------- the loop

def train_on_batch(ctx, images, targets, batch):
    """Train on micro-batch number `batch` of the epoch (0-based); on the last micro-batch of an update also take
    the optimizer step. Owns the learning rate, the BN-momentum warm-up, DDP's no_sync, the step, the handling of
    non-finite updates and the EMA. Returns (logits, loss, whether an update was taken)."""
    a, s = ctx.args, ctx.state
    first, last = batch % a.accum_steps == 0, (batch + 1) % a.accum_steps == 0
    if first:
        torch._foreach_copy_(ctx.bn_backup, ctx.bn_buffers)  # to take back if this update is not finite
        ctx.update_progress = s.progress(ctx.steps_per_epoch, a.accum_steps)
        set_hyperparameters(ctx.optimizer, a, ctx.lr * lr_factor(ctx.update_progress, a, ctx.steps_per_epoch))
        if s.step * a.bn_momentum <= 10 and not a.compile:  # a changing float would recompile every step
            warm_up_bn_momentum(ctx.model_without_ddp, s.step, a.bn_momentum)
        ctx.update_loss_finite = torch.ones((), dtype=torch.bool, device=ctx.device)
    no_sync = ctx.ddp.no_sync() if ctx.ddp is not None and not last else contextlib.nullcontext()
    criterion = ctx.criterion
    if ctx.teacher is not None:  # the same augmented (and mixed) batch, the same autocast, no gradients
        with torch.no_grad(), ctx.autocast():
            teacher_logits = ctx.teacher(images)

        def criterion(logits, targets):
            loss, kd = distillation_loss(logits, targets, ctx.criterion, teacher_logits, a.kd_alpha, a.kd_temperature)
            ctx.kd_sum += kd.detach()
            return loss
    with no_sync:
        logits, loss = train_step(ctx.model, images, targets, criterion, ctx.scaler, ctx.autocast, a.accum_steps)
    ctx.update_loss_finite &= torch.isfinite(loss)
    if not last:
        return logits, loss, False
    if optimizer_step(ctx.optimizer, ctx.scaler, ctx.params, a.clip_grad_norm):
        s.nonfinite_streak = 0
    elif ctx.scaler and ctx.scaler.get_scale() >= MIN_LOSS_SCALE and \
            not utils.any_rank(not bool(ctx.update_loss_finite)):
        s.scaler_skips += 1  # finite loss, fp16 gradients overflowed: the scaler lowers its scale, as designed
        s.nonfinite_streak = 0  # and a finite loss ends a streak of non-finite ones
    else:
        # the forward passes already moved the BN running statistics (maybe to NaN): take them back
        torch._foreach_copy_(ctx.bn_buffers, ctx.bn_backup)
        s.nonfinite_steps += 1
        s.nonfinite_streak += 1
    if ctx.ema is not None:
        ctx.ema.update()
    s.step += 1
    return logits, loss, True


class MetricWindow:
    """Sums of loss, top-1 hits and images since the last report, kept on the device (reading them is a sync)."""

    def __init__(self, device, dtype=torch.float32):
        self.sums = torch.zeros(3, dtype=dtype, device=device)  # loss x images, top-1 hits, images
        self.start, self.data_wait = time.perf_counter(), 0.0

    def add(self, loss, hits, n):
        """loss: the batch's mean loss; hits: its top-1 hits (a device tensor); n: its images."""
        self.sums[0] += loss.to(self.sums.dtype) * n
        self.sums[1] += hits
        self.sums[2] += n

    def read(self):
        """(mean loss, top-1 %, images, seconds since start)."""
        loss_sum, hits, count = self.sums.tolist()
        return loss_sum / max(count, 1), 100 * hits / max(count, 1), int(count), time.perf_counter() - self.start


def train_one_epoch(ctx):
    """Train the epoch ctx.state.epoch from micro-batch ctx.state.batch_in_epoch (non-zero after a mid-epoch
    resume) to its end. Returns "done", "stopped" (signal or --max-steps; state saved by the caller) or
    "diverged"."""
    a, s = ctx.args, ctx.state
    ctx.model.train()
    start_batch = s.batch_in_epoch
    batches = ctx.steps_per_epoch * a.accum_steps  # micro-batches left over by --accum-steps are not loaded
    ctx.sampler.set_epoch(s.epoch, skip_batches=start_batch, batch_size=a.batch_size)
    mean, std = dataset.NORMS[a.norm]
    window, epoch_sums = MetricWindow(ctx.device), MetricWindow(ctx.device, utils.sum_dtype(ctx.device))
    ctx.kd_sum.zero_()  # the distillation term, summed over the same micro-batches as the window
    status = "done"
    bar = tqdm(total=batches, initial=start_batch, desc=f"epoch {s.epoch + 1}/{a.epochs}",
               disable=not ctx.show_progress, dynamic_ncols=True, leave=False)
    compile_start, fetch_start = None, time.perf_counter()
    for images, targets in ctx.loader:
        window.data_wait += time.perf_counter() - fetch_start
        compile_start = compile_start or time.perf_counter()  # --compile: the first update compiles the model
        images, targets = ctx.train_set.batch_to(ctx.device, images, targets)
        images = dataset.normalize_batch(images, mean, std, ctx.channels_last)
        if ctx.mixup is not None:
            images, targets = ctx.mixup(images, targets)
        if s.step == 0 and s.batch_in_epoch == 0 and ctx.writer:
            log_augmented_images(ctx.writer, images, mean, std)
        logits, loss, updated = train_on_batch(ctx, images, targets, s.batch_in_epoch)
        s.batch_in_epoch += 1
        hits = utils.correct_topk(logits, targets, (1,))[0]  # once, for both meters
        window.add(loss, hits, targets.shape[0])
        epoch_sums.add(loss, hits, targets.shape[0])
        bar.update(1)
        if updated and ctx.time_compile:
            log_compile_time(ctx, loss, compile_start)
        if updated and s.step % a.print_freq == 0:
            log_training(ctx, window, bar)
            window = MetricWindow(ctx.device)
        if s.nonfinite_streak >= MAX_NONFINITE_STREAK:
            status = "diverged"
            break
        # every rank must stop at the same step, whichever of them got the signal
        if updated and (utils.any_rank(ctx.stop) or (a.max_steps and s.step >= a.max_steps)):
            if s.batch_in_epoch < batches:
                status = "stopped"
            break
        if s.batch_in_epoch >= batches:
            break
        fetch_start = time.perf_counter()
    bar.close()
    utils.all_reduce_sum(epoch_sums.sums)
    loss, top1, images, seconds = epoch_sums.read()
    ctx.last_train = {"loss": loss, "top1": top1, "time": seconds, "images": images}
    if status == "done":
        s.epoch, s.batch_in_epoch = s.epoch + 1, 0
    return status


def log_compile_time(ctx, loss, start):
    loss.item()  # wait for the device, once
    seconds = time.perf_counter() - start
    if ctx.rank == 0:
        tqdm.write(f"torch.compile: the first step took {seconds:.1f}s (compiling)")
    if ctx.writer:
        ctx.writer.add_scalar("perf/compile_first_step_sec", seconds, ctx.state.step)
    ctx.time_compile = False


def log_training(ctx, window, bar):
    """The training figures of the last --print-freq steps: progress bar and TensorBoard (one host sync)."""
    s = ctx.state
    loss, top1, images, elapsed = window.read()
    lr = ctx.optimizer.param_groups[0]["lr"]
    speed = images * ctx.world_size / max(elapsed, 1e-9)
    bar.set_postfix(loss=f"{loss:.3f}", top1=f"{top1:.1f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
    kd_sum, ctx.kd_sum = ctx.kd_sum, torch.zeros((), device=ctx.device)
    if ctx.writer:
        w = ctx.writer
        w.add_scalar("train/loss", loss, s.step)
        w.add_scalar("train/top1", top1, s.step)
        w.add_scalar("train/lr", lr, s.step)
        w.add_scalar("train/epoch", ctx.update_progress, s.step)  # where the last update's lr was taken
        w.add_scalar("train/images_per_sec", speed, s.step)
        w.add_scalar("train/data_wait_fraction", window.data_wait / max(elapsed, 1e-9), s.step)
        w.add_scalar("train/nonfinite_steps", s.nonfinite_steps, s.step)
        if ctx.teacher is not None:
            w.add_scalar("train/kd_loss", kd_sum.item() / max(1, images // ctx.args.batch_size), s.step)
        if ctx.scaler is not None:
            w.add_scalar("train/scaler_skips", s.scaler_skips, s.step)
            w.add_scalar("train/loss_scale", ctx.scaler.get_scale(), s.step)
        if ctx.device.type == "cuda":
            w.add_scalar("train/gpu_memory_mb", utils.peak_memory_mb(ctx.device), s.step)


def log_augmented_images(writer, images, mean, std):
    import torchvision
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    grid = torchvision.utils.make_grid((images[:32].float() * std + mean).clamp(0, 1), nrow=8)
    writer.add_image("train/augmented_batch", grid.cpu(), 0)


# ---------------------------------------------------------------- checkpoints

def checkpoint_state(ctx):
    a = ctx.args
    return {
        "format": utils.CHECKPOINT_FORMAT,
        **ctx.state.state_dict(),        # epoch, batch_in_epoch, step, best_top1, ... (TrainState)
        "model": ctx.model_without_ddp.state_dict(),
        "model_config": model_lib.model_config(ctx.model_without_ddp),
        "ema": ema_checkpoint_state(ctx.ema) if ctx.ema else None,
        "ema_model": ema_state_dict(ctx.model_without_ddp, ctx.ema) if ctx.ema else None,
        "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict() if ctx.scaler else None,
        "rng": ctx.rng_states,           # one per rank: each rank's dropout/mixup stream resumes exactly
        "world_size": ctx.world_size,
        "steps_per_epoch": ctx.steps_per_epoch,
        "data_path": ctx.data_path,
        "args": dict(vars(a)),
        "classes": list(ctx.classes),
        "class_names": list(ctx.class_names),
        "norm": a.norm,
        "val_resize_size": a.val_resize_size,
        "val_crop_size": a.val_crop_size,
    }


def can_save(ctx):
    """A checkpoint is never written in a non-finite streak or with non-finite weights (rank 0 decides)."""
    ok = ctx.state.nonfinite_streak == 0 and utils.check_finite(ctx.model_without_ddp)
    return utils.broadcast_object(ok)


def save(ctx, also_best=False):
    """Write last.pth, then best.pth with the same state when also_best. Every rank calls it (the RNG states
    are gathered; a failed write on rank 0 ends every rank). Returns whether the checkpoint was written.

    last.pth goes first: it records best_top1 and best_epoch, so a crash between the two writes leaves a
    last.pth from which resume() rewrites best.pth (repair_best); the other order would let a resumed run
    replace the new best.pth by a worse model."""
    ctx.rng_states = utils.gather_objects(utils.get_rng_state())
    if not can_save(ctx):
        if ctx.rank == 0:
            why = "the last steps had a non-finite loss" if ctx.state.nonfinite_streak else "weights are not finite"
            print(f"warning: {why}; keeping the previous checkpoints", file=sys.stderr)
        return False

    def write():
        if ctx.rank == 0:
            state = checkpoint_state(ctx)
            utils.save_checkpoint(state, os.path.join(ctx.args.output_dir, "last.pth"))
            if also_best:
                utils.save_checkpoint(state, os.path.join(ctx.args.output_dir, "best.pth"))
                utils.save_checkpoint(weights_file(state), os.path.join(ctx.args.output_dir, "best_weights.pth"))
            if ctx.args.keep_checkpoints and not ctx.state.batch_in_epoch and not ctx.state.validation_pending:
                keep_epoch_weights(state, ctx.args.output_dir, ctx.args.keep_checkpoints)
    utils.fail_together(write)
    return True


def weights_file(state):
    """best_weights.pth: only the best weights (EMA or raw) with what evaluate.py, export.py and --pretrained need
    to use them: a few MB, where best.pth also holds the other weights, the EMA's and the optimizer's state."""
    keep = ("model_config", "classes", "class_names", "norm", "val_resize_size", "val_crop_size", "best_top1",
            "epoch", "data_path")
    weights = state["best_weights"]
    return {"format": utils.WEIGHTS_FORMAT, "weights": weights, **{key: state.get(key) for key in keep},
            "model": state["ema_model"] if weights == "ema" else state["model"], "args": state["args"]}


def keep_epoch_weights(state, output_dir, keep):
    """epoch_NNNN.pth: the raw weights after each epoch, the last `keep` of them (for checkpoint averaging)."""
    utils.save_checkpoint({**weights_file(state), "weights": "raw", "model": state["model"]},
                          os.path.join(output_dir, f"epoch_{state['epoch']:04d}.pth"))
    kept = sorted(name for name in os.listdir(output_dir) if re.fullmatch(r"epoch_\d{4}\.pth", name))
    for name in kept[:-keep]:
        os.remove(os.path.join(output_dir, name))


def repair_best(ckpt, output_dir):
    """A crash between the writes of last.pth and best.pth (or best_weights.pth) leaves a best file older than
    last.pth's best_top1 says, while last.pth holds that best state itself: rewrite it from there (rank 0)."""
    if ckpt.get("best_epoch") != ckpt["epoch"] or ckpt["batch_in_epoch"] or ckpt.get("best_top1", -1) < 0:
        return
    for name, state in (("best.pth", ckpt), ("best_weights.pth", None)):
        path = os.path.join(output_dir, name)
        try:
            if utils.load_checkpoint(path).get("best_top1", -1) >= ckpt["best_top1"]:
                continue
        except utils.CheckpointError:
            pass  # missing or broken
        utils.save_checkpoint(state or weights_file(ckpt), path)
        print(f"rewrote {path} from the last checkpoint (the run had stopped before writing it)")


# flags that may differ in a resumed run without being worth a word: where things go, how fast, for how long
RESUME_QUIET_FLAGS = {"resume", "output_dir", "log_dir", "run_name", "workers", "device", "max_steps", "print_freq",
                      "data_path", "compile", "deterministic", "strict_data", "eval_every", "overwrite", "pretrained",
                      "config"}


def check_resume_flags(ctx, ckpt, path):
    """Refuse what cannot continue exactly; list every other flag that changed (they are applied)."""
    a, saved = ctx.args, ckpt.get("args", {})
    if saved.get("opt", a.opt) != a.opt:
        raise utils.CheckpointError(f"{path} was trained with --opt {saved['opt']}; resume with the same --opt "
                                    f"(to start a new run from its weights, use --pretrained with its weights)")
    if ckpt["batch_in_epoch"]:
        now = (a.batch_size, a.accum_steps, ctx.world_size, a.seed, ctx.steps_per_epoch)
        then = (saved.get("batch_size"), saved.get("accum_steps"), ckpt.get("world_size", 1), saved.get("seed", 0),
                ckpt.get("steps_per_epoch", ctx.steps_per_epoch))
        if now != then:
            raise utils.CheckpointError(
                f"{path} stopped inside an epoch with batch size, accum steps, processes, seed and steps an epoch "
                f"{then}; resume it with the same (this run has {now}: did the training folder change?), or "
                "resume from a checkpoint written at the end of an epoch")
    changed = [f"--{key.replace('_', '-')} {saved[key]} -> {value}" for key, value in sorted(vars(a).items())
               if key in saved and saved[key] != value and key not in RESUME_QUIET_FLAGS]
    other_run = [change for change in changed if not change.startswith("--epochs ")]  # more epochs: same run
    if other_run and getattr(ctx, "followed_latest", False):  # --resume auto found the latest run by itself
        raise utils.CheckpointError(
            f"--resume auto would continue the latest run, {os.path.dirname(path)}, which was started with other "
            f"flags ({', '.join(other_run[:3])}{', ...' if len(other_run) > 3 else ''}): give --run-name or "
            "--output-dir to continue a run, or leave out --resume to start a new one")
    if changed and ctx.rank == 0:
        print(f"resume: flags changed since the checkpoint, applied from now on: {', '.join(changed)}")


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
    check_resume_flags(ctx, ckpt, path)
    ctx.model_without_ddp.load_state_dict(ckpt["model"])
    try:
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:
        raise utils.CheckpointError(f"cannot resume the optimizer from {path} ({e}); was --opt or --wd-norm-bias "
                                    "changed?") from None
    if isinstance(ctx.optimizer, torch.optim.RMSprop) and ctx.args.momentum > 0:
        for group in ctx.optimizer.param_groups:  # trained without momentum: RMSprop made no buffers then
            for param in group["params"]:
                state = ctx.optimizer.state[param]
                if state:
                    state.setdefault("momentum_buffer", torch.zeros_like(param, memory_format=torch.preserve_format))
    if ctx.scaler and ckpt.get("scaler"):
        ctx.scaler.load_state_dict(ckpt["scaler"])
    if ctx.ema is not None and ckpt.get("ema"):
        ctx.ema.load_state_dict(ckpt["ema"])
        ctx.ema.decay = ctx.ema_decay  # the decay given now wins over the saved one
    ctx.state.load_state_dict(ckpt)
    ctx.state.nonfinite_streak = 0
    rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if len(rng) == ctx.world_size:
        utils.set_rng_state(rng[ctx.rank])  # each rank's dropout/mixup stream goes on exactly
    else:  # another number of processes: a new stream per rank, never the same one on two ranks
        utils.seed_everything(ctx.args.seed + ctx.rank + 1_000_003 * ctx.state.step)
    if ctx.rank == 0:
        repair_best(ckpt, ctx.args.output_dir)


# ---------------------------------------------------------------- the recipe

def main(args):
    utils.check_versions()
    validate_args(args)
    rank, world_size, device = utils.setup_distributed(args.device)
    stop = utils.StopRequest()
    say = print if rank == 0 else (lambda *a, **k: None)
    args.output_dir, args.run_name, followed_latest = utils.broadcast_object(choose_run_folder(args) if rank == 0
                                                                             else None)
    utils.fail_together(refuse_to_overwrite, args, rank)
    ctx = build_context(args, rank, world_size, device)
    ctx.followed_latest = followed_latest
    if rank == 0:
        point_latest_at(args.output_dir)
    ctx.stop = stop
    s, splits, net = ctx.state, ctx.splits, ctx.model_without_ddp

    resume_path = os.path.join(args.output_dir, "last.pth") if args.resume == "auto" else args.resume
    # rank 0 decides, so that every rank resumes or none does (multi-node runs need a shared --output-dir)
    if utils.broadcast_object(bool(resume_path) and os.path.isfile(resume_path)):
        utils.fail_together(resume, ctx, resume_path)
        say(f"resumed from {resume_path}: epoch {min(s.epoch + 1, args.epochs)}, step {s.step}"
            + (f", batch {s.batch_in_epoch} of the epoch" if s.batch_in_epoch else "")
            + (", its validation first" if s.validation_pending else ""))
        if s.epoch >= args.epochs and not s.validation_pending:
            say(f"this run is already complete ({s.epoch} of {args.epochs} epochs, best top-1 {s.best_top1:.2f}%): "
                f"nothing to do. Raise --epochs to train on, or choose a new --output-dir for a new run")
            return 0
    elif args.resume == "auto":
        say(f"--resume auto: no {resume_path} yet, starting fresh")

    model = net
    if utils.is_distributed():
        # DDP first, then torch.compile: dynamo then splits the graph at DDP's bucket boundaries (DDPOptimizer),
        # so gradient all-reduces overlap the backward pass (PyTorch's recommended order)
        cuda = device.type == "cuda"
        model = ctx.ddp = DistributedDataParallel(net, device_ids=[device.index] if cuda else None,
                                                  output_device=device.index if cuda else None)
    if args.compile:
        model = torch.compile(model)
    ctx.model = model

    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events a killed run wrote after its last checkpoint: no duplicated steps on resume
        ctx.writer = SummaryWriter(os.path.join(args.log_dir, run_name(args)), purge_step=s.step + 1)

    processes = (f"x{world_size} (torchrun, DDP, process group {utils.backend_name()})" if utils.is_distributed()
                 else "x1")
    say(f"device {device} {processes} | precision {ctx.precision} | channels_last {args.channels_last}"
        f" | MobileNetV3-{args.arch.capitalize()} {args.width_mult:g}: {ctx.num_params / 1e6:.2f}M params, "
        f"{ctx.madds / 1e6:.1f}M MAdds at {args.img_size}px")
    say(f"data {ctx.data_path} ({splits.layout}{', demo' if ctx.demo else ''}): {len(splits.train)} train / "
        f"{len(splits.val)} val images, {plural(len(splits.classes), 'class', 'classes')} | batch {args.batch_size} "
        f"x {args.accum_steps} x {world_size} = {args.batch_size * args.accum_steps * world_size} | "
        f"{ctx.steps_per_epoch} steps/epoch, {plural(args.epochs, 'epoch')}")
    if args.config:
        say(f"recipe {args.config}: " + " ".join(f"{key}={value}" for key, value in vars(args).items()
                                                   if key not in RESUME_QUIET_FLAGS | {"config"}))
    if args.lr_base_batch:
        global_batch = args.batch_size * args.accum_steps * world_size
        say(f"batch scaling: global batch {global_batch} for the {args.lr_base_batch} the recipe's lr belongs to: "
            f"lr {args.lr:g} -> {ctx.lr:.6g} ({args.lr_scaling}), EMA decay {args.ema_decay:g} -> "
            f"{ctx.ema_decay:.8g} per step")

    outcome = train_epochs(ctx)
    signals = [name for name in utils.gather_objects(stop.signal_name) if name]  # the signal may reach one rank
    if ctx.writer:
        if outcome == "done":  # one hparams entry per run, with its final figures
            final = {f"hparam/{k}": v for k, v in s.metrics.items() if isinstance(v, (int, float))}
            hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            ctx.writer.add_hparams(hparams, final or {"hparam/best_top1": s.best_top1}, run_name=".")
        ctx.writer.close()
    if outcome == "diverged":
        raise UserError(f"the loss was not finite for {MAX_NONFINITE_STREAK} steps in a row at step {s.step}: "
                        f"training stopped, last good checkpoint kept in {args.output_dir}. "
                        "Try a lower --lr or --clip-grad-norm")
    if outcome in ("stopped", "not saved"):
        why = f"{signals[0]} received" if signals else f"--max-steps {args.max_steps} reached"
        if outcome == "stopped":
            say(f"{why}: saved {os.path.join(args.output_dir, 'last.pth')} at step {s.step}. "
                f"Resume with the same command plus --resume auto")
        else:
            say(f"{why}: the weights were not saved (see the warning); the previous checkpoint is kept")
        return 0
    best = os.path.join(args.output_dir, "best.pth")
    data_flag = "" if ctx.demo else f" --data-path {args.data_path}"
    overflow = f", {s.scaler_skips} fp16 overflow steps skipped by the GradScaler" if ctx.scaler else ""
    say(f"done: best top-1 {s.best_top1:.2f}% ({s.best_weights} weights) after {plural(args.epochs, 'epoch')}, "
        f"{s.nonfinite_steps} non-finite steps skipped{overflow}")
    say(f"evaluate:    python evaluate.py {best}{data_flag}")
    say(f"tensorboard: tensorboard --logdir {args.log_dir}")
    return 0


def train_epochs(ctx):
    """Epochs, each followed by its validation and checkpoints, until the last one or a stop. A stop after an
    epoch's last step saves at once and leaves that epoch's validation to the resumed run (validation_pending),
    so a preempted job is saved within one step, whatever the validation set's size.
    Returns "done", "stopped", "not saved" (stopped, but the weights could not be saved) or "diverged"."""
    a, s = ctx.args, ctx.state
    while s.epoch < a.epochs or s.validation_pending:
        if a.max_steps and s.step >= a.max_steps and not s.validation_pending:
            return "stopped"  # resumed with --max-steps already reached: last.pth is this state
        if not s.validation_pending:
            status = train_one_epoch(ctx)
            if status == "diverged":
                return status
            if status == "done":
                report_epoch(ctx)
                s.validation_pending = s.epoch % a.eval_every == 0 or s.epoch == a.epochs
        signalled, saved = utils.any_rank(ctx.stop), None
        if s.validation_pending and not signalled:
            saved = validate_and_track_best(ctx)  # which saves; None when a signal cut it short
            signalled = saved is None
        if saved is None:  # mid-epoch, no validation due, or a signal (the validation waits for the resumed run)
            saved = save(ctx)
        if signalled or (a.max_steps and s.step >= a.max_steps):
            return "stopped" if saved else "not saved"
    return "done"


def report_epoch(ctx):
    a, t, s = ctx.args, ctx.last_train, ctx.state
    if ctx.rank == 0:
        print(f"epoch {s.epoch}/{a.epochs}: train loss {t['loss']:.4f} top-1 {t['top1']:.2f}% "
              f"({t['time']:.1f}s, {t['images'] / max(t['time'], 1e-9):.0f} img/s)")
    if ctx.writer:
        ctx.writer.add_scalar("epoch/train_loss", t["loss"], s.step)
        ctx.writer.add_scalar("epoch/train_top1", t["top1"], s.step)
        ctx.writer.add_scalar("epoch/time_sec", t["time"], s.step)
    skipped = ctx.train_set.skipped + ctx.val_set.skipped
    if skipped and ctx.rank == 0:
        print(f"warning: {plural(skipped, 'unreadable image')} skipped so far (see the lines above)")


def validate_and_track_best(ctx):
    """Validate the raw and the EMA weights after the epoch just finished, then save last.pth (and best.pth on a
    new best). Returns whether the checkpoints were written, or None, having saved nothing, when a stop request
    cut the validation short."""
    a, s, net = ctx.args, ctx.state, ctx.model_without_ddp
    show = ctx.rank == 0
    # DDP syncs BN statistics only at each forward: give every rank rank 0's (the ones saved) before scoring
    utils.broadcast_tensors(list(net.buffers()) + (list(ctx.ema.shadow_params) if ctx.ema else []))
    loader = UntilStopped(ctx.val_loader, ctx.stop)
    results = {"raw": evaluate(net, loader, ctx.device, ctx.autocast, a.norm, ctx.channels_last, show_progress=show)}
    if ctx.ema is not None and not utils.any_rank(ctx.stop):
        with ctx.ema.average_parameters():
            results["ema"] = evaluate(net, loader, ctx.device, ctx.autocast, a.norm, ctx.channels_last,
                                      desc="val (ema)", show_progress=show)
    net.train()
    if utils.any_rank(ctx.stop):
        return None
    trivial_top5 = len(ctx.classes) <= 5
    line = []
    for name, r in results.items():
        prefix = "val" if name == "raw" else "val_ema"
        line.append(f"{prefix} loss {r['loss']:.4f} top-1 {r['top1']:.2f}%"
                    + ("" if trivial_top5 else f" top-5 {r['top5']:.2f}%"))
        if ctx.writer:
            for key in ("loss", "top1", "top5"):
                ctx.writer.add_scalar(f"{prefix}/{key}", r[key], s.step)
    which = max(results, key=lambda k: (results[k]["top1"], k == "ema"))  # ties go to the EMA
    top1 = results[which]["top1"]
    is_best = top1 > s.best_top1 and can_save(ctx)  # best_top1 only ever describes a best.pth on disk
    previous_best = (s.best_top1, s.best_weights, s.best_epoch)
    if is_best:
        s.best_top1, s.best_weights, s.best_epoch = top1, which, s.epoch
    s.metrics = {"val_top1": results["raw"]["top1"], "val_top5": results["raw"]["top5"],
                 "val_loss": results["raw"]["loss"], "val_images": results["raw"]["images"], "epoch": s.epoch,
                 "best_top1": s.best_top1}
    if "ema" in results:
        s.metrics.update({"val_ema_top1": results["ema"]["top1"], "val_ema_top5": results["ema"]["top5"],
                          "val_ema_loss": results["ema"]["loss"]})
    s.validation_pending = False
    if ctx.rank == 0:
        print("  " + " | ".join(line) + (f"  * new best ({which})" if is_best else ""))
    saved = save(ctx, also_best=is_best)
    if not saved and is_best:
        s.best_top1, s.best_weights, s.best_epoch = previous_best
    return saved


class UntilStopped:
    """A validation loader that ends early once a stop is requested (that pass is then discarded): a preempted
    job saves within one batch of validation. Every rank agrees on the stop after the pass (any_rank)."""

    def __init__(self, loader, stop):
        self.loader, self.stop = loader, stop

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            if self.stop:
                return


def plural(count, word, words=None):
    return f"{count} {word if count == 1 else words or word + 's'}"


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, parse_args()))
