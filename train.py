"""Train MobileNetV3 on ImageNet-style folders with mixed precision, an EMA of the weights and Adam.

    python train.py                                                     # demo data: about a minute on a CPU
    python train.py --data-path /data/imagenet --config recipes/original_2021.toml
    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet     # --batch-size is per process
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --data-path ...
    python train.py --data-path /data/imagenet --resume auto            # continue after a crash or preemption

The update step is train_step; train_one_epoch and train_epochs run it, validate and save; main builds what
they use: data, model, optimizer, EMA, resume. Flags and recipes live in flags.py, checkpoints in checkpoint.py.
"""
import os

# sleeping OpenMP threads: spinning ones stall each other next to any busy process (docs/performance.md); set
# before torch loads OpenMP, and an OMP_WAIT_POLICY given by the user wins
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import dataclasses
import enum
import itertools
import math
import pickle
import sys
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch_ema import ExponentialMovingAverage
from tqdm import tqdm

import checkpoint
import dataset
import flags
import layouts
import model as model_lib
import utils
from checkpoint import TrainState
from evaluate import evaluate
from utils import UserError, plural, print0

MAX_NONFINITE_STREAK = 20
# A GradScaler halves its scale at each overflow while it calibrates; below 1 the gradients overflow fp16 even
# unscaled, which is divergence, not calibration
MIN_LOSS_SCALE = 1.0
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")


class Outcome(enum.Enum):
    DONE = "done"            # every epoch trained and validated
    STOPPED = "stopped"      # a signal or --max-steps; last.pth holds where it stopped
    NOT_SAVED = "not saved"  # stopped, but in a non-finite streak or with non-finite weights: nothing written
    DIVERGED = "diverged"    # MAX_NONFINITE_STREAK non-finite steps in a row
    COMPLETE = "complete"    # resumed a run that had no epoch left


# ---------------------------------------------------------------- the recipe's parts

def make_optimizer(model, args, device):
    """BN and bias parameters get no weight decay unless --wd-norm-bias (standard practice for MobileNets)."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 and not args.wd_norm_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused Adam is the fastest on CUDA; on the CPU it gains nothing measurable (docs/performance.md)
    fast = {"fused": True} if device.type == "cuda" and args.opt in ("adam", "adamw") else {"foreach": True}
    if args.opt in ("adam", "adamw"):
        return (torch.optim.Adam if args.opt == "adam" else torch.optim.AdamW)(groups, lr=args.lr, **fast)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0, foreach=True)
    # TF-style RMSprop settings from the paper (section 6.1: momentum 0.9, decay 0.9)
    return torch.optim.RMSprop(groups, lr=args.lr, alpha=0.9, eps=0.0316, momentum=args.momentum, foreach=True)


def lr_factor(progress, args, steps_per_epoch):
    """Learning-rate multiplier for the step that starts at `progress` epochs into training (a float, so that a
    resume with another batch size or GPU count continues at the same point of the schedule): a linear warm-up
    over --warmup-epochs (rounded to whole steps), then the chosen schedule."""
    position = progress * steps_per_epoch  # steps so far, counted in this run's steps
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


def warm_up_bn_momentum(model, step, momentum):
    """BN momentum 0.01 (paper) averages the statistics of the last ~100 steps, while the weights early in
    training change much faster than that: a short run would evaluate with statistics of a network that no longer
    exists. Until step ~1/(10 x momentum) use 1/(1 + step/10), about the last 10% of the steps, then the paper's."""
    value = max(momentum, 1.0 / (1.0 + step / 10))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = value


class ForeachEMA(ExponentialMovingAverage):
    """torch-ema with its update as one foreach lerp over all the tensors instead of a Python loop of three ops per
    tensor (docs/performance.md). The same decay and warm-up, state, checkpoints and methods."""

    def update(self, parameters=None):
        parameters = self._get_parameters(parameters)
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        with torch.no_grad():  # shadow += (1 - decay) * (tensor - shadow), as torch-ema's loop computes it
            torch._foreach_lerp_(self.shadow_params, [p.detach() for p in parameters], 1.0 - decay)


def make_ema(model, decay):
    """EMA of the parameters and the BN running statistics, so that EMA weights come with matching statistics.
    torch-ema's warm-up, decay min(d, (1+n)/(10+n)), makes it usable from the first epoch."""
    if decay <= 0:
        return None
    return ForeachEMA(list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()], decay=decay)


def distillation_loss(loss, logits, teacher_logits, alpha, temperature):
    """(1 - alpha) x loss + alpha x T^2 x KL(teacher || student) on softmaxes at temperature T (Hinton et al., 2015:
    T^2 keeps the gradients' scale independent of T). Returns (that loss, the KL term)."""
    student = torch.log_softmax(logits.float() / temperature, dim=1)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=1)
    kd = nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2
    return (1 - alpha) * loss + alpha * kd, kd


# ---------------------------------------------------------------- the update step

def train_step(model, params, micro_batches, lr, optimizer, scaler, autocast, criterion, skips, accum_steps=1,
               ema=None, teacher=None, kd_alpha=0.5, kd_temperature=1.0, clip_grad_norm=0.0, no_sync=None):
    """One optimizer step of model (parameters: params) from `accum_steps` micro-batches (images, targets) on the
    device. Returns its figures as one device tensor: loss x images, top-1 hits, images, KD term x images."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    skips.before_step()  # keeps the BN statistics, to take back after a non-finite step
    figures, count = None, 0
    for count, (images, targets) in enumerate(micro_batches, 1):
        # DDP all-reduces the gradients once, in the backward of the last micro-batch
        with no_sync() if no_sync and count < accum_steps else contextlib.nullcontext():
            with autocast():
                with torch.no_grad():  # the teacher first: its activations are freed before the student's exist
                    teacher_logits = teacher(images) if teacher is not None else None
                logits = model(images)
                loss, kd_term = criterion(logits, targets), None
                if teacher is not None:
                    loss, kd_term = distillation_loss(loss, logits, teacher_logits, kd_alpha, kd_temperature)
            scaler.scale(loss / accum_steps).backward()
        figures = add_figures(figures, loss, logits, targets, kd_term)
    if count != accum_steps:  # a short step would use partial gradients (and skip DDP's all-reduce)
        raise ValueError(f"train_step got {count} micro-batches for --accum-steps {accum_steps}")
    scaler.unscale_(optimizer)  # clipping and the finiteness test see the true gradients
    grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    applied = bool(torch.isfinite(grad_norm))  # the step's host sync; every rank has the same all-reduced gradients
    if applied:
        if clip_grad_norm > 0:
            nn.utils.clip_grads_with_norm_(params, clip_grad_norm, grad_norm)
        scaler.step(optimizer)
    scaler.update()  # after an fp16 overflow: a lower loss scale
    optimizer.zero_grad(set_to_none=True)
    skips.after_step(applied, figures)  # counts a skipped step; takes BN back after a non-finite one
    if ema is not None:
        ema.update()
    return figures


def add_figures(figures, loss, logits, targets, kd_term):
    """figures + this micro-batch's loss x images, top-1 hits, images and KD term x images (on the device)."""
    if figures is None:
        figures = torch.zeros(4, dtype=utils.sum_dtype(logits.device), device=logits.device)
    images = targets.shape[0]
    figures[0] += loss.detach().to(figures.dtype) * images  # a non-finite loss makes this sum non-finite too
    figures[1] += utils.correct_topk(logits.detach(), targets, (1,))[0]
    figures[2] += images
    if kd_term is not None:
        figures[3] += kd_term.detach().to(figures.dtype) * images
    return figures


class SkippedSteps:
    """The steps train_step did not apply, counted in the TrainState. An fp16 overflow with a finite loss on every
    rank and a loss scale still >= MIN_LOSS_SCALE is the GradScaler calibrating; any other is a non-finite step,
    whose forward passes have already moved the BN running statistics (maybe to NaN): those are taken back."""

    def __init__(self, net, state, scaler):
        self.buffers = [b for b in net.buffers() if b.is_floating_point()]
        self.backup = [b.detach().clone() for b in self.buffers]
        self.state, self.scaler = state, scaler

    def before_step(self):
        torch._foreach_copy_(self.backup, self.buffers)

    def after_step(self, applied, figures):
        state = self.state
        if applied:
            state.nonfinite_streak = 0
        elif (self.scaler.is_enabled() and self.scaler.get_scale() >= MIN_LOSS_SCALE
              and not utils.any_rank(not bool(torch.isfinite(figures[0])))):
            state.scaler_skips += 1
            state.nonfinite_streak = 0  # a finite loss ends a streak of non-finite ones
        else:
            torch._foreach_copy_(self.buffers, self.backup)
            state.nonfinite_steps += 1
            state.nonfinite_streak += 1


# ---------------------------------------------------------------- the loop

def train_one_epoch(run, state, time_first_step=False):
    """Train epoch state.epoch from micro-batch state.batch_in_epoch (non-zero after a mid-epoch resume) to its end
    or a stop (a signal or --max-steps; the caller saves). Returns (Outcome, the epoch's training figures)."""
    cfg = run.config
    batches = run.steps_per_epoch * cfg.accum_steps  # micro-batches left over by --accum-steps are not loaded
    run.data.train_loader.sampler.set_epoch(state.epoch, skip_batches=state.batch_in_epoch, batch_size=cfg.batch_size)
    window, epoch = utils.MetricMeter(run.device), utils.MetricMeter(run.device)
    micro_batches = device_batches(run, state, window)
    skips, params = SkippedSteps(run.net, state, run.scaler), list(run.net.parameters())
    schedule = checkpoint.SaveSchedule(cfg.save_every_minutes, cfg.save_every_steps)
    with tqdm(total=batches, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
              disable=not run.show_progress, dynamic_ncols=True, leave=False) as bar:  # closed on an error too
        run.model.train()
        outcome = Outcome.DONE
        while state.batch_in_epoch < batches:
            start, waited = time.perf_counter(), window.data_wait
            if state.step * cfg.bn_momentum <= 10 and not cfg.compile:  # a changing float would recompile each step
                warm_up_bn_momentum(run.net, state.step, cfg.bn_momentum)
            progress = state.progress(run.steps_per_epoch, cfg.accum_steps)
            figures = train_step(run.model, params, itertools.islice(micro_batches, cfg.accum_steps),
                                 run.lr * lr_factor(progress, cfg, run.steps_per_epoch), run.optimizer, run.scaler,
                                 run.autocast, run.criterion, skips, cfg.accum_steps, run.ema, run.teacher,
                                 cfg.kd_alpha, cfg.kd_temperature, cfg.clip_grad_norm,
                                 run.ddp.no_sync if run.ddp else None)
            state.step += 1
            state.batch_in_epoch += cfg.accum_steps
            window.add(figures)
            epoch.add(figures)
            bar.update(cfg.accum_steps)
            if time_first_step:  # --compile: the first step of this process compiles the model
                log_compile_time(run, state, figures, start, window.data_wait - waited)
                time_first_step = False
            if state.step % cfg.print_freq == 0:
                log_training(run, state, window, progress, bar)
                window.reset()
            if state.nonfinite_streak >= MAX_NONFINITE_STREAK:
                outcome = Outcome.DIVERGED
                break
            # every rank stops (or saves) at the same step, whichever got the signal (or saw the time) first
            stop, save_due = utils.any_rank(run.stop, schedule.due(state))
            if stop or (cfg.max_steps and state.step >= cfg.max_steps):
                outcome = Outcome.STOPPED if state.batch_in_epoch < batches else Outcome.DONE
                break
            if save_due and state.batch_in_epoch < batches:  # the epoch's end saves anyway
                schedule.save(run, state, window, epoch)
    utils.all_reduce_sum(epoch.sums)
    if outcome == Outcome.DONE:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return outcome, epoch.read()


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


def train_epochs(run, state):
    """Epochs, each followed by its validation and checkpoints, until the last one or a stop. A stop after an
    epoch's last step saves at once and leaves that epoch's validation to the resumed run (validation_pending),
    so a preempted job is saved within one step, whatever the validation set's size. Returns an Outcome."""
    cfg = run.config
    time_first_step = cfg.compile
    while state.epoch < cfg.epochs or state.validation_pending:
        if cfg.max_steps and state.step >= cfg.max_steps and not state.validation_pending:
            return Outcome.STOPPED  # resumed with --max-steps already reached: last.pth is this state
        if not state.validation_pending:
            outcome, figures = train_one_epoch(run, state, time_first_step)
            time_first_step = False
            if outcome == Outcome.DIVERGED:
                return outcome
            if outcome == Outcome.DONE:
                report_epoch(run, state, figures)
                state.validation_pending = state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs
        signalled, saved = utils.any_rank(run.stop), None
        if state.validation_pending and not signalled:
            saved = validate_and_track_best(run, state)  # which saves; None when a signal cut it short
            signalled = saved is None
        if saved is None:  # mid-epoch, no validation due, or a signal (the validation waits for the resumed run)
            saved = checkpoint.save(run, state)
        if signalled or (cfg.max_steps and state.step >= cfg.max_steps):
            return Outcome.STOPPED if saved else Outcome.NOT_SAVED
    return Outcome.DONE


def validate(run):
    """{"raw": figures, "ema": figures} of the raw and the EMA weights on the validation split, or None when a stop
    request cut the validation short (every rank agrees)."""
    cfg, net = run.config, run.net
    # DDP syncs BN statistics only at each forward: give every rank rank 0's (the ones saved) before scoring
    utils.broadcast_tensors(list(net.buffers()) + (list(run.ema.shadow_params) if run.ema else []))
    loader = utils.UntilStopped(run.data.val_loader, run.stop)
    results = {"raw": evaluate(net, loader, run.device, run.autocast, cfg.norm, cfg.channels_last,
                               show_progress=run.show_progress)}
    if run.ema is not None and not utils.any_rank(run.stop):
        with run.ema.average_parameters():
            results["ema"] = evaluate(net, loader, run.device, run.autocast, cfg.norm, cfg.channels_last,
                                      desc="val (ema)", show_progress=run.show_progress)
    net.train()
    return None if utils.any_rank(run.stop) else results


def validate_and_track_best(run, state):
    """Validate the raw and the EMA weights after the epoch, then save last.pth (and best.pth on a new best). Returns
    whether they were written, or None, having saved nothing, when a stop request cut the validation short."""
    results = validate(run)
    if results is None:
        return None
    if results["raw"]["images"] == 0:  # no image is no measurement: never a 0% top-1, never a best
        saved = "last.pth is saved" if checkpoint.save(run, state) else "see the warning: last.pth is the previous one"
        raise UserError(f"none of the {len(run.data.val_set)} validation images could be read (see the warnings "
                        f"above): replace or remove them, then continue with --resume auto ({saved})")
    which = max(results, key=lambda k: (results[k]["top1"], k == "ema"))  # ties go to the EMA
    top1 = results[which]["top1"]
    is_best = top1 > state.best_top1 and checkpoint.can_save(run, state)  # best_top1 describes a best.pth on disk
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
    saved = checkpoint.save(run, state, also_best=is_best)
    if not saved and is_best:
        state.best_top1, state.best_weights, state.best_epoch = previous_best
    return saved


# ---------------------------------------------------------------- logging

def log_training(run, state, window, progress, bar):
    """The training figures of the last --print-freq steps: progress bar and TensorBoard (one host sync)."""
    figures = window.read()
    lr = run.optimizer.param_groups[0]["lr"]
    speed = figures["images"] * run.world_size / max(figures["time"], 1e-9)
    bar.set_postfix(loss=f"{figures['loss']:.3f}", top1=f"{figures['top1']:.1f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
    if run.writer is None:
        return
    scalars = {"loss": figures["loss"], "top1": figures["top1"], "lr": lr, "epoch": progress,  # the lr's epoch
               "images_per_sec": speed, "data_wait_fraction": window.data_wait / max(figures["time"], 1e-9),
               "nonfinite_steps": state.nonfinite_steps}
    if run.teacher is not None:
        scalars["kd_loss"] = figures["kd_loss"]
    if run.scaler.is_enabled():
        scalars.update(scaler_skips=state.scaler_skips, loss_scale=run.scaler.get_scale())
    if run.device.type == "cuda":
        scalars["gpu_memory_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    for tag, value in scalars.items():
        run.writer.add_scalar(f"train/{tag}", value, state.step)


def log_augmented_images(writer, images, mean, std):
    import torchvision
    mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in (mean, std))
    grid = torchvision.utils.make_grid((images[:32].float() * std + mean).clamp(0, 1), nrow=8)
    writer.add_image("train/augmented_batch", grid.cpu(), 0)


def log_compile_time(run, state, figures, start, data_wait):
    figures.sum().item()  # wait for the device, once
    seconds = time.perf_counter() - start - data_wait
    if run.rank == 0:
        tqdm.write(f"torch.compile: the first step took {seconds:.1f}s (compiling)")
    if run.writer:
        run.writer.add_scalar("perf/compile_first_step_sec", seconds, state.step)


def report_epoch(run, state, figures):
    cfg, seconds = run.config, figures["time"]
    print0(f"epoch {state.epoch}/{cfg.epochs}: train loss {figures['loss']:.4f} top-1 {figures['top1']:.2f}% "
           f"({seconds:.1f}s, {figures['images'] / max(seconds, 1e-9):.0f} img/s)")
    if run.writer:
        for tag, value in (("train_loss", figures["loss"]), ("train_top1", figures["top1"]), ("time_sec", seconds)):
            run.writer.add_scalar(f"epoch/{tag}", value, state.step)
    skipped = run.data.train_set.skipped + run.data.val_set.skipped
    if skipped:
        print0(f"warning: {plural(skipped, 'unreadable image')} skipped so far (see the lines above)")


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
    print0("  " + " | ".join(line) + (f"  * new best ({new_best})" if new_best else ""))


def announce_run(run):
    """The start-up lines: device, precision, model, data, batch, and the recipe and its batch scaling."""
    cfg, splits, world_size = run.config, run.data.splits, run.world_size
    processes = (f"x{world_size} (torchrun, DDP, process group {utils.backend_name()})" if utils.is_distributed()
                 else "x1")
    params, madds = model_lib.count_params(run.net), model_lib.count_madds(run.net, cfg.img_size)
    global_batch = cfg.batch_size * cfg.accum_steps * world_size
    print0(f"device {run.device} {processes} | precision {run.precision} | channels_last {cfg.channels_last}"
           f" | MobileNetV3-{cfg.arch.capitalize()} {cfg.width_mult:g}: {params / 1e6:.2f}M params, "
           f"{madds / 1e6:.1f}M MAdds at {cfg.img_size}px")
    print0(f"data {run.data.path} ({splits.layout}{', demo' if cfg.data_path is None else ''}): "
           f"{len(splits.train)} train / {len(splits.val)} val images, {plural(len(splits.classes), 'class')} | "
           f"batch {cfg.batch_size} x {cfg.accum_steps} x {world_size} = {global_batch} | {run.steps_per_epoch} "
           f"steps/epoch, {plural(cfg.epochs, 'epoch')}")
    if cfg.config:
        print0(f"recipe {cfg.config}: " + " ".join(f"{key}={value}" for key, value in vars(cfg).items()
                                                   if key not in flags.RESUME_QUIET_FLAGS | {"config"}))
    if cfg.lr_base_batch:
        print0(f"batch scaling: global batch {global_batch} for the {cfg.lr_base_batch} the recipe's lr "
               f"belongs to: lr {cfg.lr:g} -> {run.lr:.6g} ({cfg.lr_scaling}), EMA decay {cfg.ema_decay:g} "
               f"-> {run.ema_decay:.8g} per step")


def open_tensorboard(run, state):
    if run.rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter
    # purge_step drops events a killed run wrote after its last checkpoint: no duplicated steps on resume
    return SummaryWriter(os.path.join(run.config.log_dir, run.config.run_name), purge_step=state.step + 1)


def close_tensorboard(run, state, outcome):
    if run.writer is None:
        return
    if outcome == Outcome.DONE:  # one hparams entry per run, with its final figures
        final = {f"hparam/{k}": v for k, v in state.metrics.items() if isinstance(v, (int, float))}
        hparams = {k: v for k, v in vars(run.config).items() if isinstance(v, (int, float, str, bool))}
        run.writer.add_hparams(hparams, final or {"hparam/best_top1": state.best_top1}, run_name=".")
    run.writer.close()


def report_outcome(run, state, outcome):
    """The last lines of a run; a run that diverged ends with an error (exit 2)."""
    cfg = run.config
    if outcome == Outcome.DIVERGED:
        raise UserError(f"the loss was not finite for {MAX_NONFINITE_STREAK} steps in a row at step {state.step}: "
                        f"training stopped, last good checkpoint kept in {cfg.output_dir}. "
                        "Try a lower --lr or --clip-grad-norm")
    if outcome in (Outcome.STOPPED, Outcome.NOT_SAVED):
        signals = [name for name in utils.gather_objects(run.stop.signal_name) if name]  # it may reach one rank
        why = f"{signals[0]} received" if signals else f"--max-steps {cfg.max_steps} reached"
        if outcome == Outcome.STOPPED:
            print0(f"{why}: saved {os.path.join(cfg.output_dir, 'last.pth')} at step {state.step}. Resume "
                   "with the same command plus --resume auto")
        else:
            print0(f"{why}: the weights were not saved (see the warning); the previous checkpoint is kept")
    if outcome == Outcome.DONE:
        data_flag = "" if cfg.data_path is None else f" --data-path {cfg.data_path}"
        overflow = (f", {state.scaler_skips} fp16 overflow steps skipped by the GradScaler"
                    if run.scaler.is_enabled() else "")
        print0(f"done: best top-1 {state.best_top1:.2f}% ({state.best_weights} weights) after "
               f"{plural(cfg.epochs, 'epoch')}, {state.nonfinite_steps} non-finite steps skipped{overflow}")
        print0(f"evaluate:    python evaluate.py {os.path.join(cfg.output_dir, 'best.pth')}{data_flag}")
        print0(f"tensorboard: tensorboard --logdir {cfg.log_dir}")


# ---------------------------------------------------------------- building a run

@dataclasses.dataclass
class Data:
    """A run's dataset, as this rank reads it."""
    path: str                        # the data folder (the demo's when --data-path is omitted)
    splits: layouts.DataSplits       # layout, classes and the train/val file indexes
    train_set: torch.utils.data.Dataset
    val_set: dataset.ValidationImageFiles
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader


@dataclasses.dataclass
class Run:
    """What the loop uses, built once by main (tools/benchmark.py builds one around a bare model with build_trainer).
    Only `writer` is set later. The run's progress is not here: it is the TrainState, which a checkpoint saves."""
    config: object                   # the flags with every default resolved (flags.resolve_config); never changed
    device: torch.device
    net: nn.Module                   # the model itself: what is saved, validated and resumed
    model: nn.Module                 # what trains: net, or DDP(net), maybe compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler     # enabled for fp16 only
    autocast: object                 # a function returning the autocast context (utils.precision_for)
    precision: str                   # its name, for the start-up line
    ema: ForeachEMA | None
    criterion: nn.Module
    lr: float                        # --lr and --ema-decay for this run's global batch (flags.scaled_to_global_batch)
    ema_decay: float
    steps_per_epoch: int
    ddp: DistributedDataParallel | None = None
    teacher: nn.Module | None = None
    mixup: object = None             # dataset.make_mixup_cutmix, or None
    data: Data | None = None         # None for the benchmark's model-only step
    rank: int = 0
    world_size: int = 1
    stop: utils.StopRequest | None = None
    writer: object = None            # TensorBoard's SummaryWriter on rank 0
    show_progress: bool = True


def build_data(config, rank, world_size, device):
    """The datasets and loaders of this rank."""
    path = config.data_path or DEMO_DIR
    splits = layouts.find_dataset(path)
    if splits.val is not None and config.val_split_fraction:
        raise UserError(f"--val-split-fraction: {path} has a validation split already ({splits.layout})")
    if splits.val is None and config.val_split_fraction:  # drawn once, then the resumed run's own files
        recorded = checkpoint.recorded_val_split(config)
        train, val = (layouts.split_validation(splits.train, config.val_split_fraction, config.seed)
                      if recorded is None else layouts.hold_out(splits.train, recorded))
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


def build_model(config, num_classes, device, world_size):
    """The network on its device, with --pretrained weights, SyncBatchNorm and channels_last when asked."""
    net = model_lib.build_model(config.arch, config.width_mult, num_classes, dropout=config.dropout,
                                bn_momentum=config.bn_momentum)
    if config.pretrained:
        try:
            model_lib.load_pretrained(net, checkpoint.pretrained_state(config.pretrained))
        except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            reason = "not a readable state dict" if isinstance(e, pickle.UnpicklingError) else e
            raise UserError(f"--pretrained {config.pretrained}: {reason}") from None
    if config.sync_bn and world_size > 1:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU)")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return place_model(net, config, device)


def place_model(net, config, device):
    """The network on the training device, in the memory format --channels-last asks for."""
    return net.to(device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)


def load_teacher(config, classes, num_classes, device):
    """The teacher of --teacher, frozen, in eval mode, on the training device."""
    import evaluate
    with torch.random.fork_rng(devices=[]):  # building it must not move the student's random stream
        teacher, info = evaluate.load_model_for_eval(config.teacher)
    outputs = info["config"]["num_classes"]
    if info["norm"] != config.norm:
        raise UserError(f"--teacher {config.teacher} was trained with --norm {info['norm']}, this run uses --norm "
                        f"{config.norm}: the teacher would see wrongly normalized images")
    if info["classes"] is not None and list(info["classes"][:len(classes)]) != list(classes):
        raise UserError(f"--teacher {config.teacher} was trained on other classes than this dataset's")
    if outputs != num_classes:
        raise UserError(f"--teacher {config.teacher} has {outputs} outputs, this model {num_classes}")
    return place_model(teacher.eval().requires_grad_(False), config, device)


def build_trainer(config, net, device, steps_per_epoch, world_size=None, **parts):
    """A Run around a network on its device: optimizer, EMA, precision, loss, DDP and torch.compile wrappers; `parts`
    are Run's other fields (data, teacher, ...). tools/benchmark.py times the real update step on a Run built here."""
    if world_size is None:  # the process group's, when there is one: DDP, the lr and the EMA decay agree
        world_size = torch.distributed.get_world_size() if utils.is_distributed() else 1
    lr, ema_decay = flags.scaled_to_global_batch(config, world_size)
    autocast, scaler, precision = utils.precision_for(device, config.amp, config.amp_dtype)
    ddp = None
    if utils.is_distributed():
        # DDP first, then torch.compile: dynamo then splits the graph at DDP's bucket boundaries, so gradient
        # all-reduces overlap the backward pass (PyTorch's recommended order)
        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    model = net if ddp is None else ddp
    if config.compile:
        model = torch.compile(model)
    return Run(config=config, device=device, net=net, model=model, ddp=ddp, world_size=world_size,
               optimizer=make_optimizer(net, config, device), autocast=autocast, precision=precision,
               scaler=scaler or torch.amp.GradScaler(device.type, enabled=False),  # a no-op without fp16
               ema=make_ema(net, ema_decay), criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
               lr=lr, ema_decay=ema_decay, steps_per_epoch=steps_per_epoch, **parts)


def build_run(config, rank=0, world_size=1, device=torch.device("cpu"), stop=None):
    """Data, model, optimizer, EMA and the rest of what trains, for this rank; nothing runs yet. Every rank-local
    failure here reaches every rank (utils.fail_together), so no rank waits for a peer that stopped."""
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training shapes: pick the fastest convolution algorithms
    utils.seed_everything(config.seed + rank)
    utils.fail_together(prepare_folders, config, rank)
    data = utils.fail_together(build_data, config, rank, world_size, device)
    classes = data.splits.classes
    num_classes = config.num_classes or len(classes)
    if num_classes < len(classes):
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(classes)} classes in the data")
    net = utils.fail_together(build_model, config, num_classes, device, world_size)
    teacher = utils.fail_together(load_teacher, config, classes, num_classes, device) if config.teacher else None
    mixup = dataset.make_mixup_cutmix(config.mixup_alpha, config.cutmix_alpha, num_classes)
    return build_trainer(config, net, device, len(data.train_loader) // config.accum_steps, data=data,
                         teacher=teacher, mixup=mixup, rank=rank, world_size=world_size, stop=stop,
                         show_progress=rank == 0)


def prepare_folders(config, rank):
    """The run's checkpoint and TensorBoard folders, and the demo data when no --data-path is given (rank 0)."""
    if rank == 0:
        checkpoint.prepare_run_folders(config)
        if config.data_path is None:
            from tools.demo_data import make_demo_dataset  # the demo run alone needs it
            make_demo_dataset(DEMO_DIR)


# ---------------------------------------------------------------- main: the recipe

def main(args):
    utils.check_versions()
    flags.validate_args(args)
    rank, world_size, device = utils.setup_distributed(args.device)
    try:
        with utils.StopRequest() as stop:  # SIGTERM/Ctrl-C: finish the step, save, exit
            return train_run(args, rank, world_size, device, stop)
    finally:
        checkpoint.unlock_run_folders()


def train_run(args, rank, world_size, device, stop):
    output_dir, run_name, followed_latest = utils.broadcast_object(
        checkpoint.choose_run_folder(args) if rank == 0 else None)
    config = flags.resolve_config(args, device, output_dir, run_name)
    run = build_run(config, rank, world_size, device, stop)
    if rank == 0:
        checkpoint.point_latest_at(config.output_dir)
    state = TrainState()
    outcome = Outcome.COMPLETE
    if checkpoint.resume_if_asked(run, state, followed_latest):
        run.writer = open_tensorboard(run, state)
        announce_run(run)
        try:
            outcome = train_epochs(run, state)
        finally:  # an error too keeps the events written so far
            close_tensorboard(run, state, outcome)
    report_outcome(run, state, outcome)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, flags.parse_args()))
