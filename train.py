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
import itertools
import math
import pickle
import re
import sys
import time
import typing

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
# unscaled, which is divergence, not calibration (count_skipped_update)
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
    def check(names, ok, rule):
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):  # `not ok` also catches NaN
                raise UserError(f"--{name.replace('_', '-')} must be {rule} (got {value})")
    check(("batch_size", "accum_steps", "eval_every", "print_freq", "lr_step_size", "lr_base_batch", "epochs"),
          lambda v: v >= 1, "at least 1")
    check(("workers", "keep_checkpoints", "max_steps", "weight_decay", "label_smoothing", "mixup_alpha",
           "cutmix_alpha", "clip_grad_norm", "warmup_epochs", "random_erase"), lambda v: v >= 0, "0 or more")
    check(("img_size", "val_crop_size", "val_resize_size"), lambda v: v >= 32, "at least 32 pixels")
    check(("lr", "width_mult", "kd_temperature"), lambda v: math.isfinite(v) and v > 0, "a positive number")
    check(("val_split_fraction", "ema_decay", "label_smoothing", "dropout"), lambda v: 0 <= v < 1, "in [0, 1)")
    check(("kd_alpha", "random_erase"), lambda v: 0 <= v <= 1, "in [0, 1]")
    check(("min_scale",), lambda v: 0 < v <= 1, "in (0, 1]")
    if args.decode_on == "device" and (args.auto_augment or args.random_erase):
        raise UserError("--decode-on device does the crop and flip only: drop --auto-augment and --random-erase, "
                        "or decode on the workers")
    check_paths(args)


def check_paths(args):
    """The files and folders the flags name exist (and are files or folders, as each flag needs)."""
    if args.data_path is not None and not os.path.exists(args.data_path):
        raise UserError(f"--data-path {args.data_path} does not exist")
    if args.data_path is not None and not os.path.isdir(args.data_path):
        raise UserError(f"--data-path {args.data_path} is not a folder")
    if args.resume not in (None, "auto") and os.path.isdir(args.resume):
        raise UserError(f"--resume {args.resume} is a folder: give the checkpoint file in it (e.g. last.pth)")
    for flag, path, words in (("--resume", args.resume, ("auto",)), ("--pretrained", args.pretrained,
                              ("torchvision",)), ("--teacher", args.teacher, ())):
        if path is not None and path not in words and not os.path.isfile(path):
            raise UserError(f"{flag} file not found: {path}")


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
    defaults = {key: recipe_value(path, key, value, actions.get(key)) for key, value in recipe.items()}
    if "global_batch" in meta:
        defaults.setdefault("lr_base_batch", meta["global_batch"])
    if "lr_scaling" in meta:
        if meta["lr_scaling"] not in ("linear", "sqrt", "none"):
            raise UserError(f"--config {path}: [recipe] lr_scaling must be linear, sqrt or none")
        defaults.setdefault("lr_scaling", meta["lr_scaling"])
    return defaults


def recipe_value(path, key, value, action):
    """A recipe's value for the flag of `action`, checked as the command line would check it."""
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
    return float(value) if wanted is float else value


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
    # foreach kernels are the fast path on CPU and GPU; fused Adam/AdamW is faster still on CUDA. (On the CPU the
    # fused step alone was 2.5x faster on an AVX-512 machine and equal on an AVX2 one, ~1% of a training step
    # either way, and the CPU kernel trusts the state's memory layout to match the parameter's.)
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
    return ForeachEMA(list(model.parameters()) + float_buffers(model), decay=decay)


def float_buffers(model):
    """BatchNorm's running means and variances (its int step counters left out)."""
    return [b for b in model.buffers() if b.is_floating_point()]


class ForeachEMA(ExponentialMovingAverage):
    """torch-ema, with its update as one foreach lerp over all the tensors instead of a Python loop of three ops
    per tensor: ~3x faster on the CPU (benchmark.py: 1.6 vs 5.0 ms), and on CUDA ~800 fewer kernel launches. The same
    decay and warm-up, the same state, checkpoints and methods."""

    def update(self, parameters=None):
        parameters = self._get_parameters(parameters)
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        with torch.no_grad():  # shadow += (1 - decay) * (tensor - shadow), as torch-ema's loop computes it
            torch._foreach_lerp_(self.shadow_params, [p.detach() for p in parameters], 1.0 - decay)


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


@dataclasses.dataclass
class Data:
    """A run's dataset, as this rank reads it."""
    path: str                        # the data folder (the demo's when --data-path is omitted)
    splits: dataset.DataSplits       # layout, classes and the train/val file indexes
    train_set: torch.utils.data.Dataset
    val_set: dataset.ValidationImageFiles
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader


@dataclasses.dataclass
class Run:
    """What a run is built from, built once (build_run; benchmark.py builds one around a bare model with
    build_trainer). No field is reassigned afterwards except `writer`, which main opens once it knows the step the
    run continues from. The run's progress is not here: it is the TrainState, which is what a checkpoint saves."""
    config: argparse.Namespace       # the command line with every default resolved (resolve_config); never changed
    device: torch.device
    net: nn.Module                   # the model itself: what is saved, validated and resumed
    model: nn.Module                 # what trains: net, or DDP(net), maybe compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    autocast: object                 # a function returning the autocast context (utils.precision_for)
    precision: str                   # its name, for the start-up line
    ema: ForeachEMA | None
    criterion: nn.Module
    lr: float                        # --lr and --ema-decay for this run's global batch (scaled_to_global_batch)
    ema_decay: float
    steps_per_epoch: int
    ddp: DistributedDataParallel | None = None
    teacher: nn.Module | None = None
    mixup: object = None             # dataset.make_mixup_cutmix, or None
    data: Data | None = None         # None for benchmark.py's model-only step
    rank: int = 0
    world_size: int = 1
    stop: utils.StopRequest | None = None
    writer: object = None            # TensorBoard's SummaryWriter on rank 0
    show_progress: bool = True
    # derived from net, for the update step: its parameters, its float buffers and a copy to take them back
    params: list = dataclasses.field(init=False, repr=False)
    bn_buffers: list = dataclasses.field(init=False, repr=False)
    bn_backup: list = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.params = list(self.net.parameters())
        self.bn_buffers = float_buffers(self.net)
        self.bn_backup = [b.detach().clone() for b in self.bn_buffers]


def resolve_config(args, device, output_dir=None, run_name=None):
    """A new namespace: args with the defaults that depend on the data (demo or not), the device and the run
    folder filled in, as --help says. args itself stays as parsed."""
    defaults = DEMO_DEFAULTS if args.data_path is None else IMAGENET_DEFAULTS
    img_size = args.img_size or defaults["img_size"]
    val_crop_size = args.val_crop_size or img_size
    output_dir = output_dir or args.output_dir
    return argparse.Namespace(**{
        **vars(args),
        "img_size": img_size,
        "epochs": args.epochs or defaults["epochs"],
        "val_crop_size": val_crop_size,
        "val_resize_size": args.val_resize_size or round(val_crop_size / 0.875),
        # CPU bf16 autocast: 0.4-0.85x of fp32, even with AMX-BF16 (measured)
        "amp": device.type != "cpu" if args.amp is None else args.amp,
        # faster on CUDA and, measured with benchmark.py, 1.24x on the CPU too
        "channels_last": device.type in ("cuda", "cpu") if args.channels_last is None else args.channels_last,
        "workers": utils.default_workers(device) if args.workers is None else args.workers,
        "output_dir": output_dir,
        # one folder per run: the TensorBoard run is named after the checkpoint folder
        "run_name": run_name or args.run_name or (os.path.basename(os.path.abspath(output_dir)) if output_dir
                                                  else None),
    })


def prepare_output(config, rank):
    """Checkpoint and TensorBoard folders, checked at start (rank 0 writes both), and the demo data."""
    if rank == 0:
        utils.prepare_output_dir(config.output_dir)
        utils.prepare_log_dir(os.path.join(config.log_dir, config.run_name))
    if config.data_path is None and rank == 0:
        from tools.demo_data import make_demo_dataset  # the demo run alone needs it
        make_demo_dataset(DEMO_DIR)


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


def refuse_to_overwrite(config, rank):
    """A fresh start (no --resume) never destroys another run's checkpoints or TensorBoard events, unless
    --overwrite asks for it: then they are deleted first (by rank 0)."""
    if config.resume is not None or rank != 0:
        return
    log_folder = os.path.join(config.log_dir, config.run_name)
    found = []
    if os.path.isdir(config.output_dir):
        found += [os.path.join(config.output_dir, name) for name in sorted(os.listdir(config.output_dir))
                  if RUN_FILES.fullmatch(name)]
    if os.path.isdir(log_folder):
        found += [os.path.join(log_folder, name) for name in sorted(os.listdir(log_folder)) if "tfevents" in name]
    if not found:
        return
    if not config.overwrite:
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


def build_data(config, rank, world_size, device):
    """The datasets and loaders of this rank."""
    path = config.data_path or DEMO_DIR
    splits = dataset.find_dataset(path)
    if splits.val is not None and config.val_split_fraction:
        raise UserError(f"--val-split-fraction: {path} has a validation split already ({splits.layout})")
    if splits.val is None and config.val_split_fraction:
        train, val = dataset.split_validation(splits.train, config.val_split_fraction, config.seed)
        splits = dataclasses.replace(splits, train=train, val=val, layout=splits.layout + (
            f"; validation: {config.val_split_fraction:g} of each training class, held out"))
    if splits.val is None:
        raise UserError(f"no validation split found under {path}: add a val/ folder (see README: accepted "
                        "layouts) or hold out part of the training images with --val-split-fraction 0.05")
    if config.decode_on == "device":
        dataset.EncodedImageFiles.check_device(device)
        train_set = dataset.EncodedImageFiles(splits.train, config.img_size, config.min_scale,
                                              strict=config.strict_data)
    else:
        train_set = dataset.ImageFiles(splits.train, dataset.train_transform(
            config.img_size, config.auto_augment, config.random_erase, config.norm, config.min_scale),
            strict=config.strict_data)
    # unreadable validation images are left out and named, never replaced by a neighbour (which would count twice)
    val_set = dataset.ValidationImageFiles(splits.val, dataset.val_transform(config.val_resize_size,
                                           config.val_crop_size), strict=config.strict_data)
    train_sampler = dataset.EpochSampler(len(train_set), shuffle=True, seed=config.seed, num_replicas=world_size,
                                         rank=rank, drop_last=True)
    val_sampler = dataset.EpochSampler(len(val_set), shuffle=False, num_replicas=world_size, rank=rank)
    # the workers keep this process's CPU priority: a lower one starved them on a busy machine (docs/performance.md)
    pin = device.type == "cuda"
    train_loader = dataset.build_loader(train_set, train_sampler, config.batch_size, config.workers, train=True,
                                        pin_memory=pin and config.decode_on == "workers")
    val_loader = dataset.build_loader(val_set, val_sampler, config.batch_size, config.workers, train=False,
                                      pin_memory=pin)
    train_sampler.set_epoch(0)
    if len(train_loader) < config.accum_steps:
        raise UserError(f"the training split has {len(train_set)} images: too few for one step of "
                        f"{config.batch_size} x {config.accum_steps} x {world_size} processes; lower --batch-size")
    return Data(path, splits, train_set, val_set, train_loader, val_loader)


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


def build_model(config, num_classes, device, world_size):
    """The network on its device, with --pretrained weights, SyncBatchNorm and channels_last when asked."""
    net = model_lib.build_model(config.arch, config.width_mult, num_classes, dropout=config.dropout,
                                bn_momentum=config.bn_momentum)
    if config.pretrained:
        try:
            model_lib.load_pretrained(net, pretrained_state(config.pretrained))
        except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            reason = "not a readable state dict" if isinstance(e, pickle.UnpicklingError) else e
            raise UserError(f"--pretrained {config.pretrained}: {reason}") from None
    if config.sync_bn and world_size > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU)")
    if config.sync_bn and world_size > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return place_model(net, config, device)


def place_model(net, config, device):
    """The network on the training device, in the memory format --channels-last asks for."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if config.channels_last else net


def build_run(config, rank=0, world_size=1, device=torch.device("cpu"), stop=None):
    """Data, model and what trains it, for this rank; nothing runs yet. Every rank-local failure here reaches
    every rank (utils.fail_together), so no rank waits for a peer that stopped."""
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training shapes: pick the fastest convolution algorithms
    utils.seed_everything(config.seed + rank)
    utils.fail_together(prepare_output, config, rank)
    data = utils.fail_together(build_data, config, rank, world_size, device)
    classes = data.splits.classes
    num_classes = config.num_classes or len(classes)
    if num_classes < len(classes):
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(classes)} classes in the data")
    net = utils.fail_together(build_model, config, num_classes, device, world_size)
    teacher = utils.fail_together(load_teacher, config, classes, num_classes, device) if config.teacher else None
    return build_trainer(config, net, device, len(data.train_loader) // config.accum_steps, data=data,
                         teacher=teacher, mixup=dataset.make_mixup_cutmix(config.mixup_alpha, config.cutmix_alpha,
                                                                          num_classes),
                         rank=rank, world_size=world_size, stop=stop, show_progress=rank == 0)


def build_trainer(config, net, device, steps_per_epoch, world_size=None, **parts):
    """A Run around a network already on its device: optimizer, EMA, precision, loss, and the DDP and
    torch.compile wrappers; `parts` are the other fields of Run (data, teacher, mixup, rank, stop, ...).
    benchmark.py times the real update step on a Run built here."""
    if world_size is None:  # the process group's, when there is one: DDP, the lr and the EMA decay agree
        world_size = torch.distributed.get_world_size() if utils.is_distributed() else 1
    lr, ema_decay = scaled_to_global_batch(config, world_size)
    autocast, scaler, precision = utils.precision_for(device, config.amp, config.amp_dtype)
    ddp = None
    if utils.is_distributed():
        # DDP first, then torch.compile: dynamo then splits the graph at DDP's bucket boundaries (DDPOptimizer),
        # so gradient all-reduces overlap the backward pass (PyTorch's recommended order)
        cuda = device.type == "cuda"
        ddp = DistributedDataParallel(net, device_ids=[device.index] if cuda else None,
                                      output_device=device.index if cuda else None)
    model = net if ddp is None else ddp
    if config.compile:
        model = torch.compile(model)
    return Run(config=config, device=device, net=net, model=model, ddp=ddp, world_size=world_size,
               optimizer=make_optimizer(net, config, device), scaler=scaler, autocast=autocast, precision=precision,
               ema=make_ema(net, ema_decay), criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
               lr=lr, ema_decay=ema_decay, steps_per_epoch=steps_per_epoch, **parts)


# ---------------------------------------------------------------- the loop

class Update(typing.NamedTuple):
    sums: torch.Tensor  # of its micro-batches, on the device: loss x images, top-1 hits, images, KD term x images
    progress: float     # the point of training, in epochs, its learning rate was taken at


def train_update(run, state, micro_batches):
    """One optimizer update from `micro_batches`, the --accum-steps (images, targets) batches it is made of,
    normalized and on the device. Owns the learning rate, the BN-momentum warm-up, DDP's no_sync, the step, the
    handling of a non-finite update and the EMA. Returns its figures as device tensors (no host sync)."""
    cfg = run.config
    torch._foreach_copy_(run.bn_backup, run.bn_buffers)  # to take back if this update is not finite
    progress = state.progress(run.steps_per_epoch, cfg.accum_steps)
    set_hyperparameters(run.optimizer, cfg, run.lr * lr_factor(progress, cfg, run.steps_per_epoch))
    if state.step * cfg.bn_momentum <= 10 and not cfg.compile:  # a changing float would recompile every step
        warm_up_bn_momentum(run.net, state.step, cfg.bn_momentum)
    sums = torch.zeros(4, dtype=utils.sum_dtype(run.device), device=run.device)
    count = 0
    for count, (images, targets) in enumerate(micro_batches, 1):
        kd_terms = []
        criterion = run.criterion if run.teacher is None else distillation_criterion(run, images, kd_terms)
        no_sync = run.ddp is not None and count < cfg.accum_steps  # all-reduce the gradients once, at the end
        with run.ddp.no_sync() if no_sync else contextlib.nullcontext():
            logits, loss = train_step(run.model, images, targets, criterion, run.scaler, run.autocast,
                                      cfg.accum_steps)
        images_in_batch = targets.shape[0]
        sums[0] += loss.to(sums.dtype) * images_in_batch  # a non-finite loss makes this sum non-finite too
        sums[1] += utils.correct_topk(logits, targets, (1,))[0]
        sums[2] += images_in_batch
        if kd_terms:
            sums[3] += kd_terms[0].to(sums.dtype) * images_in_batch
    if count != cfg.accum_steps:  # a short update would step on partial gradients (and skip DDP's all-reduce)
        raise ValueError(f"train_update got {count} micro-batches for --accum-steps {cfg.accum_steps}")
    applied = optimizer_step(run.optimizer, run.scaler, run.params, cfg.clip_grad_norm)
    count_skipped_update(run, state, applied, loss_finite=torch.isfinite(sums[0]))
    if run.ema is not None:
        run.ema.update()
    state.step += 1
    return Update(sums, progress)


def count_skipped_update(run, state, applied, loss_finite):
    """An update optimizer_step did not apply is either a GradScaler overflow skip (the loss finite on every rank
    and the scale still >= MIN_LOSS_SCALE: routine calibration) or a non-finite update, whose forward passes
    already moved the BN running statistics (maybe to NaN): those are taken back."""
    if applied:
        state.nonfinite_streak = 0
    elif run.scaler and run.scaler.get_scale() >= MIN_LOSS_SCALE and not utils.any_rank(not bool(loss_finite)):
        state.scaler_skips += 1  # fp16 gradients overflowed: the scaler lowers its scale, as designed
        state.nonfinite_streak = 0  # and a finite loss ends a streak of non-finite ones
    else:
        torch._foreach_copy_(run.bn_buffers, run.bn_backup)
        state.nonfinite_steps += 1
        state.nonfinite_streak += 1


def distillation_criterion(run, images, kd_terms):
    """The loss of a distilled micro-batch: the teacher sees the same augmented (and mixed) batch under the same
    autocast, without gradients; the KL term is appended to kd_terms, for TensorBoard."""
    with torch.no_grad(), run.autocast():
        teacher_logits = run.teacher(images)

    def criterion(logits, targets):
        loss, kd = distillation_loss(logits, targets, run.criterion, teacher_logits, run.config.kd_alpha,
                                     run.config.kd_temperature)
        kd_terms.append(kd.detach())
        return loss
    return criterion


def device_batches(run, state, window):
    """The training loader's batches on the device, normalized (and mixed, with --mixup/--cutmix-alpha), the wait
    for each added to window.data_wait. The first batch of a run also goes to TensorBoard, as images."""
    cfg = run.config
    mean, std = dataset.NORMS[cfg.norm]
    log_images = run.writer is not None and state.step == 0 and state.batch_in_epoch == 0
    fetch_start = time.perf_counter()
    for images, targets in run.data.train_loader:
        window.data_wait += time.perf_counter() - fetch_start
        images, targets = run.data.train_set.batch_to(run.device, images, targets)
        images = dataset.normalize_batch(images, mean, std, cfg.channels_last)
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        if log_images:
            log_augmented_images(run.writer, images, mean, std)
            log_images = False
        yield images, targets
        fetch_start = time.perf_counter()


def train_one_epoch(run, state, time_first_update=False):
    """Train the epoch state.epoch from micro-batch state.batch_in_epoch (non-zero after a mid-epoch resume) to its
    end. Returns (status, the epoch's training figures); status is "done", "stopped" (a signal or --max-steps
    inside the epoch; the caller saves) or "diverged"."""
    cfg = run.config
    batches = run.steps_per_epoch * cfg.accum_steps  # micro-batches left over by --accum-steps are not loaded
    run.data.train_loader.sampler.set_epoch(state.epoch, skip_batches=state.batch_in_epoch, batch_size=cfg.batch_size)
    window, epoch = utils.MetricMeter(run.device), utils.MetricMeter(run.device)
    micro_batches = device_batches(run, state, window)
    bar = tqdm(total=batches, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not run.show_progress, dynamic_ncols=True, leave=False)
    run.model.train()
    status = "done"
    while state.batch_in_epoch < batches:
        start, waited = time.perf_counter(), window.data_wait
        update = train_update(run, state, itertools.islice(micro_batches, cfg.accum_steps))
        state.batch_in_epoch += cfg.accum_steps
        window.add(update.sums)
        epoch.add(update.sums)
        bar.update(cfg.accum_steps)
        if time_first_update:  # --compile: the first update of this process compiles the model
            log_compile_time(run, state, update, start, window.data_wait - waited)
            time_first_update = False
        if state.step % cfg.print_freq == 0:
            log_training(run, state, window, update.progress, bar)
            window.reset()
        if state.nonfinite_streak >= MAX_NONFINITE_STREAK:
            status = "diverged"
            break
        # every rank must stop at the same step, whichever of them got the signal
        if utils.any_rank(run.stop) or (cfg.max_steps and state.step >= cfg.max_steps):
            status = "stopped" if state.batch_in_epoch < batches else "done"
            break
    bar.close()
    utils.all_reduce_sum(epoch.sums)
    if status == "done":
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return status, epoch.read()


def log_compile_time(run, state, update, start, data_wait):
    update.sums.sum().item()  # wait for the device, once
    seconds = time.perf_counter() - start - data_wait
    if run.rank == 0:
        tqdm.write(f"torch.compile: the first step took {seconds:.1f}s (compiling)")
    if run.writer:
        run.writer.add_scalar("perf/compile_first_step_sec", seconds, state.step)


def log_training(run, state, window, progress, bar):
    """The training figures of the last --print-freq steps: progress bar and TensorBoard (one host sync)."""
    figures = window.read()
    lr = run.optimizer.param_groups[0]["lr"]
    speed = figures["images"] * run.world_size / max(figures["time"], 1e-9)
    bar.set_postfix(loss=f"{figures['loss']:.3f}", top1=f"{figures['top1']:.1f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
    w = run.writer
    if w is None:
        return
    w.add_scalar("train/loss", figures["loss"], state.step)
    w.add_scalar("train/top1", figures["top1"], state.step)
    w.add_scalar("train/lr", lr, state.step)
    w.add_scalar("train/epoch", progress, state.step)  # where the last update's lr was taken
    w.add_scalar("train/images_per_sec", speed, state.step)
    w.add_scalar("train/data_wait_fraction", window.data_wait / max(figures["time"], 1e-9), state.step)
    w.add_scalar("train/nonfinite_steps", state.nonfinite_steps, state.step)
    if run.teacher is not None:
        w.add_scalar("train/kd_loss", figures["kd_loss"], state.step)
    if run.scaler is not None:
        w.add_scalar("train/scaler_skips", state.scaler_skips, state.step)
        w.add_scalar("train/loss_scale", run.scaler.get_scale(), state.step)
    if run.device.type == "cuda":
        w.add_scalar("train/gpu_memory_mb", utils.peak_memory_mb(run.device), state.step)


def log_augmented_images(writer, images, mean, std):
    import torchvision
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    grid = torchvision.utils.make_grid((images[:32].float() * std + mean).clamp(0, 1), nrow=8)
    writer.add_image("train/augmented_batch", grid.cpu(), 0)


def train_epochs(run, state):
    """Epochs, each followed by its validation and checkpoints, until the last one or a stop. A stop after an
    epoch's last step saves at once and leaves that epoch's validation to the resumed run (validation_pending),
    so a preempted job is saved within one step, whatever the validation set's size.
    Returns "done", "stopped", "not saved" (stopped, but the weights could not be saved) or "diverged"."""
    cfg = run.config
    time_first_update = cfg.compile
    while state.epoch < cfg.epochs or state.validation_pending:
        if cfg.max_steps and state.step >= cfg.max_steps and not state.validation_pending:
            return "stopped"  # resumed with --max-steps already reached: last.pth is this state
        if not state.validation_pending:
            status, figures = train_one_epoch(run, state, time_first_update)
            time_first_update = False
            if status == "diverged":
                return status
            if status == "done":
                report_epoch(run, state, figures)
                state.validation_pending = state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs
        signalled, saved = utils.any_rank(run.stop), None
        if state.validation_pending and not signalled:
            saved = validate_and_track_best(run, state)  # which saves; None when a signal cut it short
            signalled = saved is None
        if saved is None:  # mid-epoch, no validation due, or a signal (the validation waits for the resumed run)
            saved = save(run, state)
        if signalled or (cfg.max_steps and state.step >= cfg.max_steps):
            return "stopped" if saved else "not saved"
    return "done"


def report_epoch(run, state, figures):
    cfg, seconds = run.config, figures["time"]
    announce(run, f"epoch {state.epoch}/{cfg.epochs}: train loss {figures['loss']:.4f} top-1 {figures['top1']:.2f}% "
                  f"({seconds:.1f}s, {figures['images'] / max(seconds, 1e-9):.0f} img/s)")
    if run.writer:
        run.writer.add_scalar("epoch/train_loss", figures["loss"], state.step)
        run.writer.add_scalar("epoch/train_top1", figures["top1"], state.step)
        run.writer.add_scalar("epoch/time_sec", seconds, state.step)
    skipped = run.data.train_set.skipped + run.data.val_set.skipped
    if skipped:
        announce(run, f"warning: {plural(skipped, 'unreadable image')} skipped so far (see the lines above)")


def validate(run):
    """{"raw": figures, "ema": figures} of the raw and the EMA weights on the validation split, or None when a stop
    request cut the validation short (every rank agrees)."""
    cfg, net = run.config, run.net
    # DDP syncs BN statistics only at each forward: give every rank rank 0's (the ones saved) before scoring
    utils.broadcast_tensors(list(net.buffers()) + (list(run.ema.shadow_params) if run.ema else []))
    loader = UntilStopped(run.data.val_loader, run.stop)
    results = {"raw": evaluate(net, loader, run.device, run.autocast, cfg.norm, cfg.channels_last,
                               show_progress=run.show_progress)}
    if run.ema is not None and not utils.any_rank(run.stop):
        with run.ema.average_parameters():
            results["ema"] = evaluate(net, loader, run.device, run.autocast, cfg.norm, cfg.channels_last,
                                      desc="val (ema)", show_progress=run.show_progress)
    net.train()
    return None if utils.any_rank(run.stop) else results


def validate_and_track_best(run, state):
    """Validate the raw and the EMA weights after the epoch just finished, then save last.pth (and best.pth on a
    new best). Returns whether the checkpoints were written, or None, having saved nothing, when a stop request
    cut the validation short."""
    results = validate(run)
    if results is None:
        return None
    which = max(results, key=lambda k: (results[k]["top1"], k == "ema"))  # ties go to the EMA
    top1 = results[which]["top1"]
    is_best = top1 > state.best_top1 and can_save(run, state)  # best_top1 only ever describes a best.pth on disk
    previous_best = (state.best_top1, state.best_weights, state.best_epoch)
    if is_best:
        state.best_top1, state.best_weights, state.best_epoch = top1, which, state.epoch
    raw = results["raw"]
    state.metrics = {"val_top1": raw["top1"], "val_top5": raw["top5"], "val_loss": raw["loss"],
                     "val_images": raw["images"], "epoch": state.epoch, "best_top1": state.best_top1}
    if "ema" in results:
        ema = results["ema"]
        state.metrics.update({"val_ema_top1": ema["top1"], "val_ema_top5": ema["top5"], "val_ema_loss": ema["loss"]})
    state.validation_pending = False
    log_validation(run, state, results, which if is_best else None)
    saved = save(run, state, also_best=is_best)
    if not saved and is_best:
        state.best_top1, state.best_weights, state.best_epoch = previous_best
    return saved


def log_validation(run, state, results, new_best):
    trivial_top5 = len(run.data.splits.classes) <= 5
    line = []
    for name, r in results.items():
        prefix = "val" if name == "raw" else "val_ema"
        line.append(f"{prefix} loss {r['loss']:.4f} top-1 {r['top1']:.2f}%"
                    + ("" if trivial_top5 else f" top-5 {r['top5']:.2f}%"))
        if run.writer:
            for key in ("loss", "top1", "top5"):
                run.writer.add_scalar(f"{prefix}/{key}", r[key], state.step)
    announce(run, "  " + " | ".join(line) + (f"  * new best ({new_best})" if new_best else ""))


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


# ---------------------------------------------------------------- checkpoints

def checkpoint_state(run, state, rng_states):
    cfg, splits = run.config, run.data.splits
    return {
        "format": utils.CHECKPOINT_FORMAT,
        **state.state_dict(),            # epoch, batch_in_epoch, step, best_top1, ... (TrainState)
        "model": run.net.state_dict(),
        "model_config": run.net.config.as_dict(),
        "ema": ema_checkpoint_state(run.ema) if run.ema else None,
        "ema_model": ema_state_dict(run.net, run.ema) if run.ema else None,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "rng": rng_states,               # one per rank: each rank's dropout/mixup stream resumes exactly
        "world_size": run.world_size,
        "steps_per_epoch": run.steps_per_epoch,
        "data_path": run.data.path,
        "args": dict(vars(cfg)),
        "classes": list(splits.classes),
        "class_names": list(splits.class_names),
        "norm": cfg.norm,
        "val_resize_size": cfg.val_resize_size,
        "val_crop_size": cfg.val_crop_size,
    }


def can_save(run, state):
    """A checkpoint is never written in a non-finite streak or with non-finite weights (rank 0 decides)."""
    ok = state.nonfinite_streak == 0 and utils.check_finite(run.net)
    return utils.broadcast_object(ok)


def save(run, state, also_best=False):
    """Write last.pth, then best.pth with the same state when also_best. Every rank calls it (the RNG states
    are gathered; a failed write on rank 0 ends every rank). Returns whether the checkpoint was written.

    last.pth goes first: it records best_top1 and best_epoch, so a crash between the two writes leaves a
    last.pth from which resume() rewrites best.pth (repair_best); the other order would let a resumed run
    replace the new best.pth by a worse model."""
    rng_states = utils.gather_objects(utils.get_rng_state())
    if not can_save(run, state):
        why = "the last steps had a non-finite loss" if state.nonfinite_streak else "weights are not finite"
        announce(run, f"warning: {why}; keeping the previous checkpoints", file=sys.stderr)
        return False
    folder = run.config.output_dir

    def write():
        if run.rank != 0:
            return
        ckpt = checkpoint_state(run, state, rng_states)
        utils.save_checkpoint(ckpt, os.path.join(folder, "last.pth"))
        if also_best:
            utils.save_checkpoint(ckpt, os.path.join(folder, "best.pth"))
            utils.save_checkpoint(weights_file(ckpt), os.path.join(folder, "best_weights.pth"))
        if run.config.keep_checkpoints and not state.batch_in_epoch and not state.validation_pending:
            keep_epoch_weights(ckpt, folder, run.config.keep_checkpoints)
    utils.fail_together(write)
    return True


def weights_file(ckpt):
    """best_weights.pth: only the best weights (EMA or raw) with what evaluate.py, export.py and --pretrained need
    to use them: a few MB, where best.pth also holds the other weights, the EMA's and the optimizer's state."""
    keep = ("model_config", "classes", "class_names", "norm", "val_resize_size", "val_crop_size", "best_top1",
            "epoch", "data_path")
    weights = ckpt["best_weights"]
    return {"format": utils.WEIGHTS_FORMAT, "weights": weights, **{key: ckpt.get(key) for key in keep},
            "model": ckpt["ema_model"] if weights == "ema" else ckpt["model"], "args": ckpt["args"]}


def keep_epoch_weights(ckpt, output_dir, keep):
    """epoch_NNNN.pth: the raw weights after each epoch, the last `keep` of them (for checkpoint averaging)."""
    utils.save_checkpoint({**weights_file(ckpt), "weights": "raw", "model": ckpt["model"]},
                          os.path.join(output_dir, f"epoch_{ckpt['epoch']:04d}.pth"))
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


def check_resume_flags(run, ckpt, path, followed_latest):
    """Refuse what cannot continue exactly; list every other flag that changed (they are applied)."""
    cfg, saved = run.config, ckpt.get("args", {})
    if saved.get("opt", cfg.opt) != cfg.opt:
        raise utils.CheckpointError(f"{path} was trained with --opt {saved['opt']}; resume with the same --opt "
                                    f"(to start a new run from its weights, use --pretrained with its weights)")
    if ckpt["batch_in_epoch"]:
        now = (cfg.batch_size, cfg.accum_steps, run.world_size, cfg.seed, run.steps_per_epoch)
        then = (saved.get("batch_size"), saved.get("accum_steps"), ckpt.get("world_size", 1), saved.get("seed", 0),
                ckpt.get("steps_per_epoch", run.steps_per_epoch))
        if now != then:
            raise utils.CheckpointError(
                f"{path} stopped inside an epoch with batch size, accum steps, processes, seed and steps an epoch "
                f"{then}; resume it with the same (this run has {now}: did the training folder change?), or "
                "resume from a checkpoint written at the end of an epoch")
    changed = [f"--{key.replace('_', '-')} {saved[key]} -> {value}" for key, value in sorted(vars(cfg).items())
               if key in saved and saved[key] != value and key not in RESUME_QUIET_FLAGS]
    other_run = [change for change in changed if not change.startswith("--epochs ")]  # more epochs: same run
    if other_run and followed_latest:  # --resume auto found the latest run by itself
        raise utils.CheckpointError(
            f"--resume auto would continue the latest run, {os.path.dirname(path)}, which was started with other "
            f"flags ({', '.join(other_run[:3])}{', ...' if len(other_run) > 3 else ''}): give --run-name or "
            "--output-dir to continue a run, or leave out --resume to start a new one")
    if changed:
        announce(run, f"resume: flags changed since the checkpoint, applied from now on: {', '.join(changed)}")


def resume(run, state, path, followed_latest=False):
    """Load the checkpoint at path into the run's objects and into state, after checking it belongs to this run."""
    ckpt = utils.load_checkpoint(path)
    if ckpt.get("format") != utils.CHECKPOINT_FORMAT:
        raise utils.CheckpointError(f"{path} is not a checkpoint of this project")
    want, have = run.net.config.as_dict(), ckpt["model_config"]
    for key in ("arch", "width_mult", "num_classes"):
        if have.get(key) != want.get(key):
            raise utils.CheckpointError(f"cannot resume from {path}: it was trained with {key}={have.get(key)!r}, "
                                        f"this run has {key}={want.get(key)!r}")
    if list(ckpt.get("classes", [])) != list(run.data.splits.classes):
        raise utils.CheckpointError(f"cannot resume from {path}: its class list differs from this dataset's")
    check_resume_flags(run, ckpt, path, followed_latest)
    run.net.load_state_dict(ckpt["model"])
    load_optimizer_state(run, ckpt, path)
    if run.scaler and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None and ckpt.get("ema"):
        run.ema.load_state_dict(ckpt["ema"])
        run.ema.decay = run.ema_decay  # the decay given now wins over the saved one
        # in their tensors' memory layout (--channels-last may have changed), or the foreach update goes one by one
        run.ema.shadow_params = [in_layout_of(shadow, tensor) for shadow, tensor
                                 in zip(run.ema.shadow_params, run.ema._get_parameters(None))]
    state.load_state_dict(ckpt)
    state.nonfinite_streak = 0
    rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if len(rng) == run.world_size:
        utils.set_rng_state(rng[run.rank])  # each rank's dropout/mixup stream goes on exactly
    else:  # another number of processes: a new stream per rank, never the same one on two ranks
        utils.seed_everything(run.config.seed + run.rank + 1_000_003 * state.step)
    if run.rank == 0:
        repair_best(ckpt, run.config.output_dir)


# how an optimizer runs, not what it learned: this run's choice, whatever the checkpoint's device chose
IMPLEMENTATION_FLAGS = ("foreach", "fused")


def load_optimizer_state(run, ckpt, path):
    """The checkpoint's optimizer state, run the way this run's optimizer was built (load_state_dict would take
    the saved foreach/fused choice too: a CPU checkpoint resumed on CUDA would then lose fused Adam, and fp16's
    GradScaler would fail on its first step), each state tensor in its parameter's memory layout (a resume may
    switch --channels-last; fused kernels assume the two match) and `step` where a fused kernel wants it."""
    flags = [{key: group[key] for key in IMPLEMENTATION_FLAGS if key in group}
             for group in run.optimizer.param_groups]
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:
        raise utils.CheckpointError(f"cannot resume the optimizer from {path} ({e}); was --opt or --wd-norm-bias "
                                    "changed?") from None
    for group, chosen in zip(run.optimizer.param_groups, flags):
        group.update(chosen)
        for param in group["params"]:
            param_state = run.optimizer.state.get(param, {})
            for key, value in list(param_state.items()):
                if torch.is_tensor(value) and value.shape == param.shape:
                    param_state[key] = in_layout_of(value, param)
            if group.get("fused") and torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].to(param.device, torch.float32)
    if isinstance(run.optimizer, torch.optim.RMSprop) and run.config.momentum > 0:
        for group in run.optimizer.param_groups:  # trained without momentum: RMSprop made no buffers then
            for param in group["params"]:
                param_state = run.optimizer.state[param]
                if param_state:
                    param_state.setdefault("momentum_buffer",
                                           torch.zeros_like(param, memory_format=torch.preserve_format))


def in_layout_of(value, like):
    """value (a copy only if needed) in the memory layout of `like`, a tensor of the same shape."""
    return value if value.stride() == like.stride() else torch.empty_like(like, dtype=value.dtype).copy_(value)


def resume_if_asked(run, state, followed_latest):
    """--resume: continue from the checkpoint, if there is one. Returns "complete" when it has no epoch left to
    train, else None."""
    cfg = run.config
    path = os.path.join(cfg.output_dir, "last.pth") if cfg.resume == "auto" else cfg.resume
    # rank 0 decides, so that every rank resumes or none does (multi-node runs need a shared --output-dir)
    if not utils.broadcast_object(bool(path) and os.path.isfile(path)):
        if cfg.resume == "auto":
            announce(run, f"--resume auto: no {path} yet, starting fresh")
        return None
    utils.fail_together(resume, run, state, path, followed_latest)
    announce(run, f"resumed from {path}: epoch {min(state.epoch + 1, cfg.epochs)}, step {state.step}"
                  + (f", batch {state.batch_in_epoch} of the epoch" if state.batch_in_epoch else "")
                  + (", its validation first" if state.validation_pending else ""))
    if state.epoch >= cfg.epochs and not state.validation_pending:
        announce(run, f"this run is already complete ({state.epoch} of {cfg.epochs} epochs, best top-1 "
                      f"{state.best_top1:.2f}%): nothing to do. Raise --epochs to train on, or choose a new "
                      "--output-dir for a new run")
        return "complete"
    return None


# ---------------------------------------------------------------- the recipe

def main(args):
    utils.check_versions()
    validate_args(args)
    rank, world_size, device = utils.setup_distributed(args.device)
    with utils.StopRequest() as stop:  # SIGTERM/Ctrl-C: finish the step, save, exit
        return train_run(args, rank, world_size, device, stop)


def train_run(args, rank, world_size, device, stop):
    output_dir, run_name, followed_latest = utils.broadcast_object(choose_run_folder(args) if rank == 0 else None)
    config = resolve_config(args, device, output_dir, run_name)
    utils.fail_together(refuse_to_overwrite, config, rank)
    run = build_run(config, rank, world_size, device, stop)
    if rank == 0:
        point_latest_at(config.output_dir)
    state = TrainState()
    outcome = resume_if_asked(run, state, followed_latest)
    if outcome != "complete":
        run.writer = open_tensorboard(run, state)
        announce_run(run)
        outcome = train_epochs(run, state)
        close_tensorboard(run, state, outcome)
    report_outcome(run, state, outcome)
    return 0


def open_tensorboard(run, state):
    if run.rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter
    # purge_step drops events a killed run wrote after its last checkpoint: no duplicated steps on resume
    return SummaryWriter(os.path.join(run.config.log_dir, run.config.run_name), purge_step=state.step + 1)


def announce_run(run):
    """The start-up lines: device, precision, model, data, batch, and the recipe and its batch scaling."""
    cfg, splits, world_size = run.config, run.data.splits, run.world_size
    processes = (f"x{world_size} (torchrun, DDP, process group {utils.backend_name()})" if utils.is_distributed()
                 else "x1")
    params, madds = model_lib.count_params(run.net), model_lib.count_madds(run.net, cfg.img_size)
    global_batch = cfg.batch_size * cfg.accum_steps * world_size
    announce(run, f"device {run.device} {processes} | precision {run.precision} | channels_last {cfg.channels_last}"
                  f" | MobileNetV3-{cfg.arch.capitalize()} {cfg.width_mult:g}: {params / 1e6:.2f}M params, "
                  f"{madds / 1e6:.1f}M MAdds at {cfg.img_size}px")
    announce(run, f"data {run.data.path} ({splits.layout}{', demo' if cfg.data_path is None else ''}): "
                  f"{len(splits.train)} train / {len(splits.val)} val images, "
                  f"{plural(len(splits.classes), 'class', 'classes')} | batch {cfg.batch_size} x {cfg.accum_steps} "
                  f"x {world_size} = {global_batch} | {run.steps_per_epoch} steps/epoch, {plural(cfg.epochs, 'epoch')}")
    if cfg.config:
        announce(run, f"recipe {cfg.config}: " + " ".join(f"{key}={value}" for key, value in vars(cfg).items()
                                                         if key not in RESUME_QUIET_FLAGS | {"config"}))
    if cfg.lr_base_batch:
        announce(run, f"batch scaling: global batch {global_batch} for the {cfg.lr_base_batch} the recipe's lr "
                      f"belongs to: lr {cfg.lr:g} -> {run.lr:.6g} ({cfg.lr_scaling}), EMA decay {cfg.ema_decay:g} "
                      f"-> {run.ema_decay:.8g} per step")


def close_tensorboard(run, state, outcome):
    if run.writer is None:
        return
    if outcome == "done":  # one hparams entry per run, with its final figures
        final = {f"hparam/{k}": v for k, v in state.metrics.items() if isinstance(v, (int, float))}
        hparams = {k: v for k, v in vars(run.config).items() if isinstance(v, (int, float, str, bool))}
        run.writer.add_hparams(hparams, final or {"hparam/best_top1": state.best_top1}, run_name=".")
    run.writer.close()


def report_outcome(run, state, outcome):
    """The last lines of a run; a run that diverged ends with an error (exit 1)."""
    cfg = run.config
    if outcome == "diverged":
        raise UserError(f"the loss was not finite for {MAX_NONFINITE_STREAK} steps in a row at step {state.step}: "
                        f"training stopped, last good checkpoint kept in {cfg.output_dir}. "
                        "Try a lower --lr or --clip-grad-norm")
    if outcome in ("stopped", "not saved"):
        signals = [name for name in utils.gather_objects(run.stop.signal_name) if name]  # it may reach one rank
        why = f"{signals[0]} received" if signals else f"--max-steps {cfg.max_steps} reached"
        if outcome == "stopped":
            announce(run, f"{why}: saved {os.path.join(cfg.output_dir, 'last.pth')} at step {state.step}. Resume "
                          "with the same command plus --resume auto")
        else:
            announce(run, f"{why}: the weights were not saved (see the warning); the previous checkpoint is kept")
    if outcome == "done":
        data_flag = "" if cfg.data_path is None else f" --data-path {cfg.data_path}"
        overflow = f", {state.scaler_skips} fp16 overflow steps skipped by the GradScaler" if run.scaler else ""
        announce(run, f"done: best top-1 {state.best_top1:.2f}% ({state.best_weights} weights) after "
                      f"{plural(cfg.epochs, 'epoch')}, {state.nonfinite_steps} non-finite steps skipped{overflow}")
        announce(run, f"evaluate:    python evaluate.py {os.path.join(cfg.output_dir, 'best.pth')}{data_flag}")
        announce(run, f"tensorboard: tensorboard --logdir {cfg.log_dir}")


def announce(run, text, file=None):
    """Print on rank 0 only."""
    if run.rank == 0:
        print(text, file=file)


def plural(count, word, words=None):
    return f"{count} {word if count == 1 else words or word + 's'}"


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, parse_args()))
