"""Checkpoints of a run: the files, the run folders they live in, and resuming from them.

A run writes checkpoints/<run-name>/last.pth (everything a resume needs), best.pth (the same, at the best
validation) and best_weights.pth (the best weights alone, for evaluate.py, export.py and --pretrained);
checkpoints/latest points to the newest run. Every file is written atomically and read with weights_only=True.
"""
import contextlib
import dataclasses
import errno
import fcntl
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
import zipfile

import torch

import flags
import utils
from utils import CheckpointError, UserError, plural, print0, warn

CHECKPOINT_FORMAT = "mobilenetv3-torch/1"
WEIGHTS_FORMAT = "mobilenetv3-torch/weights/1"  # best_weights.pth: the model alone, for sharing and fine-tuning
RUN_FILES = re.compile(r"(last|best|best_weights|epoch_\d{4})\.pth")  # what a fresh start must not overwrite
# how an optimizer runs, not what it learned: this run's choice, whatever the checkpoint's device chose
IMPLEMENTATION_FLAGS = ("foreach", "fused")
LOCKS = {}  # run folder -> its lock file, held open while this process trains there
RUN_ID = ".run-id"  # in a run's checkpoint folder and its TensorBoard folder alike: whose they are


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
    nonfinite_steps: int = 0         # steps skipped for a non-finite loss or a collapsed loss scale
    nonfinite_streak: int = 0        # of those, in a row up to now
    scaler_skips: int = 0            # fp16 steps GradScaler skipped to lower its scale: routine, not divergence
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


# ---------------------------------------------------------------- files

def save_checkpoint(state, path):
    """Write atomically (a temp file in the same folder, fsync, rename): a crash at any instant leaves the old file
    or the new one, both whole. A failed write raises CheckpointError and leaves the old file untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + "-")
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; a checkpoint is as readable as any file
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        tmp_path = None
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError("... unexpected pos ...")
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)  # first, so that the free space below is what the disk really has
            tmp_path = None
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        full = "no space left on device" if free < 2**26 else str(e).splitlines()[0]
        reason = f"{getattr(e, 'strerror', None) or full}, {free / 2**20:.0f} MB free there"
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; the previous checkpoint (if any) is "
                              "unchanged") from None
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)


def current_umask():
    """The process's umask: read from /proc where it can be (setting it to read it races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def load_checkpoint(path):
    """torch.load with weights_only=True (never runs code from the file), with one-line errors."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (e.g. {os.path.join(path, 'best.pth')})")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # random bytes can make torch warn about the pickle protocol first
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:  # the file asks to call code on load: refuse it, and never retry without weights_only
            raise CheckpointError(f"{path} was refused by the safe loader (weights_only=True): it references "
                                  f"{unsafe.group(1)}, which a checkpoint has no reason to contain") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or not a checkpoint)") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, AttributeError, TypeError, IndexError,
            KeyError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (found {type(obj).__name__})")
    return obj


def is_original_checkpoint(obj):
    """The 2021 predecessor (ipcvl2021-mobilenetv3-torch-v2) saved model_state_dict/optimizer_state_dict/epoch/loss."""
    if not isinstance(obj, dict) or "model_state_dict" not in obj:
        return False
    keys = obj["model_state_dict"].keys() if isinstance(obj["model_state_dict"], dict) else []
    return "optimizer_state_dict" in obj or any("bottleneck" in k for k in keys)


def pretrained_state(source):
    """What --pretrained names, for model.load_pretrained: "torchvision", or the state dict in a file: a torchvision
    state dict, or this project's checkpoint (its best weights) or best_weights.pth."""
    if source == "torchvision":
        return source
    ckpt = load_checkpoint(source)
    if ckpt.get("format") == WEIGHTS_FORMAT:
        return ckpt["model"]
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        return ckpt["ema_model"] if ckpt.get("best_weights") == "ema" and ckpt.get("ema_model") else ckpt["model"]
    return ckpt


# ---------------------------------------------------------------- run folders

def choose_run_folder(args):
    """(checkpoint folder, run name, whether it is the latest run followed by --resume auto), decided on rank 0.
    Every run gets its own folder: <output-dir> when given, else checkpoints/<run-name> with a new, time-stamped
    name (reserved at once, so two runs started in the same second get two). --resume auto without a folder
    continues the latest run (checkpoints/latest); --resume PATH continues in PATH's folder."""
    if args.output_dir is not None:
        folder = os.path.realpath(args.output_dir)  # checkpoints/latest/ given as a folder: the run it points to
        return folder, args.run_name or log_name_of(folder, args.log_dir), False
    if args.resume not in (None, "auto"):
        folder = os.path.dirname(os.path.realpath(args.resume))
        return folder, args.run_name or log_name_of(folder, args.log_dir), False
    latest = os.path.join(flags.CHECKPOINTS, "latest")
    if args.resume == "auto" and not args.run_name and os.path.isdir(latest):
        folder = os.path.realpath(latest)
        return folder, log_name_of(folder, args.log_dir), True
    name = args.run_name or f"{args.arch}_{args.width_mult:g}_{time.strftime('%Y%m%d-%H%M%S')}"
    folder = os.path.join(flags.CHECKPOINTS, name)
    for n in range(2, 1000):
        if args.run_name is not None:
            break
        try:
            os.makedirs(folder)  # reserved: a run started in the same second takes the next suffix
            break
        except FileExistsError:
            folder = os.path.join(flags.CHECKPOINTS, f"{name}-{n}")
        except OSError:
            break  # an unwritable checkpoints/: prepare_run_folders says so in one line
    return folder, os.path.basename(folder), False


def log_name_of(folder, log_dir):
    """The TensorBoard run name of a checkpoint folder: its own name, or name-2, name-3, ... when another run's
    events are there already (expA/ckpt and expB/ckpt are two runs, never one)."""
    name, own = os.path.basename(folder), run_id(folder)
    for candidate in [name] + [f"{name}-{n}" for n in range(2, 1000)]:
        if run_id(os.path.join(log_dir, candidate)) in (None, own):  # new, this run's, or one that does not say
            return candidate
    return name


def run_id(folder):
    """The id a run wrote into its checkpoint and TensorBoard folders (RUN_ID), or None. An id, not a path: the two
    folders may move or be mounted elsewhere and still belong together."""
    try:
        with open(os.path.join(folder, RUN_ID)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def prepare_run_folders(config):
    """A fresh start never destroys another run's files: refused unless --overwrite, which deletes them, and a run
    already training in the folder refuses any other start (a lock held until unlock_run_folders). Then the
    checkpoint and TensorBoard folders are made and probed (failing at start, not after an epoch), both marked with
    the run's id, and temp files of killed writes removed; a refused start touches none of another run's files."""
    log_folder = os.path.join(config.log_dir, config.run_name)
    lock_run_folder(config.output_dir)
    own, logged = run_id(config.output_dir), run_id(log_folder)
    if logged is not None and logged != own:
        raise UserError(f"{log_folder} holds the TensorBoard events of another run: choose another --run-name")
    found = []
    for folder, is_run_file in ((config.output_dir, RUN_FILES.fullmatch), (log_folder, lambda n: "tfevents" in n)):
        if config.resume is None and os.path.isdir(folder):
            found += [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if is_run_file(name)]
    if found and not config.overwrite:
        raise UserError(f"{found[0]} belongs to an earlier run: add --resume auto to continue it, --overwrite to "
                        f"start afresh (deleting {plural(len(found), 'file')} of it), or choose another "
                        f"--output-dir / --run-name")
    try:  # lock_run_folder made the folder: can this process write there?
        tempfile.NamedTemporaryFile(dir=config.output_dir, prefix=".tmp-probe-").close()
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to --output-dir {config.output_dir}: {e.strerror or e}") \
            from None
    utils.prepare_log_dir(log_folder)
    own = own or uuid.uuid4().hex  # a new run's
    for folder in (config.output_dir, log_folder):
        if run_id(folder) is None:
            with open(os.path.join(folder, RUN_ID), "w") as f:
                f.write(own)
    for path in found:
        try:
            os.remove(path)
        except OSError as e:
            raise UserError(f"--overwrite: cannot delete {path}: {e.strerror or e}") from None
    for name in os.listdir(config.output_dir):
        if name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(config.output_dir, name))


def lock_run_folder(folder):
    """An exclusive lock on the run folder while this process trains there: two runs started into one folder at the
    same moment cannot both pass the checks that follow (they read, then write)."""
    if folder in LOCKS:  # this process holds it already (a benchmark builds several runs)
        return
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a")
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to --output-dir {folder}: {e.strerror or e}") from None
    try:  # a POSIX record lock: forked loader workers do not inherit it, so it ends with the process itself
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.close()
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # a filesystem without locks (NFS without lockd, ...)
            warn(f"cannot lock {folder} ({e.strerror}): two runs started into it at once would not be stopped")
            return
        raise UserError(f"another run is training in {folder} right now: let it finish, or choose another "
                        "--output-dir / --run-name") from None
    LOCKS[folder] = lock


def unlock_run_folders():
    for lock in LOCKS.values():
        lock.close()
    LOCKS.clear()


def point_latest_at(folder):
    """checkpoints/latest -> the run folder (a relative symbolic link, replaced atomically)."""
    folder = os.path.realpath(folder)
    if os.path.dirname(folder) != os.path.realpath(flags.CHECKPOINTS) or os.path.basename(folder) == "latest":
        return
    link, tmp = os.path.join(flags.CHECKPOINTS, "latest"), os.path.join(flags.CHECKPOINTS, f".latest-{os.getpid()}")
    try:
        os.symlink(os.path.basename(folder), tmp)
        os.replace(tmp, link)
    except OSError:  # a filesystem without symbolic links, or a real folder named latest: no pointer
        with contextlib.suppress(OSError):
            os.remove(tmp)


# ---------------------------------------------------------------- saving

def ema_state_dict(net, ema):
    with ema.average_parameters():
        return {k: v.detach().clone() for k, v in net.state_dict().items()}


def checkpoint_state(run, state, rng_states):
    cfg, splits = run.config, run.data.splits
    ema_state = run.ema.state_dict() if run.ema else None
    if ema_state:  # the raw weights average_parameters() leaves behind: never needed to resume
        ema_state["collected_params"] = None
    return {
        "format": CHECKPOINT_FORMAT,
        **state.state_dict(),            # epoch, batch_in_epoch, step, best_top1, ... (TrainState)
        "model": run.net.state_dict(),
        "model_config": run.net.config.as_dict(),
        "ema": ema_state,
        "ema_model": ema_state_dict(run.net, run.ema) if run.ema else None,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "rng": rng_states,               # one per rank: each rank's dropout/mixup stream resumes exactly
        "world_size": run.world_size,
        "steps_per_epoch": run.steps_per_epoch,
        "train_images": len(run.data.train_set),  # with the seed, the order of every epoch's images
        "data_path": run.data.path,
        "args": dict(vars(cfg)),
        "classes": list(splits.classes),
        "class_names": list(splits.class_names),
        "norm": cfg.norm,
        "val_resize_size": cfg.val_resize_size,
        "val_crop_size": cfg.val_crop_size,
        # --val-split-fraction's held-out images, so that the run and evaluate.py always score the same ones
        "val_split_files": [os.fsdecode(path) for path in splits.val.paths] if cfg.val_split_fraction else None,
    }


class SaveSchedule:
    """When train_one_epoch saves inside an epoch: --save-every-minutes of training after the last save, or every
    --save-every-steps steps. Each rank asks its own clock; the loop's one all-reduce a step (utils.any_rank) then
    makes the first rank's "due" every rank's, so the ranks agree without a sync of their own."""

    def __init__(self, minutes, steps):
        self.seconds, self.steps, self.last = minutes * 60, steps, time.monotonic()

    def due(self, state):
        if state.nonfinite_streak:  # no checkpoint is written then: asking every step would only repeat a warning
            return False
        every_steps = bool(self.steps) and state.step % self.steps == 0
        return every_steps or (self.seconds > 0 and time.monotonic() - self.last >= self.seconds)

    def save(self, run, state, *meters):
        """last.pth at this step (a kill -9 then loses at most the interval); the meters do not count its time."""
        start = time.perf_counter()
        save(run, state)
        self.last = time.monotonic()  # also after a refused save (non-finite weights): the next try in an interval
        if run.writer is not None:
            run.writer.flush()  # the events up to this checkpoint survive a kill -9 too
        for meter in meters:
            meter.start += time.perf_counter() - start


def can_save(run, state):
    """A checkpoint is never written in a non-finite streak or with non-finite weights (rank 0 decides)."""
    finite = all(bool(torch.isfinite(t).all()) for t in run.net.state_dict().values() if t.is_floating_point())
    return utils.broadcast_object(state.nonfinite_streak == 0 and finite)


def save(run, state, also_best=False):
    """Write last.pth, then best.pth with the same state when also_best. Every rank calls it (the RNG states
    are gathered; a failed write on rank 0 ends every rank). Returns whether the checkpoint was written.

    last.pth goes first: it records best_top1 and best_epoch, so a crash between the two writes leaves a
    last.pth from which resume() rewrites best.pth (repair_best); the other order would let a resumed run
    replace the new best.pth by a worse model."""
    rng_states = utils.gather_objects(utils.get_rng_state())
    if not can_save(run, state):
        why = "the last steps had a non-finite loss" if state.nonfinite_streak else "weights are not finite"
        print0(f"warning: {why}; keeping the previous checkpoints", file=sys.stderr)
        return False
    folder = run.config.output_dir

    def write():
        if run.rank != 0:
            return
        ckpt = checkpoint_state(run, state, rng_states)
        save_checkpoint(ckpt, os.path.join(folder, "last.pth"))
        if also_best:
            save_checkpoint(ckpt, os.path.join(folder, "best.pth"))
            save_checkpoint(weights_file(ckpt), os.path.join(folder, "best_weights.pth"))
        if run.config.keep_checkpoints and not state.batch_in_epoch and not state.validation_pending:
            keep_epoch_weights(ckpt, folder, run.config.keep_checkpoints)
    utils.fail_together(write)
    return True


def weights_file(ckpt):
    """best_weights.pth: only the best weights (EMA or raw) with what evaluate.py, export.py and --pretrained need
    to use them: a few MB, where best.pth also holds the other weights, the EMA's and the optimizer's state."""
    keep = ("model_config", "classes", "class_names", "norm", "val_resize_size", "val_crop_size", "best_top1",
            "epoch", "data_path", "val_split_files")
    weights = ckpt["best_weights"]
    return {"format": WEIGHTS_FORMAT, "weights": weights, **{key: ckpt.get(key) for key in keep},
            "model": ckpt["ema_model"] if weights == "ema" else ckpt["model"], "args": ckpt["args"]}


def keep_epoch_weights(ckpt, output_dir, keep):
    """epoch_NNNN.pth: the raw weights after each epoch, the last `keep` of them (for checkpoint averaging)."""
    save_checkpoint({**weights_file(ckpt), "weights": "raw", "model": ckpt["model"]},
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
            if load_checkpoint(path).get("best_top1", -1) >= ckpt["best_top1"]:
                continue
        except CheckpointError:
            pass  # missing or broken
        save_checkpoint(state or weights_file(ckpt), path)
        print(f"rewrote {path} from the last checkpoint (the run had stopped before writing it)")


# ---------------------------------------------------------------- resuming

def resume_path(config):
    """The checkpoint --resume names (None without --resume; it may not exist yet with --resume auto)."""
    return os.path.join(config.output_dir, "last.pth") if config.resume == "auto" else config.resume


def recorded_val_split(config):
    """The held-out files recorded by the run being resumed (val_split_files), or None."""
    path = resume_path(config)
    if not path or not os.path.isfile(path):
        return None
    return load_checkpoint(path).get("val_split_files")


def resume_if_asked(run, state, followed_latest):
    """--resume: continue from the checkpoint, if there is one. Returns whether the run has epochs left to train."""
    cfg = run.config
    path = resume_path(cfg)
    # rank 0 decides, so that every rank resumes or none does (multi-node runs need a shared --output-dir)
    if not utils.broadcast_object(bool(path) and os.path.isfile(path)):
        if cfg.resume == "auto":
            print0(f"--resume auto: no {path} yet, starting fresh")
        return True
    utils.fail_together(resume, run, state, path, followed_latest)
    print0(f"resumed from {path}: epoch {min(state.epoch + 1, cfg.epochs)}, step {state.step}"
           + (f", batch {state.batch_in_epoch} of the epoch" if state.batch_in_epoch else "")
           + (", its validation first" if state.validation_pending else ""))
    if state.epoch >= cfg.epochs and not state.validation_pending:
        print0(f"this run is already complete ({state.epoch} of {cfg.epochs} epochs, best top-1 "
               f"{state.best_top1:.2f}%): nothing to do. Raise --epochs to train on, or choose a new "
               "--output-dir for a new run")
        return False
    return True


def resume(run, state, path, followed_latest=False):
    """Load the checkpoint at path into the run's objects and into state, after checking it belongs to this run."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") == WEIGHTS_FORMAT:
        raise CheckpointError(f"{path} holds weights only (no optimizer, EMA or progress): start a new run from it "
                              f"with --pretrained {path}, or resume a run from its last.pth")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    want, have = run.net.config.as_dict(), ckpt["model_config"]
    for key in ("arch", "width_mult", "num_classes"):
        if have.get(key) != want.get(key):
            raise CheckpointError(f"cannot resume from {path}: it was trained with {key}={have.get(key)!r}, "
                                  f"this run has {key}={want.get(key)!r}")
    if list(ckpt.get("classes", [])) != list(run.data.splits.classes):
        raise CheckpointError(f"cannot resume from {path}: its class list differs from this dataset's")
    check_resume_flags(run, ckpt, path, followed_latest)
    run.net.load_state_dict(ckpt["model"])
    load_optimizer_state(run, ckpt, path)
    if run.scaler.is_enabled() and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None and ckpt.get("ema"):
        run.ema.load_state_dict(ckpt["ema"])
        run.ema.decay = run.ema_decay  # the decay given now wins over the saved one
        # in their tensors' memory layout (--channels-last may have changed), or the foreach update goes one by one
        run.ema.shadow_params = [in_layout_of(shadow, tensor) for shadow, tensor
                                 in zip(run.ema.shadow_params, run.ema._get_parameters(None))]
    state.load_state_dict(ckpt)
    state.nonfinite_streak = 0
    saved, cfg = ckpt.get("args", {}), run.config
    if state.batch_in_epoch and (saved.get("batch_size"), saved.get("accum_steps"), ckpt.get("world_size", 1)) != (
            cfg.batch_size, cfg.accum_steps, run.world_size):
        continue_epoch_with_other_batches(run, state, ckpt)
    rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if len(rng) == run.world_size:
        utils.set_rng_state(rng[run.rank])  # each rank's dropout/mixup stream goes on exactly
    else:  # another number of processes: a new stream per rank, never the same one on two ranks
        utils.seed_everything(run.config.seed + run.rank + 1_000_003 * state.step)
    if run.rank == 0:
        repair_best(ckpt, run.config.output_dir)


def continue_epoch_with_other_batches(run, state, ckpt):
    """A checkpoint inside an epoch, resumed with another batch size or process count: the epoch goes on in its own
    order (seed and images unchanged) after the images already trained, in whole steps of this run."""
    cfg, saved = run.config, ckpt["args"]
    seen = ckpt["batch_in_epoch"] * saved["batch_size"] * ckpt.get("world_size", 1)  # the epoch's order, so far
    state.batch_in_epoch = seen // (cfg.batch_size * cfg.accum_steps * run.world_size) * cfg.accum_steps
    print0(f"resume: epoch {state.epoch + 1} goes on after image {seen} of its order with another batch or process "
           f"count, from step {state.batch_in_epoch // cfg.accum_steps} of {run.steps_per_epoch} (less than one step "
           "of images trained twice; from here not bit for bit an uninterrupted run)")


def check_resume_flags(run, ckpt, path, followed_latest):
    """Refuse what cannot continue exactly; list every other flag that changed (they are applied)."""
    cfg, saved = run.config, ckpt.get("args", {})
    if saved.get("opt", cfg.opt) != cfg.opt:
        raise CheckpointError(f"{path} was trained with --opt {saved['opt']}; resume with the same --opt "
                              f"(to start a new run from its weights, use --pretrained with its weights)")
    if ckpt["batch_in_epoch"]:
        now = (cfg.batch_size, cfg.accum_steps, run.world_size, cfg.seed, run.steps_per_epoch)
        then = (saved.get("batch_size"), saved.get("accum_steps"), ckpt.get("world_size", 1), saved.get("seed", 0),
                ckpt.get("steps_per_epoch", run.steps_per_epoch))
        same_order = (saved.get("seed", 0), ckpt.get("train_images")) == (cfg.seed, len(run.data.train_set))
        if now != then and not same_order:  # another batch or process count alone is continued (resume)
            raise CheckpointError(
                f"{path} stopped inside an epoch with batch size, accum steps, processes, seed and steps an epoch "
                f"{then}; resume it with the same seed and training images (this run has {now}: did the training "
                "folder change?), or resume from a checkpoint written at the end of an epoch")
    if ckpt.get("val_split_files") is not None and saved.get("val_split_fraction") != cfg.val_split_fraction:
        raise CheckpointError(f"{path} holds out {len(ckpt['val_split_files'])} images for validation, drawn with "
                              f"--val-split-fraction {saved.get('val_split_fraction')}: resume with the same")
    changed = [f"--{key.replace('_', '-')} {saved[key]} -> {value}" for key, value in sorted(vars(cfg).items())
               if key in saved and saved[key] != value and key not in flags.RESUME_QUIET_FLAGS]
    other_run = [change for change in changed if not change.startswith("--epochs ")]  # more epochs: same run
    if other_run and followed_latest:  # --resume auto found the latest run by itself
        raise CheckpointError(
            f"--resume auto would continue the latest run, {os.path.dirname(path)}, which was started with other "
            f"flags ({', '.join(other_run[:3])}{', ...' if len(other_run) > 3 else ''}): give --run-name or "
            "--output-dir to continue a run, or leave out --resume to start a new one")
    if changed:
        print0(f"resume: flags changed since the checkpoint, applied from now on: {', '.join(changed)}")


def load_optimizer_state(run, ckpt, path):
    """The checkpoint's optimizer state, run the way this run's optimizer was built (load_state_dict would take
    the saved foreach/fused choice too: a CPU checkpoint resumed on CUDA would lose fused Adam, and fp16's
    GradScaler would fail on its first step), each state tensor in its parameter's memory layout (a resume may
    switch --channels-last; fused kernels assume the two match), and this run's weight decay and momentum."""
    chosen = [{key: group[key] for key in IMPLEMENTATION_FLAGS if key in group} for group in run.optimizer.param_groups]
    settings = [{key: group[key] for key in ("weight_decay", "momentum", "nesterov") if key in group}
                for group in run.optimizer.param_groups]
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:
        raise CheckpointError(f"cannot resume the optimizer from {path} ({e}); was --opt or --wd-norm-bias "
                              "changed?") from None
    for group, *kept in zip(run.optimizer.param_groups, chosen, settings):
        for values in kept:
            group.update(values)
        for param in group["params"]:
            param_state = run.optimizer.state.get(param)
            if not param_state:
                continue
            for key, value in list(param_state.items()):
                if torch.is_tensor(value) and value.shape == param.shape:
                    param_state[key] = in_layout_of(value, param)
            if group.get("fused") and torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].to(param.device, torch.float32)
            if isinstance(run.optimizer, torch.optim.RMSprop) and group["momentum"] > 0:
                # trained without momentum: RMSprop made no buffers then
                param_state.setdefault("momentum_buffer", torch.zeros_like(param, memory_format=torch.preserve_format))


def in_layout_of(value, like):
    """value (a copy only if needed) in the memory layout of `like`, a tensor of the same shape."""
    return value if value.stride() == like.stride() else torch.empty_like(like, dtype=value.dtype).copy_(value)
