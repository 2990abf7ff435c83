"""Speed and memory of this project's training, each figure measured side by side with its alternatives.

    python -m tools.benchmark                               # everything: about 3-5 minutes on a 2-core CPU
    python -m tools.benchmark --quick --json bench.json     # shorter windows; every window of every figure as JSON
    python -m tools.benchmark --device cuda --quick         # a GPU session, in under 3 minutes
    python -m tools.benchmark --inference-only --arch small # section I alone: PyTorch vs ONNX fp32 vs int8
    python tools/benchmark.py --busy 0 --compile            # the same tool; no loaded comparison, torch.compile too

It times train.py's own update step (train.train_step) and loop (train.train_one_epoch), dataset.py's loader and
evaluate.evaluate, never copies: 1 model-only step, 2 vs torchvision, 3 full pipeline (quiet and next to --busy
processes), 4 data, 5 evaluation, 6 memory, C train.py's default choices, I CPU inference, G GPU decoding. A figure
is the median of --windows windows taken in turns with its rivals. docs/performance.md says what each section
compares and how, and holds the measured figures.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for python tools/benchmark.py
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: sleeping, not spinning, OpenMP threads

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import itertools
import json
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from unittest import mock

import numpy as np
import psutil
import torch
import torch.nn as nn
import torch_ema
import torchvision
from PIL import Image
from torch.utils.benchmark import Timer
from torchvision import transforms as pil_transforms

import checkpoint
import dataset
import decode
import evaluate
import flags
import layouts
import model as model_lib
import train
import utils
from tools.resize_copy import make_resized_copy
from utils import DataError, UserError, plural

SAMPLE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "imagenet-sample")
TARGETS = {"ours_vs_torchvision": 1.0, "full_vs_model": 0.9, "full_vs_model_busy": 0.8, "loader_vs_imagefolder": 1.4,
           "int8_vs_fp32": 1.5}
QUICK = {"windows": 3, "window_seconds": 0.5, "index_files": 20_000, "index_entries": 320_000}
SECTIONS = "123456ICG"  # the table's order: the six figures, inference, train.py's choices, GPU decoding
INFERENCE_BATCHES = (1, 32)  # latency of one image, throughput of a batch
LOADER_BATCHES = 8  # batches per step of the loader-alone comparison
RESIZED_SHORT_SIDE = 320  # the pre-resized copy docs/data-pipeline.md suggests
MEMORY_PROBE_STEPS = 5
MODEL_ONLY_EPOCH = 10**6  # the model-only step's epoch length: it only places the LR schedule (in its warm-up)


def get_args_parser():
    parser = argparse.ArgumentParser(description="Benchmark this project's training against the alternatives.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--arch", default="large", choices=model_lib.ARCHS, help="MobileNetV3 variant")
    add("--width-mult", type=float, default=0.5, help="width multiplier (train.py's default)")
    add("-b", "--batch-size", type=int, default=None, help="default: 16 on a CPU (minutes), train.py's 128 elsewhere")
    add("--img-size", type=int, default=224, help="training crop size")
    add("--device", default="auto", help="auto, cuda, mps or cpu")
    add("-j", "--workers", type=int, default=None, help="loader processes (default: train.py's)")
    add("--threads", type=int, default=None, help="torch threads (default: torch's, one per core, compared with 1)")
    add("--data-path", default=None, help="ImageNet layout or a folder of JPEGs (default: "
                                          "../shared/data/imagenet-sample, else generated photo-like JPEGs)")
    add("--max-images", type=int, default=1000, help="at most this many images from --data-path")
    add("--json", default=None, metavar="FILE", help="write every figure and window as JSON")
    add("--windows", type=int, default=5, help="timed windows per figure (the median is shown)")
    add("--window-seconds", type=float, default=1.0, help="target length of a window")
    add("--steps", type=int, default=None, help="fixed steps per window instead")
    add("--index-files", type=int, default=100_000, help="files of the tree the indexing test lists (0: skip it)")
    add("--index-entries", type=int, default=1_280_000, help="entries of the worker-memory test's index (0: skip it)")
    add("--memory-workers", type=int, default=4, help="workers of the worker-memory test")
    add("--busy", type=int, default=2, help="section 3 again next to this many processes spinning a core each at "
                                            "this process's priority (0: skip it)")
    add("--busy-seconds", type=float, default=300, help="a busy process ends itself after this long, should this "
                                                        "process die without ending it")
    add("--compile", action="store_true", help="also time torch.compile (minutes of compiling on a CPU)")
    add("--gpu-decode", action=argparse.BooleanOptionalAction, default=None,
        help="nvjpeg against CPU decoding, and train.py's loop with --decode-on device (default: on with CUDA)")
    add("--inference", action=argparse.BooleanOptionalAction, default=True,
        help="section I: PyTorch eager vs ONNX fp32 vs ONNX int8 on the CPU (export.py's files)")
    add("--inference-only", action="store_true", help="run section I alone")
    add("--calib-images", type=int, default=64, help="section I: int8 calibration images")
    add("--quick", action="store_true", help=f"shorter windows and smaller index tests: {QUICK}")
    return parser


# ---------------------------------------------------------------- timing

@dataclasses.dataclass(eq=False)
class Variant:
    """One contender: run(steps) does `steps` steps of `items` images (or other items) each. The other fields say how
    its row reads; its ratio is to the `versus` variant's rate, round by round."""
    name: str
    run: object
    items: int
    key: str = None  # its figure in the JSON
    versus: "Variant" = None
    label: str = ""  # what the ratio means
    target: float = None
    choice: bool = False  # an alternative to a default of train.py's: the row says faster, slower or same
    note: str = ""
    threads: int = None
    settle: object = None  # runs after each of its windows, untimed
    whole_windows: bool = False  # a window is one call: train.py's loop, which ends each call with a host sync
    steps: int = None  # per window, once measured


def compare(variants, settings):
    """Items per second of each variant in every round, {name: [rate]}, for train.py's loop and the loaders, whose
    workers run beside the timed code: a warm-up step (lazy initialisation, worker start-up), a timed one that sets
    a window's steps; a window past 3x its target (the machine got busy) ends early and counts what it did."""
    for v in variants:
        with num_threads(v.threads):
            step_time = timed(v.run, settings.device)
            if step_time < 2 * settings.window_seconds:  # else the first step is estimate enough
                step_time = timed(v.run, settings.device)
        v.steps = settings.steps or max(1, min(1000, round(settings.window_seconds / step_time)))
        if v.settle:
            v.settle()

    def window(v):
        with num_threads(v.threads):
            sync(settings.device)
            start, done = time.perf_counter(), 0
            if v.whole_windows:
                v.run(v.steps)
                done = v.steps
            while done < v.steps:
                v.run(1)
                done += 1
                if not settings.steps and time.perf_counter() - start > 3 * settings.window_seconds:
                    break
            sync(settings.device)
            return done * v.items / (time.perf_counter() - start)
    return in_turns(variants, settings, window)


def compare_with_timer(variants, settings):
    """compare for calls in this process (no workers, no whole windows): torch.utils.benchmark's Timer times each
    window after its own warm-up, with the variant's threads (default: torch's), syncing the accelerator."""
    def window(v):
        timer = Timer("run(1)", globals={"run": v.run}, num_threads=v.threads or torch.get_num_threads())
        measured = (timer.timeit(settings.steps) if settings.steps
                    else timer.blocked_autorange(min_run_time=settings.window_seconds))
        v.steps = measured.number_per_run * len(measured.raw_times)
        return v.items / measured.mean
    return in_turns(variants, settings, window)


def in_turns(variants, settings, window):
    """{name: [window(variant) of each round]}: one window each per round, in a new order each round (no variant
    always follows the same one), so that a change of the machine's load slows them alike and the rounds pair up."""
    rates = {v.name: [] for v in variants}
    for round_ in range(settings.windows):
        for v in random.Random(round_).sample(variants, len(variants)):
            rates[v.name].append(window(v))
            if v.settle:
                v.settle()
    return rates


@contextlib.contextmanager
def num_threads(threads):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sync(device):
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def timed(run, device):
    """Seconds of one step."""
    sync(device)
    start = time.perf_counter()
    run(1)
    sync(device)
    return time.perf_counter() - start


def repeated(call):
    """run(steps) for a Variant whose step is one call."""
    def run(steps):
        for _ in range(steps):
            call()
    return run


def paired_ratios(rates, base):
    """rates / base round by round: the windows of one round ran back to back, under the same load."""
    return [a / b for a, b in zip(rates, base)]


# ---------------------------------------------------------------- processes and memory (psutil)

# A busy process: spins until its deadline, or until its parent is gone (then it is an orphan nobody will end).
# It ignores Ctrl-C, which reaches the whole process group: the benchmark ends it, without a traceback from it.
BUSY_LOOP = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
deadline, parent = time.monotonic() + float(sys.argv[1]), os.getppid()
while time.monotonic() < deadline and os.getppid() == parent:
    pass
"""
busy_pids = set()  # the busy processes running now (wait_until_idle leaves them out)


@contextlib.contextmanager
def busy_processes(count, seconds):
    """count processes spinning a core each at this process's priority for the block: yields their Popen objects.
    Each ends itself after `seconds` at the latest; all are ended and waited for however the block is left."""
    processes = []
    try:
        for _ in range(count):
            processes.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(seconds)],
                                              stdin=subprocess.DEVNULL))
            busy_pids.add(processes[-1].pid)
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            busy_pids.discard(process.pid)


def child_pids():
    """This process's children and theirs alive now (loader workers, busy processes)."""
    return [child.pid for child in psutil.Process().children(recursive=True)]


def cpu_use(processes):
    """(CPU seconds used, how many are running or waiting for a core) of processes, leaving out those gone. The
    state is a process's main thread's, the one a loader worker decodes in."""
    seconds, running = 0.0, 0
    for process in processes:
        with contextlib.suppress(psutil.Error), process.oneshot():
            times = process.cpu_times()
            seconds += times.user + times.system
            running += process.status() == psutil.STATUS_RUNNING
    return seconds, running


def wait_until_idle(timeout=10.0):
    """Wait until the loader workers stop using CPU: the queues they refill after a pipeline's window must not be
    billed to the next window. Idle: their CPU time did not grow since the last poll and none is running or waiting
    for a core (one waiting uses no CPU time on a loaded machine). The busy processes never idle: not watched."""
    workers = [child for child in psutil.Process().children(recursive=True) if child.pid not in busy_pids]
    last = cpu_use(workers)[0]
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        time.sleep(0.02)
        seconds, running = cpu_use(workers)
        if seconds == last and not running:
            return
        last = seconds


def memory_mb(pid=None):
    """{"rss", "peak_rss", "pss", "uss"} of a process in MB, None where unknown: psutil's (PSS on Linux only), and the
    peak (VmHWM), which psutil does not report, from Linux's /proc."""
    out = dict.fromkeys(("rss", "peak_rss", "pss", "uss"))
    with contextlib.suppress(psutil.Error):
        memory = psutil.Process(pid).memory_full_info()._asdict()
        out.update({name: memory[name] / 2**20 for name in ("rss", "pss", "uss") if name in memory})
    with contextlib.suppress(OSError, StopIteration):
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            out["peak_rss"] = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    return out


def total(values):
    values = [v for v in values if v is not None]
    return sum(values) if values else None


# ---------------------------------------------------------------- train.py's step and loop, at train.py's defaults

def train_config(settings, *argv, **overrides):
    """train.py's configuration at its defaults for the device (flags.resolve_config): argv as on its command line,
    overrides for what a comparison changes."""
    parsed = flags.get_args_parser().parse_args(["--arch", settings.arch, "--width-mult", str(settings.width_mult),
                                                 "-b", str(settings.batch_size), "--img-size", str(settings.img_size),
                                                 "--save-every-minutes", "0", *argv])  # no save in a timed window
    flags.validate_args(parsed)
    return flags.resolve_config(argparse.Namespace(**{**vars(parsed), **overrides}), settings.device)


def make_trainer(config, device, net=None):
    """A train.Run from train.build_trainer (optimizer, EMA, precision, loss, torch.compile with --compile) around
    net, by default the network train.py trains (1000 classes)."""
    if net is None:
        net = model_lib.build_model(config.arch, config.width_mult, 1000, dropout=config.dropout,
                                    bn_momentum=config.bn_momentum)
    net = train.place_model(net, config, device).train()
    return train.build_trainer(config, net, device, steps_per_epoch=MODEL_ONLY_EPOCH, show_progress=False)


def implementation(optimizer):
    options = optimizer.defaults
    return "fused" if options.get("fused") else "foreach" if options.get("foreach") else "for-loop"


def model_only(name, trainer, settings, batch_size=None, img_size=None, **row):
    """train.py's update step, train.train_step, on one synthetic batch already normalized on the device."""
    batch_size, img_size = batch_size or settings.batch_size, img_size or settings.img_size
    images = torch.randn(batch_size, 3, img_size, img_size, device=trainer.device)
    if trainer.config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch_size,), device=trainer.device)
    skips, params = train.SkippedSteps(trainer.net, train.TrainState(), trainer.scaler), list(trainer.net.parameters())

    def run(steps):
        for _ in range(steps):
            train.train_step(trainer.model, params, [(images, targets)], trainer.lr, trainer.optimizer,
                             trainer.scaler, trainer.autocast, trainer.criterion, skips, ema=trainer.ema)
    return Variant(name, run, batch_size, **row)


def repeat_index(index, length):
    """A FileIndex of `length` entries cycling through index's files: long epochs from few files."""
    reps = -(-length // len(index))
    return layouts.FileIndex(index.root, np.tile(index.paths, reps)[:length], np.tile(index.labels, reps)[:length])


class Pipeline:
    """train.py's own loop, train_one_epoch, on a train.Run from train.build_run over the JPEGs in root/train. Each
    run(steps) is an epoch of `steps` steps; the loader's iterator lives across the calls, so that windows measure
    the steady state, not the start of an epoch (ImageNet's are long)."""

    def __init__(self, settings, root, out_folder, workers, decode_on="workers", worker_nice=None):
        config = train_config(settings, "--data-path", root, "--workers", str(workers), "--decode-on", decode_on,
                              "--output-dir", os.path.join(out_folder, "ckpt"), "--log-dir", out_folder)
        with contextlib.redirect_stdout(sys.stderr):
            run = train.build_run(config, device=settings.device)
        data = run.data
        # the few hundred images, repeated: an "epoch" of 500 batches; the workers start with the first window
        data.train_set.index = repeat_index(data.train_set.index, settings.batch_size * 500)
        data.train_loader.sampler.num_samples = len(data.train_set)
        if worker_nice is not None:  # instead of train.py's choice, to show what that choice is worth
            data.train_loader.worker_init_fn = functools.partial(dataset.start_worker, worker_nice)
        live = dataclasses.replace(data, train_loader=LiveLoader(data.train_loader))
        self.base_run, self.state = dataclasses.replace(run, data=live, show_progress=False), train.TrainState()
        self.epochs = {}  # the run with steps_per_epoch = steps, for each window size

    def run(self, steps):
        if steps not in self.epochs:
            self.epochs[steps] = dataclasses.replace(self.base_run, steps_per_epoch=steps)
        # each window is a fresh epoch 0 of `steps` steps: its LR warms up within the window (speed is the same)
        self.state.epoch = self.state.batch_in_epoch = 0
        if train.train_one_epoch(self.epochs[steps], self.state)[0] != train.Outcome.DONE:  # diverged
            raise UserError(f"the loss was not finite for {train.MAX_NONFINITE_STREAK} steps in a row in the "
                            "full-pipeline benchmark")

    def close(self):
        self.base_run = self.epochs = None  # persistent workers exit when their iterator is freed
        gc.collect()


class LiveLoader:
    """A loader whose every epoch goes on with the same iterator (a new one only when it runs out)."""

    def __init__(self, loader):
        self.loader, self.batches = loader, None  # its workers start with the first window, not before
        self.sampler = loader.sampler  # train_one_epoch sets its epoch (the live iterator keeps its own order)

    def __iter__(self):
        while True:
            fresh = self.batches is None
            if fresh:
                self.batches = iter(self.loader)
            yielded = False
            for batch in self.batches:
                yielded = True
                yield batch
            self.batches = None
            if fresh and not yielded:  # an empty loader would otherwise be restarted forever
                raise UserError("the full-pipeline benchmark's loader yields no batch: too few images for -b?")


def refilled(run):
    """A Pipeline's run, then the wait until its workers have refilled their queues, both timed: each window pays for
    decoding every batch it trained on. Under load a window is 1-2 steps on 2 cores, and full queues (4 batches a
    worker) at its start would hide a worker slower than the model."""
    def run_and_refill(steps):
        run(steps)
        wait_until_idle()
    return run_and_refill


# ---------------------------------------------------------------- sections 1-3, 5, 6: training and evaluation

def bench_training(report, settings, root, folder):
    """Sections 1-3 in one comparison, so that every ratio pairs windows run back to back: the model-only step with
    train.py's defaults and with one changed, this model against torchvision's at width 1.0 (the same architecture),
    and train.py's loop from JPEG files. Returns the default trainer and its model-only rates."""
    device, config = settings.device, train_config(settings)
    default = make_trainer(config, device)
    described = (f"{default.precision}, {'channels_last' if config.channels_last else 'contiguous'}, "
                 f"{type(default.optimizer).__name__} {implementation(default.optimizer)}"
                 + (f", {plural(torch.get_num_threads(), 'thread')}" if device.type == "cpu" else ""))
    base = model_only(f"model-only step ({described}) [{settings.arch} {settings.width_mult:g}, "
                      f"{settings.batch_size} x {settings.img_size}px]", default, settings, key="model_only")
    choice = {"versus": base, "label": "of default", "choice": True}
    flipped = train_config(settings, channels_last=not config.channels_last)
    layout = "on" if flipped.channels_last else "off"
    steps = [base, model_only(f"  channels_last {layout}", make_trainer(flipped, device), settings,
                              key=f"model_only_channels_last_{layout}", **choice)]
    # on a CPU, 1 thread against torch's one per core (or the other way round); --threads fixes them
    other_threads = None
    if device.type == "cpu" and not settings.threads and max(torch.get_num_threads(), utils.cpu_cores()) > 1:
        other_threads = 1 if torch.get_num_threads() > 1 else utils.cpu_cores()
        steps.append(model_only(f"  {plural(other_threads, 'thread')}", default, settings, threads=other_threads,
                                key="model_only_" + plural(other_threads, "thread").replace(" ", "_"), **choice))
    tv_name = model_lib.TORCHVISION_BUILDERS[settings.arch]  # random weights, 1000 classes
    tv = model_only(f"torchvision {tv_name}", make_trainer(config, device, getattr(torchvision.models, tv_name)()),
                    settings, key="torchvision")
    ours = base if settings.width_mult == 1.0 else model_only(
        f"this project's {settings.arch} 1.0 (same loop and defaults)",
        make_trainer(train_config(settings, width_mult=1.0), device), settings, key="ours_width_1")

    def loop(name, run, key, **row):
        return Variant(name, run, settings.batch_size, key, versus=base, label="full/model", settle=wait_until_idle,
                       whole_windows=True, **row)
    # train.py's default workers; fewer (on CUDA against decoding on the GPU); at a lower priority; the JPEGs
    # decoded in the training process (--decode-on device)
    pipelines = {"full_pipeline": Pipeline(settings, root, folder, settings.workers)}
    full = pipelines["full_pipeline"].run
    loops = [loop(f"full pipeline, {plural(settings.workers, 'worker')} (train.py default)", full, "full_pipeline",
                  target=TARGETS["full_vs_model"]),
             loop("  the same, the queue's refill timed", refilled(full), "full_pipeline_refill_timed")]
    others = {f"full_pipeline_{n}_worker": (n, "workers", None, "") for n in [1] + [2, 4] * (device.type == "cuda")
              if n < settings.workers}
    if device.type == "cpu":  # the workers share the cores with the model: would a lower priority help?
        others["full_pipeline_workers_nice_10"] = (settings.workers, "workers", 10, ", workers at nice 10")
    for n in (1, 2) if settings.gpu_decode else ():  # on a CPU (when asked) the training process decodes
        others[f"full_pipeline_gpu_decode_{plural(n, 'worker').replace(' ', '_')}"] = (
            n, "device", None, f", JPEGs decoded on {device.type}")
    for key, (workers, decode_on, nice, where) in others.items():
        pipelines[key] = Pipeline(settings, root, folder, workers, decode_on, nice)
        loops.append(loop(f"full pipeline, {plural(workers, 'worker')}{where}", pipelines[key].run, key))
    if other_threads:
        loops.append(loop(f"full pipeline, {plural(settings.workers, 'worker')}, {plural(other_threads, 'thread')}",
                          full, "full_pipeline_other_threads", threads=other_threads))

    models = [tv] if ours is base else [ours, tv]
    rates = compare([*steps, *models, *loops], settings)
    report.rates("1", steps, rates)
    report.rates("2", models, rates)
    report.add("2", f"  this project / torchvision ({settings.arch} 1.0)", key="ours_vs_torchvision",
               ratio=paired_ratios(rates[ours.name], rates[tv.name]), target=TARGETS["ours_vs_torchvision"])
    report.rates("3", loops, rates)
    if settings.busy > 0:
        bench_under_load(report, settings, default, pipelines, rates[base.name])
    for pipe in pipelines.values():
        pipe.close()
    return default, rates[base.name]


def bench_under_load(report, settings, trainer, pipelines, quiet_rates):
    """Section 3 again while --busy processes spin a core each, at this process's priority, for this comparison
    only: the model-only step and the full pipeline take turns as in the quiet comparison."""
    busy = plural(settings.busy, "busy process")
    model = model_only(f"model-only step, {busy}", trainer, settings)
    full, nice = pipelines["full_pipeline"].run, pipelines.get("full_pipeline_workers_nice_10")
    row = {"versus": model, "label": "full/model", "settle": wait_until_idle, "whole_windows": True}
    loops = [Variant(f"full pipeline, {plural(settings.workers, 'worker')}, {busy}", refilled(full),
                     settings.batch_size, "full_pipeline_busy", target=TARGETS["full_vs_model_busy"], **row),
             Variant("  the same, the queue refilled between windows (untimed)", full, settings.batch_size,
                     "full_pipeline_busy_refill_untimed", **row)]
    if nice:  # what a lower worker priority does under load (train.py's earlier default)
        loops.append(Variant("  the same, workers at nice 10", refilled(nice.run), settings.batch_size,
                             "full_pipeline_busy_workers_nice_10", **row))
    with busy_processes(settings.busy, settings.busy_seconds) as processes:
        rates = compare([model, *loops], settings)
        ended = sum(process.poll() is not None for process in processes)
    for v in loops:
        v.note = f"{ended} busy processes ended before the comparison did: raise --busy-seconds" if ended else ""
    report.add("3", model.name, rates[model.name], "img/s", "model_only_busy", variant=model, label="of quiet",
               ratio=statistics.median(rates[model.name]) / statistics.median(quiet_rates),
               note=loops[0].note or "medians of two comparisons, not paired")
    report.rates("3", loops, rates)


def bench_eval(report, settings, trainer, splits):
    """Section 5: evaluate.evaluate (what evaluate.py and validation run) over a val loader, one pass a step."""
    images = settings.batch_size * max(4, 2 * settings.workers)
    transform = dataset.val_transform(round(settings.img_size / 0.875), settings.img_size)
    val_set = dataset.ImageFiles(repeat_index(splits.val or splits.train, images), transform)
    loader = dataset.build_loader(val_set, dataset.EpochSampler(len(val_set), shuffle=False), settings.batch_size,
                                  settings.workers, train=False, pin_memory=settings.device.type == "cuda")

    def run(steps):
        for _ in range(steps):
            evaluate.evaluate(trainer.net, loader, settings.device, trainer.autocast, trainer.config.norm,
                              trainer.config.channels_last, show_progress=False)
    variants = [Variant(f"evaluation, evaluate.evaluate ({plural(settings.workers, 'worker')}, {images} images a "
                        "pass)", run, images, "evaluation", note="incl. each pass's loader start",
                        settle=wait_until_idle)]
    report.rates("5", variants, compare(variants, settings))
    trainer.net.train()
    variants = loader = None  # its workers exit
    gc.collect()


def bench_memory(report, settings, root, folder):
    """Section 6: the peak memory of a training process and its workers after train.build_run and MEMORY_PROBE_STEPS
    steps. It runs first, so that this process holds nothing else yet and its workers inherit nothing else."""
    pipe = Pipeline(settings, root, os.path.join(folder, "memory"), settings.workers)
    pipe.run(MEMORY_PROBE_STEPS)
    sync(settings.device)
    main, workers = memory_mb(), [memory_mb(pid) for pid in child_pids()]
    report.add("6", "peak RSS, training process", [main["peak_rss"]], "MB", "peak_rss_main",
               note=f"VmHWM after train.build_run and {MEMORY_PROBE_STEPS} steps, before the other sections")
    report.add("6", f"peak RSS, its {plural(len(workers), 'loader worker')} (sum)",
               [total(w["peak_rss"] for w in workers)], "MB", "peak_rss_workers", note="shared pages counted in each")
    report.add("6", "PSS, process + workers", [total([main["pss"]] + [w["pss"] for w in workers])], "MB",
               "pss_total", note="shared pages split between them")
    if settings.device.type == "cuda":
        report.add("6", "peak GPU memory allocated", [torch.cuda.max_memory_allocated(settings.device) / 2**20], "MB",
                   "peak_gpu_memory")
    saves = [timed(lambda steps: checkpoint.save(pipe.epochs[MEMORY_PROBE_STEPS], pipe.state), settings.device)
             for _ in range(3)]  # last.pth of this run, as --save-every-minutes writes it inside an epoch
    pipe.close()
    return saves


def report_save_interval(report, settings, save_seconds, step_rate):
    """What train.py's checkpoint inside an epoch costs: one save against its default interval, and the check every
    step makes (the schedule's clock; the all-reduce that carries it is the stop check's, made anyway)."""
    minutes = flags.get_args_parser().get_default("save_every_minutes")
    schedule = checkpoint.SaveSchedule(minutes, 0)
    state = train.TrainState(step=7)
    check = Timer("schedule.due(state)", globals={"schedule": schedule, "state": state}).blocked_autorange()
    step_seconds = settings.batch_size / step_rate
    report.add("C", f"checkpoint inside an epoch (--save-every-minutes {minutes:g})")
    report.add("C", "  one save of last.pth", save_seconds, "s", "save_seconds",
               ratio=statistics.median(save_seconds) / (60 * minutes), label="of the interval")
    report.add("C", "  the check, every step", [1e6 * check.median], "us", "save_check_us",
               ratio=check.median / step_seconds, label="of a step")


# ---------------------------------------------------------------- section C: the choices behind train.py's defaults

def bench_precision(report, settings):
    """fp32 against bf16 autocast (and fp16 with a GradScaler on CUDA) in train.py's update step."""
    device = settings.device
    emulated = device.type == "cpu" and not utils.cpu_has_native_bf16()
    batch, img_size = settings.batch_size, settings.img_size
    if emulated:  # emulated bf16 is ~10x slower than fp32: a smaller step tells the ratio
        batch, img_size = min(4, batch), max(32, img_size // 2)
    choices = {"fp32": {"amp": False}, "bf16 autocast": {"amp": True, "amp_dtype": "bfloat16"}}
    if device.type == "cuda":
        choices["fp16 autocast + GradScaler"] = {"amp": True, "amp_dtype": "float16"}
    config = train_config(settings)
    default = utils.precision_for(device, config.amp, config.amp_dtype)[2]
    trainers = {name: make_trainer(train_config(settings, **overrides), device) for name, overrides in choices.items()}
    names = sorted(trainers, key=lambda name: trainers[name].precision != default)  # the default first
    base = model_only(f"  {names[0]} (default)", trainers[names[0]], settings, batch, img_size,
                      key="precision_" + names[0].split()[0])
    variants = [base] + [model_only(f"  {name}", trainers[name], settings, batch, img_size, versus=base,
                                    label="of default", choice=True, key="precision_" + name.split()[0])
                         for name in names[1:]]
    rates = compare_with_timer(variants, settings)
    report.add("C", f"precision, model-only step (train.py default: {names[0]})",
               note=f"{batch} x {img_size}px" + (": bf16 is emulated on this CPU" if emulated else ""))
    report.rates("C", variants, rates)


def bench_optimizers(report, settings, step_rate):
    """What runs after backward, alone: Adam foreach (train.py's CPU choice), for-loop and fused (its CUDA choice),
    and train.py's EMA update (one foreach lerp over ~300 tensors) against torch-ema's own Python loop."""
    trainer = make_trainer(train_config(settings), settings.device)
    for param in trainer.net.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    chosen, default = trainer.optimizer, implementation(trainer.optimizer)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in chosen.param_groups]
    adams, unavailable = {}, {}
    for name, option in (("foreach", {"foreach": True}), ("for-loop", {"foreach": False}), ("fused", {"fused": True})):
        try:
            adams[name] = type(chosen)(groups, lr=trainer.lr, **option)
            adams[name].step()
        except (RuntimeError, ValueError) as error:  # e.g. fused Adam on a device without its kernel
            unavailable[name] = str(error).splitlines()[0][:60]
    base = Variant(f"  Adam {default} (default)", repeated(adams[default].step), 1, f"adam_{default}")
    choice = {"label": "x speed of default", "choice": True}
    variants = [base if name == default else Variant(f"  Adam {name}", repeated(adam.step), 1, f"adam_{name}",
                                                     versus=base, **choice) for name, adam in adams.items()]
    lerp = Variant("  EMA update, one foreach lerp (default)", repeated(trainer.ema.update), 1,
                   "ema_update_one_foreach_lerp")
    torch_ema_loop = functools.partial(torch_ema.ExponentialMovingAverage.update, trainer.ema)  # its per-tensor loop
    variants += [lerp, Variant("  EMA update, torch-ema loop", repeated(torch_ema_loop), 1, "ema_update_torch-ema_loop",
                               versus=lerp, **choice)]
    rates = compare_with_timer(variants, settings)
    step_ms = 1000 * settings.batch_size / step_rate
    for v in variants:
        v.note = f"{100 * 1000 / statistics.median(rates[v.name]) / step_ms:.1f}% of a step"
    report.add("C", f"after backward, alone (train.py: Adam {default}, foreach EMA; a training step: {step_ms:.0f} ms)")
    report.rates("C", variants, rates, unit="ms/step")
    for name, why in unavailable.items():
        report.add("C", f"  Adam {name}", note=f"unavailable: {why}")


def bench_compile(report, settings):
    """torch.compile of the model: compile time (the first step) and the steady-state speed against eager."""
    eager = model_only("  eager", make_trainer(train_config(settings), settings.device), settings, key="compile_eager")
    compiled = model_only("  compiled", make_trainer(train_config(settings, compile=True), settings.device),
                          settings, key="compile_compiled", versus=eager, label="of eager", choice=True)
    seconds = timed(compiled.run, settings.device)
    rates = compare_with_timer([eager, compiled], settings)
    report.add("C", "torch.compile, model-only step")
    report.add("C", "  compile (first step)", [seconds], "s", "compile_seconds")
    report.rates("C", [eager, compiled], rates)


# ---------------------------------------------------------------- section 4: data

def start_worker_with_torchvision_decoder(nice, worker_id):
    """dataset.start_worker, then torchvision's decode_jpeg in this worker (decode_jpeg_cpu's fallback without
    TorchCodec): set in the worker, so it holds under fork and spawn and the parent keeps TorchCodec."""
    dataset.start_worker(nice, worker_id)
    decode.torchcodec_decode_jpeg = None


def epochs_of(loader, each_batch=None):
    """run(steps) for a Variant whose step is one epoch of loader, with a new shuffle and new augmentations."""
    epochs = itertools.count(1)

    def run(steps):
        for _ in range(steps):
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(next(epochs))
            for images, _ in loader:
                if each_batch:
                    each_batch(images)
    return run


def bench_loader(report, settings, splits, root, folder):
    """The loader alone, one worker each: dataset.py's (uint8 out, normalized later on the device) with its defaults,
    with torchvision's decoder, without scaled decoding and on a pre-resized copy, against ImageFolder with PIL
    transforms. A step loads LOADER_BATCHES batches from an idle worker: it times the worker, not a full queue."""
    batch = min(settings.batch_size, 32)
    per_step = batch * LOADER_BATCHES
    mean, std = dataset.NORMS["imagenet"]
    start = time.perf_counter()
    resized_root = os.path.join(folder, f"resized-{RESIZED_SHORT_SIDE}")
    copied = sum(make_resized_copy(root, resized_root, RESIZED_SHORT_SIDE).values())
    copy_seconds = time.perf_counter() - start
    resized = layouts.find_dataset(resized_root, cache_dir=os.path.join(folder, "cache")).train

    def ours(index, worker_init=None, **options):
        image_set = dataset.ImageFiles(repeat_index(index, per_step), dataset.train_transform(settings.img_size),
                                       **options)
        sampler = dataset.EpochSampler(len(image_set), shuffle=True, seed=0, drop_last=True)
        loader = dataset.build_loader(image_set, sampler, batch, 1, train=True)
        if worker_init:
            loader.worker_init_fn = worker_init
        return loader
    image_folder = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=pil_transforms.Compose([
        pil_transforms.RandomResizedCrop(settings.img_size), pil_transforms.RandomHorizontalFlip(),
        pil_transforms.ToTensor(), pil_transforms.Normalize(mean, std)]))
    theirs = Variant("  ImageFolder + PIL transforms", epochs_of(torch.utils.data.DataLoader(
        image_folder, batch_size=batch, num_workers=1, persistent_workers=True,
        sampler=torch.utils.data.RandomSampler(image_folder, num_samples=per_step))), per_step, "loader_imagefolder",
        note="normalized floats out")
    decoder = ("TorchCodec" if decode.torchcodec_decode_jpeg is not None
               else "torchvision's decode_jpeg (torchcodec does not import)")
    default_loader = ours(splits.train)
    default = Variant(f"  dataset.py loader ({decoder}, scaled decoding, v2 on uint8) (default)",
                      epochs_of(default_loader), per_step, "loader_ours", note="uint8 out; normalized on the device")
    row = {"versus": default, "label": "of default"}
    normalize = functools.partial(dataset.normalize_batch, mean=mean, std=std)  # as a CPU training process does
    variants = [default, Variant("  same + normalize_batch in this process", epochs_of(default_loader, normalize),
                                 per_step, "loader_ours_normalized", versus=theirs, label="of ImageFolder")]
    if decode.torchcodec_decode_jpeg is not None:  # else the default is torchvision's decoder already
        variants.append(Variant("  torchvision's decode_jpeg (the decoder before TorchCodec)", epochs_of(ours(
            splits.train, functools.partial(start_worker_with_torchvision_decoder, 0))), per_step,
            "loader_torchvision_decoder", **row))
    variants += [Variant("  scaled decoding off", epochs_of(ours(splits.train, scaled_decoding=False)), per_step,
                         "loader_scaled_decoding_off", **row,
                         note=f"only crop boxes >= 2x the output gain: few at {settings.img_size}px"),
                 Variant(f"  a pre-resized copy (shorter side {RESIZED_SHORT_SIDE})", epochs_of(ours(resized)),
                         per_step, "loader_resized_copy", **row,
                         note=f"{copied} files copied in {copy_seconds:.0f}s by make_resized_copy"),
                 theirs]
    rates = compare(variants, settings)
    report.add("4", f"loader alone, 1 worker, {batch} x {settings.img_size}px batches")
    report.rates("4", variants, rates, unit="img/s/worker")
    report.add("4", "  dataset.py / ImageFolder", key="loader_vs_imagefolder", target=TARGETS["loader_vs_imagefolder"],
               ratio=paired_ratios(rates[default.name], rates[theirs.name]))
    variants = default = theirs = default_loader = row = None  # their workers exit
    gc.collect()


def bench_indexing(report, settings, folder):
    """List a tree of empty files with layouts.py's indexer (a first listing, then from its cache) and with
    ImageFolder. The OS has the folders cached in both cases (they were just written)."""
    classes = min(100, settings.index_files)
    per_class = settings.index_files // classes
    tree = os.path.join(folder, "index-tree")
    for c in range(classes):
        os.makedirs(os.path.join(tree, f"n{c:08d}"))
        for i in range(per_class):
            os.close(os.open(os.path.join(tree, f"n{c:08d}", f"n{c:08d}_{i}.JPEG"), os.O_CREAT | os.O_WRONLY))
    times = {"cold": [], "cached": [], "imagefolder": []}
    for round_ in range(settings.windows):
        for kind in times:
            start = time.perf_counter()
            found = (torchvision.datasets.ImageFolder(tree) if kind == "imagefolder"
                     else layouts.class_folder_index(tree, os.path.join(folder, f"index-cache-{round_}"))[1])
            times[kind].append(time.perf_counter() - start)
            assert len(found) == classes * per_class
    shutil.rmtree(tree)
    report.add("4", f"index {classes * per_class} files in {classes} class folders")
    report.add("4", "  layouts.py, first listing", times["cold"], "s", "index_cold")
    report.add("4", "  layouts.py, from its listing cache", times["cached"], "s", "index_cached")
    report.add("4", "  ImageFolder", times["imagefolder"], "s", "index_imagefolder",
               ratio=paired_ratios(times["imagefolder"], times["cold"]), label="x the first listing's time")


class TouchIndex(torch.utils.data.Dataset):
    """An item is a chunk of positions, each looked up in the index (as a real __getitem__ reads a path); returns
    the worker's pid, whose memory the caller then reads."""

    def __init__(self, lookup):
        self.lookup = lookup

    def __getitem__(self, chunk):
        for i in chunk.tolist():
            self.lookup(i)
        return os.getpid()


def worker_memory(lookup, size, workers):
    """memory_mb of each worker once the workers together have read every entry, in random order."""
    chunks = np.array_split(np.random.default_rng(0).permutation(size), workers * 16)
    with warnings.catch_warnings():  # more workers than cores is the point here
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = torch.utils.data.DataLoader(TouchIndex(lookup), batch_size=None, sampler=chunks,
                                             num_workers=workers, persistent_workers=True)
        pids = set(loader)  # persistent workers stay alive after the epoch: measured now
    memory = [memory_mb(pid) for pid in pids]
    loader = None  # its workers exit
    gc.collect()
    return memory


def bench_index_memory(report, settings):
    """Workers reading a 1.28M-entry index. Reading a Python str updates its reference count, which copies its memory
    page into the worker (copy-on-write after fork); a FileIndex's numpy arrays are only read."""
    n, workers = settings.index_entries, settings.memory_workers
    classes = min(1000, n)
    names = [f"n{c:08d}/n{c:08d}_{i:07d}.JPEG" for c in range(classes) for i in range(n // classes)]
    index = layouts.FileIndex("/nonexistent", [os.fsencode(name) for name in names],
                              np.arange(len(names)) // (n // classes))
    sizes = {"FileIndex": (index.paths.nbytes + index.labels.nbytes) / 2**20,
             "list of str": (sys.getsizeof(names) + sum(sys.getsizeof(name) for name in names)) / 2**20}
    gc.collect()
    memory = {"FileIndex": worker_memory(index.path, len(index), workers),
              "list of str": worker_memory(names.__getitem__, len(names), workers)}
    report.add("4", f"{workers} workers reading a {len(names)}-entry index (sum over workers)")
    uss = {kind: total(m["uss"] for m in memory[kind]) for kind in memory}
    for kind, size in sizes.items():
        pss = total(m["pss"] for m in memory[kind])
        report.add("4", f"  {kind} ({size:.0f} MB in the parent): private (USS)", [uss[kind]], "MB",
                   f"workers_uss_{kind.split()[0]}", note=f"PSS {pss:.0f} MB" if pss else "")
    if uss["FileIndex"] and uss["list of str"]:
        report.add("4", "  list / FileIndex, worker private memory", key="workers_uss_ratio",
                   ratio=uss["list of str"] / uss["FileIndex"])


# ---------------------------------------------------------------- sections I and G: inference, GPU decoding

def bench_inference(report, settings, splits, folder):
    """On the CPU, PyTorch eager (inference mode) against export.py's ONNX files in onnxruntime, fp32 and static int8
    (calibrated as export.py --int8 does): batch-1 latency, batch-32 throughput and the files' sizes. Random weights:
    the speed does not depend on what they learned."""
    import export  # onnx and onnxruntime load only for this section
    img_size, threads = settings.img_size, torch.get_num_threads()
    net = model_lib.build_model(settings.arch, settings.width_mult, 1000)
    calibration = export.load_images(splits.train, settings.calib_images, round(img_size / 0.875), img_size,
                                     "imagenet")
    # BN statistics of real images (one cumulative pass), so that the int8 ranges have a trained network's scale:
    # with the initial ones some tensors were constant, which the percentile calibrator cannot take
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        net.train()(calibration)
    net.eval()
    paths = {name: os.path.join(folder, file)
             for name, file in (("pytorch", "model.pth"), ("fp32", "model.onnx"), ("int8", "model.int8.onnx"))}
    torch.save(net.state_dict(), paths["pytorch"])
    for precision, images in (("fp32", None), ("int8", calibration)):
        export.write_onnx(net, paths[precision], {}, export.DEFAULT_OPSET, img_size, None, images)
    sessions = {precision: evaluate.onnx_session(paths[precision], threads) for precision in ("fp32", "int8")}
    report.add("I", f"inference on the CPU, {img_size}px, {plural(threads, 'thread')} (onnxruntime "
                    f"{importlib.metadata.version('onnxruntime')}, opset {export.DEFAULT_OPSET})")
    for batch_size in INFERENCE_BATCHES:
        images = torch.randn(batch_size, 3, img_size, img_size)
        eager = torch.inference_mode()(functools.partial(net, images))
        key = f"inference_b{batch_size}_"
        variants = [Variant("    PyTorch eager", repeated(eager), batch_size, key + "pytorch_eager")]
        for precision, session in sessions.items():
            onnx = functools.partial(session.run, None, {"images": images.numpy()})
            variants.append(Variant(f"    ONNX {precision}", repeated(onnx), batch_size, key + f"onnx_{precision}",
                                    versus=variants[-1], label=f"x speed of {variants[-1].name.strip()}"))
        if batch_size == 1:
            variants[-1].target = TARGETS["int8_vs_fp32"]
        rates = compare_with_timer(variants, settings)
        report.add("I", f"  batch {batch_size}: " + ("latency" if batch_size == 1 else "throughput"))
        report.rates("I", variants, rates, unit="ms" if batch_size == 1 else "img/s")
    sizes = {name: os.path.getsize(path) / 2**20 for name, path in paths.items()}
    report.add("I", "  file size")
    for name, label in (("pytorch", "PyTorch state dict"), ("fp32", "ONNX fp32"), ("int8", "ONNX int8")):
        smaller = sizes["pytorch"] / sizes[name] if name != "pytorch" else None
        report.add("I", f"    {label}", [sizes[name]], "MB", f"file_mb_{name}", ratio=smaller,
                   label="x smaller" if smaller else "")


def bench_gpu_decode(report, settings, splits):
    """JPEG decoding, libjpeg-turbo on one CPU core against nvjpeg on batches of file bytes, through decode.py's own
    calls (decode_jpeg_cpu, and decode_jpegs_on as --decode-on device uses it)."""
    device = settings.device
    read = (decode.read_image_file(splits.train.path(i)) for i in range(min(256, len(splits.train))))
    data = [item for item, size in read if size is not None]  # JPEGs (other files come back decoded)
    try:
        decoder = decode.device_jpeg_decoder(device)
    except DataError as error:
        return report.add("G", "GPU decoding", note=str(error))
    usable = []
    for item in data:  # nvjpeg refuses some JPEGs (CMYK, progressive on older versions): they are left out
        with contextlib.suppress(RuntimeError):
            decode.decode_jpegs_on(device, [item])
            usable.append(item)
    if not usable:
        return report.add("G", "GPU decoding", note="no JPEG nvjpeg can decode")
    cpu_batch = usable[:32]
    on_cpu = Variant("  CPU, 1 core", repeated(lambda: [decode.decode_jpeg_cpu(item) for item in cpu_batch]),
                     len(cpu_batch), "decode_cpu", threads=1)
    variants = [on_cpu]
    for size in (1, 8, 32, 128):
        batch = [usable[i % len(usable)] for i in range(size)]  # one nvjpeg call for the whole list
        variants.append(Variant(f"  GPU, batches of {size}", repeated(functools.partial(decode.decode_jpegs_on,
                                device, batch)), size, f"decode_gpu_{size}", versus=on_cpu, label="cores"))
    rates = compare_with_timer(variants, settings)
    report.add("G", f"JPEG decoding ({len(usable)} files, {decoder}); ratio = CPU cores one GPU replaces")
    report.rates("G", variants, rates)


# ---------------------------------------------------------------- data

def source_images(data_path, folder, limit):
    """([(image path, class name)], description): the images to benchmark with."""
    data_path = data_path or (SAMPLE_DATA if os.path.isdir(SAMPLE_DATA) else None)
    if data_path is None:
        return generate_images(os.path.join(folder, "generated")), "200 generated photo-like JPEGs, 500x375"
    data_path = os.path.abspath(data_path)
    if not os.path.isdir(data_path):
        raise UserError(f"--data-path {data_path} is not a folder")
    if os.path.isdir(os.path.join(data_path, "train")) or layouts.kaggle_root(data_path):
        try:
            splits = layouts.find_dataset(data_path)
        except DataError as error:
            raise UserError(str(error)) from None
        index = splits.train
        picks = np.unique(np.linspace(0, len(index) - 1, min(limit, len(index))).round().astype(int))
        images = [(index.path(i), splits.classes[index.labels[i]]) for i in picks]
        return images, f"{data_path} ({len(images)} of its {len(index)} training images)"
    files = sorted(e.path for e in os.scandir(data_path) if layouts.is_image_name(e.name) and e.is_file())[:limit]
    if not files:
        raise UserError(f"no images in {data_path} (expected JPEGs, or an ImageNet layout with train/)")
    # <synset>_<name>.JPEG, as in ImageNet's own file names, gives the class; anything else is one class
    images = [(f, os.path.basename(f).split("_")[0] if "_" in os.path.basename(f) else "images") for f in files]
    return images, f"{data_path} ({len(files)} images)"


def generate_images(folder, count=200, classes=10):
    """Photo-like JPEGs (smooth colour gradients plus noise, 500x375): noise alone decodes at another speed."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32) / 500
    os.makedirs(folder, exist_ok=True)
    images = []
    for i in range(count):
        start, end = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
        angle, waves = rng.uniform(0, 2 * np.pi), rng.uniform(2, 12)
        along = (x * np.cos(angle) + y * np.sin(angle))[..., None]
        pixels = start + (end - start) * along + 25 * np.sin(waves * (x + y))[..., None]
        pixels += rng.normal(0, 8, pixels.shape)
        images.append((os.path.join(folder, f"class{i % classes}_{i:04d}.JPEG"), f"class{i % classes}"))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(images[-1][0], quality=90)
    return images


def lay_out(images, root, min_train=0):
    """root/train/<class>/ and root/val/<class>/ holding links to the images (copies where links fail); train/ links
    them several times over when that is needed to hold min_train images (a batch of train.py's)."""
    copies = {"train": max(1, -(-min_train // len(images))), "val": 1}
    for split in ("train", "val"):
        for i in range(len(images) * copies[split]):
            path, name = images[i % len(images)]
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            target = os.path.join(root, split, name, f"{i:06d}_{os.path.basename(path)}")
            try:
                os.symlink(os.path.abspath(path), target)
            except OSError:
                shutil.copyfile(path, target)
    return root


# ---------------------------------------------------------------- the report

class Report:
    """Table rows and every figure by key, for the JSON."""

    def __init__(self):
        self.rows, self.figures = [], {}

    def add(self, section, name, values=None, unit="", key=None, ratio=None, label="", target=None, choice=False,
            note="", variant=None):
        """values: one per window, None for a heading (or what this platform cannot measure); ratio: a number, or
        one per round (its median is shown, its range goes in the note)."""
        values = values if values and None not in values else None
        ratios = ratio if isinstance(ratio, list) else None
        if ratios:
            ratio = statistics.median(ratios)
            if len(ratios) > 1:
                note = "; ".join(filter(None, [f"rounds {min(ratios):.2f}-{max(ratios):.2f}", note]))
        result = ""
        if ratio is not None and target is not None:
            result = "PASS" if ratio >= target else "MISS"
        elif ratio is not None and choice:  # an alternative to a default: is it worth switching?
            result = "faster" if ratio > 1.03 else "slower" if ratio < 0.97 else "same"
        value = statistics.median(values) if values else None
        self.rows.append({"section": section, "name": name, "value": value, "unit": unit, "ratio": ratio,
                          "ratio_text": label or ("x" if ratio is not None else ""), "target": target,
                          "result": result, "note": note})
        if key:
            figure = {"median": value, "windows": values} if values else {}
            if values and variant is not None:
                figure.update(steps_per_window=variant.steps, items_per_step=variant.items)
            self.figures[key] = {**figure, "unit": unit, "ratio": ratio, "ratios": ratios, "target": target,
                                 "result": result, "name": name.strip(), "note": note}

    def rates(self, section, variants, rates, unit="img/s"):
        """A row for each variant of a comparison; its ratio to its `versus` variant is taken round by round."""
        for v in variants:
            values = [1000 * v.items / rate for rate in rates[v.name]] if unit.startswith("ms") else rates[v.name]
            ratio = paired_ratios(rates[v.name], rates[v.versus.name]) if v.versus else None
            self.add(section, v.name, values, unit, v.key, ratio, v.label, v.target, v.choice, v.note, v)

    def print(self, header):
        cells = [("#", "measurement", "value", "unit", "ratio", "target", "result", "note")]
        for r in sorted(self.rows, key=lambda r: SECTIONS.index(r["section"])):  # stable: keeps each section's order
            value = "" if r["value"] is None else f"{r['value']:.3g}" if r["value"] < 10 else f"{r['value']:.1f}"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f} {r['ratio_text']}".strip()
            target = "" if r["target"] is None else f">= {r['target']:g}"
            cells.append((r["section"], r["name"], value, r["unit"], ratio, target, r["result"], r["note"]))
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        print("\n".join(header))
        for n, row in enumerate(cells):
            print("  ".join(cell.rjust(w) if i in (2, 4) else cell.ljust(w)  # numbers align on the right
                            for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
            if n == 0:
                print("-" * (sum(widths) + 2 * (len(widths) - 1)))


def environment(device):
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:  # the CPU's name, which psutil does not give
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else name,
            "cpu_cores": utils.cpu_cores(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": utils.cpu_has_native_bf16(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "load_average_start": psutil.getloadavg()}


def summary(settings, env, data_description, wall):
    """The lines above the table: the machine, the settings, the data, the load and the run's length."""
    s, load = settings, (env["load_average_start"][0], env["load_average_end"][0])
    return ["", f"MobileNetV3 benchmark: {env['device_name']} ({s.device}, {env['cpu_cores']} cores, "
                f"{env['torch_threads']} torch threads) | torch {env['torch']} | {s.arch} {s.width_mult:g} | "
                f"batch {s.batch_size} | {s.img_size}px | {plural(s.workers, 'worker')}",
            f"data: {data_description} | median of {s.windows} windows of ~{s.window_seconds:g}s; ratios are medians "
            f"of per-round ratios | load average {load[0]:.2f} -> {load[1]:.2f} | {wall:.0f}s",
            "sections: 1 model-only step, 2 vs torchvision, 3 full pipeline, 4 data, 5 evaluation, 6 memory, "
            "I inference (CPU, PyTorch vs ONNX fp32 vs int8), C choices behind train.py's defaults, G GPU decoding", ""]


# ---------------------------------------------------------------- main

def resolve_settings(args):
    """A new namespace: args with --quick's sizes and the device's defaults filled in; args itself stays as parsed."""
    device = utils.pick_device(args.device)
    parser = get_args_parser()
    quick = {name: value for name, value in QUICK.items()
             if args.quick and getattr(args, name) == parser.get_default(name)}  # only what the command line left
    settings = argparse.Namespace(**{
        **vars(args), **quick, "device": device,
        "batch_size": args.batch_size or (16 if device.type == "cpu" else 128),  # a CPU run finishes in minutes
        "workers": utils.default_workers(device) if args.workers is None else args.workers,
        "gpu_decode": device.type == "cuda" if args.gpu_decode is None else args.gpu_decode})
    # --workers: the pipelines measure loader processes
    least = {"batch_size": 1, "windows": 1, "img_size": 1, "max_images": 1, "memory_workers": 1, "calib_images": 1,
             "workers": 1, "threads": 1, "busy": 0}
    for name, bound in least.items():
        if getattr(settings, name) is not None and getattr(settings, name) < bound:
            raise UserError(f"--{name.replace('_', '-')} must be at least {bound} (got {getattr(settings, name)})")
    if settings.busy_seconds <= 0:
        raise UserError(f"--busy-seconds must be positive (got {settings.busy_seconds})")
    return settings


def main(args):
    started = time.perf_counter()
    settings = resolve_settings(args)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.build_run sets it
    utils.seed_everything(0)
    env, report = environment(settings.device), Report()
    with tempfile.TemporaryDirectory(prefix="mobilenetv3-benchmark-") as folder, \
            mock.patch.dict(os.environ, XDG_CACHE_HOME=os.path.join(folder, "cache")):  # layouts.py's listing cache
        images, data_description = source_images(settings.data_path, folder, settings.max_images)
        root = lay_out(images, os.path.join(folder, "images"), min_train=settings.batch_size)
        splits = layouts.find_dataset(root, cache_dir=os.path.join(folder, "cache"))
        print(f"benchmarking on {env['device_name']} ({settings.device}) with {data_description} ...", flush=True)
        if not settings.inference_only:
            save_seconds = bench_memory(report, settings, root, folder)
            trainer, step_rates = bench_training(report, settings, root, folder)
            report_save_interval(report, settings, save_seconds, statistics.median(step_rates))
            bench_eval(report, settings, trainer, splits)
            bench_loader(report, settings, splits, root, folder)
            if settings.index_files > 0:
                bench_indexing(report, settings, folder)
            if settings.index_entries > 0:
                bench_index_memory(report, settings)
            bench_precision(report, settings)
            bench_optimizers(report, settings, statistics.median(step_rates))
            if settings.compile:
                bench_compile(report, settings)
            if settings.gpu_decode and settings.device.type == "cuda":
                bench_gpu_decode(report, settings, splits)
        if settings.inference or settings.inference_only:
            bench_inference(report, settings, splits, folder)
    env["load_average_end"] = psutil.getloadavg()
    wall = time.perf_counter() - started
    report.print(summary(settings, env, data_description, wall))
    if settings.json:
        with open(settings.json, "w") as f:
            json.dump({"config": vars(settings), "environment": env, "data": data_description, "wall_seconds": wall,
                       "figures": report.figures, "rows": report.rows}, f, indent=2, default=str)
        print(f"\nwrote {settings.json}")
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, get_args_parser().parse_args()))
