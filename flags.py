"""train.py's command line: its flags, the TOML recipes that set their defaults, and the checks and defaults
that turn the parsed flags into a run's configuration (resolve_config). The parsed flags are never changed.

A recipe (recipes/*.toml) holds train.py flags by their dest names (batch_size = 128) and a [recipe] table with
what is not a flag: name, source, published_top1, not_reproduced, and the global batch its lr belongs to
(global_batch, lr_scaling), which become --lr-base-batch and --lr-scaling.
"""
import argparse
import math
import os

import dataset
import model as model_lib
import utils
from utils import UserError

DEMO_DEFAULTS = {"img_size": 64, "epochs": 8}      # small images and few epochs: about a minute on a laptop CPU
IMAGENET_DEFAULTS = {"img_size": 224, "epochs": 200}  # the predecessor trained 203 epochs
CHECKPOINTS = "checkpoints"  # default parent of the run folders, relative to where train.py is started
# flags that may differ in a resumed run without being worth a word: where things go, how fast, for how long
RESUME_QUIET_FLAGS = {"resume", "output_dir", "log_dir", "run_name", "workers", "device", "max_steps", "print_freq",
                      "data_path", "compile", "deterministic", "strict_data", "eval_every", "overwrite", "pretrained",
                      "config", "save_every_minutes", "save_every_steps"}


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
    group.add_argument("--save-every-minutes", type=float, default=10.0,
                       help="also save last.pth inside an epoch after this many minutes of training (0: off), so a "
                            "kill -9 loses at most that much")
    group.add_argument("--save-every-steps", type=int, default=0,
                       help="also save last.pth every this many optimizer steps inside an epoch (0: off)")
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
    check(("batch_size", "accum_steps", "eval_every", "print_freq", "lr_step_size", "lr_base_batch", "epochs",
           "num_classes"), lambda v: v >= 1, "at least 1")
    check(("workers", "keep_checkpoints", "max_steps", "weight_decay", "label_smoothing", "mixup_alpha",
           "cutmix_alpha", "clip_grad_norm", "warmup_epochs", "random_erase", "save_every_minutes",
           "save_every_steps"), lambda v: v >= 0, "0 or more")
    check(("img_size", "val_crop_size", "val_resize_size"), lambda v: v >= 32, "at least 32 pixels")
    check(("lr", "width_mult", "kd_temperature"), lambda v: math.isfinite(v) and v > 0, "a positive number")
    check(("val_split_fraction", "ema_decay", "label_smoothing", "dropout"), lambda v: 0 <= v < 1, "in [0, 1)")
    check(("kd_alpha", "random_erase"), lambda v: 0 <= v <= 1, "in [0, 1]")
    check(("min_scale", "bn_momentum", "lr_gamma"), lambda v: 0 < v <= 1, "in (0, 1]")
    check(("momentum",), lambda v: 0 <= v < 1, "in [0, 1)")
    check(("seed",), lambda v: -2**63 < v < 2**63, "in (-2**63, 2**63)")
    check(("run_name",), lambda v: v not in ("", ".", "..", "latest") and os.sep not in v,
          "a folder name, not a path (and not latest, the link to the newest run)")
    if args.decode_on == "device" and (args.auto_augment or args.random_erase):
        raise UserError("--decode-on device does the crop and flip only: drop --auto-augment and --random-erase, "
                        "or decode on the workers")
    defaults = get_args_parser()
    unused = [f"--{name.replace('_', '-')}" for name in ("kd_alpha", "kd_temperature")
              if getattr(args, name) != defaults.get_default(name)]
    if unused and args.teacher is None:
        raise UserError(f"{' and '.join(unused)} set how a teacher distils: give one with --teacher, or drop them")
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
    """The command line, with a --config recipe's values as defaults (flags given on the command line win)."""
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


def resolve_config(args, device, output_dir=None, run_name=None):
    """A new namespace: args with the defaults that depend on the data (demo or not), the device and the run
    folder filled in, as --help says. args itself stays as parsed."""
    defaults = DEMO_DEFAULTS if args.data_path is None else IMAGENET_DEFAULTS
    img_size = args.img_size or defaults["img_size"]
    val_crop_size = args.val_crop_size or img_size
    val_resize_size = args.val_resize_size or round(val_crop_size / 0.875)
    if val_resize_size < val_crop_size:
        raise UserError(f"--val-resize-size {val_resize_size} is smaller than the validation crop {val_crop_size}: "
                        "the crop would be padded with black; resize to at least the crop (default: crop / 0.875)")
    amp = device.type != "cpu" if args.amp is None else args.amp
    if args.amp_dtype != "auto" and not amp:
        raise UserError(f"--amp-dtype {args.amp_dtype} needs --amp (mixed precision is off by default on the CPU)")
    output_dir = output_dir or args.output_dir
    return argparse.Namespace(**{
        **vars(args),
        "img_size": img_size,
        "epochs": args.epochs or defaults["epochs"],
        "val_crop_size": val_crop_size,
        "val_resize_size": val_resize_size,
        "amp": amp,  # off on the CPU by default, where bf16 autocast is slower than fp32 (docs/performance.md)
        # faster on CUDA and on the CPU (docs/performance.md)
        "channels_last": device.type in ("cuda", "cpu") if args.channels_last is None else args.channels_last,
        "workers": utils.default_workers(device) if args.workers is None else args.workers,
        "output_dir": output_dir,
        # one folder per run: the TensorBoard run is named after the checkpoint folder
        "run_name": run_name or args.run_name or (os.path.basename(os.path.abspath(output_dir)) if output_dir
                                                  else None),
    })
