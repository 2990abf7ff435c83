"""Speed and memory of this project's training, measured against the obvious alternatives in the same run.

    python benchmark.py                                  # everything: about 3-5 minutes on a 2-core CPU
    python benchmark.py --json bench.json                # also write every window of every figure
    python benchmark.py --device cuda --quick            # a GPU session: everything in under 3 minutes
    python benchmark.py --data-path /data/imagenet -b 64 --windows 5
    python benchmark.py --compile                        # add torch.compile (minutes of compiling on a CPU)
    python benchmark.py --busy 0                         # without the comparison under load (section 3)
    python benchmark.py --inference-only --arch small    # only the deployment figures: PyTorch, ONNX fp32, int8

MobileNetV3 is so cheap that the training speed is decided around the model: JPEG decoding, copies, syncs,
memory format, precision. So this measures, with train.py's and dataset.py's own functions (not copies):
  1. the model-only training step on a synthetic batch, with train.py's defaults for the device (precision,
     memory format, optimizer implementation), and the alternatives to those defaults;
  2. this project's model against torchvision's mobilenet_v3_large at width 1.0 (the same architecture);
  3. the full pipeline: train.py's own loop (train_one_epoch on a train.build_run) reading JPEG files
     through dataset.py's loader; on CUDA also with fewer workers and with the JPEGs decoded on the GPU
     (train.py --decode-on device), which shows how many CPU workers GPU decoding stands in for; then the
     model-only step and the full pipeline again, side by side, while --busy other processes (started and
     ended by this benchmark) spin a core each;
  4. the loader alone, per worker: dataset.py's with its defaults (TorchCodec's decoder, scaled decoding),
     with torchvision's decoder, without scaled decoding, and on a pre-resized copy of the images, against
     torchvision's ImageFolder with the standard PIL transforms; the time to index a 100k-file tree; the memory
     of 4 workers over a 1.28M-entry index (FileIndex against a list);
  5. evaluation throughput through evaluate.evaluate;
  6. the peak resident memory of the training process and of its loader workers;
  I. deployment: batch-1 latency and batch-32 throughput on the CPU of PyTorch eager against the ONNX files of
     export.py (fp32 and static int8, run by onnxruntime), and the files' sizes;
  and on CUDA also fp16 with a GradScaler, and nvjpeg decoding of file batches against libjpeg-turbo on a core.

The machine may be busy with other work, so every figure is the median of --windows timed windows after a
warm-up, the contenders of a comparison take turns window by window (a load change slows them alike), and a
ratio is the median of the per-round ratios (their range is in the note). Images come from --data-path
(ImageNet layout or a folder of JPEGs), else ../shared/data/imagenet-sample when it exists, else generated
photo-like JPEGs; they are linked into train/<class>/ and val/<class>/ folders in a temporary directory.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: sleeping, not spinning, OpenMP threads

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch_ema
import torchvision
from PIL import Image
from torchvision import transforms as pil_transforms

import dataset
import decode
import evaluate
import layouts
import model as model_lib
import flags
import train
import utils
from tools import resize_copy
from utils import UserError

SAMPLE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "imagenet-sample")
TARGETS = {"ours_vs_torchvision": 1.0, "full_vs_model": 0.9, "full_vs_model_busy": 0.8, "loader_vs_imagefolder": 1.4,
           "int8_vs_fp32": 1.5}
QUICK = {"windows": 3, "window_seconds": 0.5, "index_files": 20_000, "index_entries": 320_000}
SECTIONS = "123456ICG"  # the table's order: the six figures, inference, the choices behind the defaults,
# GPU decoding
INFERENCE_BATCHES = (1, 32)  # latency of one image, throughput of a batch
LOADER_BATCHES = 8  # batches per timed window of the loader-alone comparison
RESIZED_SHORT_SIDE = 320  # the pre-resized copy of section 4, as docs/data-pipeline.md suggests
MEMORY_PROBE_STEPS = 5
MODEL_ONLY_EPOCH = 10**6  # the model-only step's epoch length: it only places the LR schedule (in its warm-up)


def get_args_parser():
    parser = argparse.ArgumentParser(description="Benchmark this project's training against the alternatives.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="large", choices=model_lib.ARCHS, help="MobileNetV3 variant")
    parser.add_argument("--width-mult", type=float, default=0.5, help="width multiplier (train.py's default)")
    parser.add_argument("-b", "--batch-size", type=int, default=None,
                        help="default: 16 on a CPU (to finish in minutes), train.py's 128 elsewhere")
    parser.add_argument("--img-size", type=int, default=224, help="training crop size")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("-j", "--workers", type=int, default=None,
                        help="loader processes (default: train.py's, the CPU cores up to 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the training process (default: torch's, one per core, compared with 1)")
    parser.add_argument("--data-path", default=None, help="ImageNet-layout dataset or a folder of JPEGs "
                                                          "(default: ../shared/data/imagenet-sample, else generated)")
    parser.add_argument("--max-images", type=int, default=1000, help="at most this many images from --data-path")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every figure and window as JSON")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per figure (the median is shown)")
    parser.add_argument("--window-seconds", type=float, default=1.0,
                        help="target length of a window; its steps are chosen from a timed warm-up step")
    parser.add_argument("--steps", type=int, default=None, help="fixed steps per window instead")
    parser.add_argument("--index-files", type=int, default=100_000,
                        help="files in the generated tree for the indexing test (0: skip it)")
    parser.add_argument("--index-entries", type=int, default=1_280_000,
                        help="entries of the index for the worker-memory test (0: skip it)")
    parser.add_argument("--memory-workers", type=int, default=4, help="workers of the worker-memory test")
    parser.add_argument("--busy", type=int, default=2,
                        help="section 3 also under load: this many other processes, each spinning a core at this "
                             "process's priority, while model-only and the full pipeline take turns (0: skip it)")
    parser.add_argument("--busy-seconds", type=float, default=300,
                        help="each busy process ends itself after this long, even if this process dies without "
                             "ending it (normally they are ended as soon as the loaded comparison is done)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on a CPU)")
    parser.add_argument("--gpu-decode", action=argparse.BooleanOptionalAction, default=None,
                        help="nvjpeg against CPU decoding, alone and in train.py's loop with --decode-on device "
                             "(default: on with CUDA; on a CPU it times the loop with decoding in the training process)")
    parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                        help="section I: PyTorch eager vs ONNX fp32 vs ONNX int8 on the CPU (export.py's files)")
    parser.add_argument("--inference-only", action="store_true", help="run section I alone")
    parser.add_argument("--calib-images", type=int, default=64, help="section I: int8 calibration images")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # bench_memory's child process
    parser.add_argument("--quick", action="store_true",
                        help=f"shorter windows and smaller index tests ({QUICK}): under 3 minutes on a GPU machine")
    return parser


# ---------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def num_threads(threads):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Variant:
    """One contender of a comparison: run(steps) does `steps` steps of `items` images (or other items) each.
    settle() runs after each of its windows, untimed. whole_windows: run a window in one call (a training loop,
    whose every call ends with a host sync), else step by step, to end a window early on a suddenly busy machine."""

    def __init__(self, name, run, items, threads=None, settle=None, whole_windows=False):
        self.name, self.run, self.items, self.threads = name, run, items, threads
        self.settle = settle or (lambda: None)
        self.whole_windows = whole_windows
        self.steps = None


def compare(variants, args, device):
    """Items per second of each variant in every window: {name: [rate per round]}, rounds aligned.

    Each variant warms up with a step that pays for lazy initialisation, worker start-up and caches, and a
    second, timed one that sets the steps of its windows (a slow variant's first step is estimate enough).
    Then the variants take turns, one window each per round, in a new order each round. A window that
    runs past 3x its target (the machine got busy after the calibration) ends early and counts what it did.
    """
    for v in variants:
        with num_threads(v.threads):
            step_time = timed(v.run, 1, device)
            if step_time < 2 * args.window_seconds:
                step_time = timed(v.run, 1, device)
        v.steps = args.steps or max(1, min(1000, round(args.window_seconds / step_time)))
        v.settle()
    rates = {v.name: [] for v in variants}
    for round_ in range(args.windows):
        for v in random.Random(round_).sample(variants, len(variants)):  # no variant always follows the same one
            with num_threads(v.threads):
                sync(device)
                start, done = time.perf_counter(), 0
                if v.whole_windows:
                    v.run(v.steps)
                    done = v.steps
                while done < v.steps:
                    v.run(1)
                    done += 1
                    if not args.steps and time.perf_counter() - start > 3 * args.window_seconds:
                        break
                sync(device)
                elapsed = time.perf_counter() - start
            v.settle()
            rates[v.name].append(done * v.items / elapsed)
    return rates


def timed(run, steps, device):
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    return time.perf_counter() - start


def repeated(call):
    """run(steps) for a Variant whose step is one call."""
    def run(steps):
        for _ in range(steps):
            call()
    return run


def figure(values, variant=None):
    """The JSON of one figure: its median and every window (and how the windows were made)."""
    out = {"median": statistics.median(values), "windows": values}
    if variant is not None:
        out.update(steps_per_window=variant.steps, items_per_step=variant.items)
    return out


def paired_ratios(rates, base):
    """rates / base round by round: the windows of one round ran back to back, under the same load."""
    return [a / b for a, b in zip(rates, base)]


# ---------------------------------------------------------------- processes and memory (Linux /proc; n/a elsewhere)

def child_pids():
    """This process's children (the DataLoader workers alive now)."""
    pids, me = [], os.getpid()
    if not os.path.isdir("/proc"):
        return pids
    for name in os.listdir("/proc"):
        if name.isdigit() and proc_stat(int(name))[0] == me:
            pids.append(int(name))
    return pids


def proc_stat(pid):
    """(parent pid, CPU ticks used) of a process, or (None, 0) when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    except (OSError, IndexError):
        return None, 0
    return int(fields[1]), int(fields[11]) + int(fields[12])  # ppid; utime + stime


def runnable_threads(pid):
    """How many threads of a process are running or waiting for a core (state R), 0 when it is gone."""
    count = 0
    with contextlib.suppress(OSError):
        for thread in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{pid}/task/{thread}/stat") as f:
                    count += f.read().rsplit(")", 1)[1].split()[0] == "R"
    return count


def wait_until_idle(timeout=10.0):
    """Wait until the loader workers stop using CPU: they refill their queues after a window of the pipeline,
    and that work must not be billed to the next window, which may belong to another variant.

    Idle means: at two polls in a row no thread of a worker is runnable and their CPU time has not grown. CPU time
    alone is not enough on a loaded machine, where a worker waiting for a core uses none. The busy processes of
    the loaded comparison are children too, but never idle: they are not watched."""
    if not os.path.isdir("/proc"):
        time.sleep(0.2)  # no way to watch them here: give them a moment
        return
    pids = [pid for pid in child_pids() if pid not in busy_pids]
    last = sum(proc_stat(pid)[1] for pid in pids)
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        time.sleep(0.02)
        now = sum(proc_stat(pid)[1] for pid in pids)
        if now == last and not any(runnable_threads(pid) for pid in pids):
            return
        last = now


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
    """count other processes, each spinning a core at this process's priority, for the block: yields their Popen
    objects. Each ends itself after `seconds` at the latest (should this process die without ending it); all are
    ended, and waited for, when the block is left, however it is left (an exception, Ctrl-C)."""
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


def memory_mb(pid="self"):
    """{"rss", "peak_rss", "pss", "uss"} of a process in MB, from /proc (None where unknown)."""
    out = dict.fromkeys(("rss", "peak_rss", "pss", "uss"))
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        out["rss"] = int(status["VmRSS"].split()[0]) / 1024
        out["peak_rss"] = int(status["VmHWM"].split()[0]) / 1024
        with open(f"/proc/{pid}/smaps_rollup") as f:  # Linux 4.14+
            rollup = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1:] == ["kB"]}
        out["pss"] = rollup["Pss"] / 1024
        out["uss"] = (rollup["Private_Clean"] + rollup["Private_Dirty"]) / 1024  # pages only this process holds
    except (OSError, KeyError, ValueError):
        if pid == "self":  # no /proc (macOS): the peak from getrusage, which counts bytes there
            with contextlib.suppress(ImportError):  # no resource module on Windows
                import resource
                out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def total(values):
    values = [v for v in values if v is not None]
    return sum(values) if values else None


# ---------------------------------------------------------------- train.py's step, with train.py's defaults

def train_args(args, device, *argv, **overrides):
    """train.py's configuration at its defaults, resolved for the device by flags.resolve_config: `flags` as on
    its command line (argv), `overrides` for the values a comparison changes."""
    parsed = flags.get_args_parser().parse_args(["--arch", args.arch, "--width-mult", str(args.width_mult),
                                                 "-b", str(args.batch_size), "--img-size", str(args.img_size), *argv])
    flags.validate_args(parsed)
    return flags.resolve_config(argparse.Namespace(**{**vars(parsed), **overrides}), device)


def alternative_threads(args, device):
    """The torch thread count to compare with the default on a CPU: 1, or one per core where the default is 1.
    None when --threads fixes it."""
    if device.type != "cpu" or args.threads:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.get_num_threads() > 1:
        return 1
    return cores if cores > 1 else None


def train_net(targs, width_mult=None):
    """The network train.py trains for targs (1000 classes, as ImageNet): its dropout and BN momentum too."""
    return model_lib.build_model(targs.arch, width_mult or targs.width_mult, 1000, dropout=targs.dropout,
                                 bn_momentum=targs.bn_momentum)


def make_trainer(net, targs, device):
    """A train.Run around net, built by train.build_trainer as train.py builds its own: optimizer, EMA,
    precision, loss, torch.compile with --compile (the training step, train.train_step, needs nothing else)."""
    net = train.place_model(net, targs, device).train()
    return train.build_trainer(targs, net, device, steps_per_epoch=MODEL_ONLY_EPOCH, show_progress=False)


def precision_name(targs, device):
    return utils.precision_for(device, targs.amp, targs.amp_dtype)[2]


def describe(trainer, targs, device):
    """train.py's choices for a trainer, in words: precision, memory format, optimizer implementation, threads."""
    options = trainer.optimizer.defaults
    implementation = "fused" if options.get("fused") else "foreach" if options.get("foreach") else "for-loop"
    text = (f"{precision_name(targs, device)}, {'channels_last' if targs.channels_last else 'contiguous'}, "
            f"{type(trainer.optimizer).__name__} {implementation}")
    return text + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")


def model_only(name, trainer, batch_size, img_size, device, threads=None):
    """train.py's update step, train.train_step, on one synthetic batch, already normalized and on the device
    (learning rate, BN-momentum warm-up, forward, backward, the finite-gradient check, a host sync, the optimizer
    step and the EMA update)."""
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if trainer.config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch_size,), device=device)
    skips = train.SkippedSteps(trainer.net, train.TrainState(), trainer.scaler)

    def run(steps):
        for _ in range(steps):
            train.train_step(trainer.model, [(images, targets)], trainer.lr, trainer.optimizer, trainer.scaler,
                             trainer.autocast, trainer.criterion, skips, ema=trainer.ema)
    return Variant(name, run, batch_size, threads)


def repeat_index(index, length):
    """A FileIndex of `length` entries cycling through index's files: long epochs from few files."""
    reps = -(-length // len(index))
    return layouts.FileIndex(index.root, np.tile(index.paths, reps)[:length], np.tile(index.labels, reps)[:length])


class Pipeline:
    """train.py's own training loop, train_one_epoch, on a train.Run from train.build_run with train.py's
    defaults, over the JPEG files in root/train. Each run(steps) is one call of train_one_epoch on an epoch of
    `steps` steps; the loader's iterator lives across the calls, so windows measure the steady state and not the
    start of an epoch, as in a long ImageNet epoch."""

    def __init__(self, args, device, root, out_folder, workers, decode_on="workers", worker_nice=None):
        targs = train_args(args, device, "--data-path", root, "--workers", str(workers), "--decode-on", decode_on,
                           "--output-dir", os.path.join(out_folder, "ckpt"), "--log-dir", out_folder)
        with contextlib.redirect_stdout(sys.stderr):
            run = train.build_run(targs, device=device)
        data = run.data
        # the few hundred benchmark images, repeated: an "epoch" of 500 batches, as ImageNet's are long. The
        # loader is train.py's own; its workers start with the first window, so they see the longer index.
        data.train_set.index = repeat_index(data.train_set.index, args.batch_size * 500)
        data.train_loader.sampler.num_samples = len(data.train_set)
        if worker_nice is not None:  # instead of train.py's choice, to show what that choice is worth
            data.train_loader.worker_init_fn = functools.partial(dataset.start_worker, worker_nice)
        live = dataclasses.replace(data, train_loader=LiveLoader(data.train_loader))
        self.base_run, self.state = dataclasses.replace(run, data=live, show_progress=False), train.TrainState()
        self.config, self.epochs = targs, {}  # epochs: the run with steps_per_epoch = steps, for each window size

    def run(self, steps):
        if steps not in self.epochs:
            self.epochs[steps] = dataclasses.replace(self.base_run, steps_per_epoch=steps)
        # each window is a fresh epoch 0 of `steps` steps: its LR warms up within the window (speed is the same)
        self.state.epoch = self.state.batch_in_epoch = 0
        if train.train_one_epoch(self.epochs[steps], self.state)[0] != train.Outcome.DONE:  # "diverged": fewer steps ran
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

    def __len__(self):
        return 10**9

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


# ---------------------------------------------------------------- the measurements

def bench_training(report, args, device, root, folder):
    """Sections 1, 2 and 3, and the memory-format and thread choices, in one interleaved comparison.
    Returns the trainer with train.py's defaults and its model-only rates."""
    targs = train_args(args, device)
    size = (args.batch_size, args.img_size, device)
    build = functools.partial(train_net, targs)
    default = make_trainer(build(args.width_mult), targs, device)
    base = model_only(f"model-only step ({describe(default, targs, device)})", default, *size)
    flipped = train_args(args, device, channels_last=not targs.channels_last)
    choices = [model_only(f"  channels_last {'on' if flipped.channels_last else 'off'}",
                          make_trainer(build(args.width_mult), flipped, device), *size)]
    other_threads = alternative_threads(args, device)
    if other_threads:
        choices.append(model_only(f"  {other_threads} thread{'s' * (other_threads > 1)}", default, *size,
                                  threads=other_threads))

    # 2: both models in the same loop with train.py's defaults, at width 1.0 where the architectures are identical
    tv_name = model_lib.TORCHVISION_BUILDERS[args.arch]
    tv_model = getattr(torchvision.models, tv_name)()  # random weights, 1000 classes
    tv = model_only(f"torchvision {tv_name}", make_trainer(tv_model, targs, device), *size)
    ours = base if args.width_mult == 1.0 else model_only(f"this project's {args.arch} 1.0",
                                                           make_trainer(build(1.0), targs, device), *size)

    # 3: train.py's loop from JPEG files with its default workers, with 1 worker to see whether fewer is better,
    # and on CUDA with fewer workers still, against decoding on the GPU (--decode-on device)
    pipelines = {args.workers: Pipeline(args, device, root, folder, args.workers)}
    for workers in [1] + ([2, 4] if device.type == "cuda" else []):
        if workers < args.workers:
            pipelines[workers] = Pipeline(args, device, root, folder, workers)
    if device.type == "cpu":  # the workers share the cores with the model: would a lower priority help?
        pipelines["nice 10"] = Pipeline(args, device, root, folder, args.workers, worker_nice=10)
    if args.gpu_decode:  # on a CPU (only when asked): decoded by the training process instead of the workers
        for workers in (1, 2):
            pipelines[f"device {workers}"] = Pipeline(args, device, root, folder, workers, decode_on="device")
    full = {}
    for key, pipe in pipelines.items():
        workers = pipe.config.workers
        where = f", JPEGs decoded on {device.type}" if pipe.config.decode_on == "device" else ""
        where += ", workers at nice 10" if key == "nice 10" else ""
        full[key] = Variant(f"full pipeline, {workers} worker{'s' * (workers > 1)}{where}", pipe.run,
                            args.batch_size, settle=wait_until_idle, whole_windows=True)
    # right after the default: the same pipeline with the accounting of the loaded comparison (refilled)
    full = {args.workers: full.pop(args.workers),
            "refill timed": Variant("  the same, the queue's refill timed", refilled(pipelines[args.workers].run),
                                    args.batch_size, settle=wait_until_idle, whole_windows=True), **full}
    if other_threads:
        full["threads"] = Variant(f"full pipeline, {args.workers} worker{'s' * (args.workers > 1)}, {other_threads} "
                                  f"thread{'s' * (other_threads > 1)}", pipelines[args.workers].run, args.batch_size,
                                  threads=other_threads, settle=wait_until_idle, whole_windows=True)

    variants = [base, *choices, *([ours] if ours is not base else []), tv, *full.values()]
    rates = compare(variants, args, device)
    label = f"[{args.arch} {args.width_mult:g}, {args.batch_size} x {args.img_size}px]"
    report.add("1", f"{base.name} {label}", rates[base.name], "img/s", variant=base, key="model_only")
    for v in choices:
        report.add("1", v.name, rates[v.name], "img/s", variant=v, base=(rates[base.name], "of default"), choice=True,
                   key="model_only_" + v.name.strip().replace(" ", "_"))
    if ours is not base:
        report.add("2", f"{ours.name} (same loop and defaults)", rates[ours.name], "img/s", variant=ours,
                   key="ours_width_1")
    report.add("2", tv.name, rates[tv.name], "img/s", variant=tv, key="torchvision")
    report.add("2", f"  this project / torchvision ({args.arch} 1.0)", None, "",
               ratios=paired_ratios(rates[ours.name], rates[tv.name]), target=TARGETS["ours_vs_torchvision"],
               key="ours_vs_torchvision")
    for workers, v in full.items():
        default_workers = workers == args.workers
        key = {args.workers: "full_pipeline", "threads": "full_pipeline_other_threads",
               "nice 10": "full_pipeline_workers_nice_10", "refill timed": "full_pipeline_refill_timed",
               "device 1": "full_pipeline_gpu_decode_1_worker",
               "device 2": "full_pipeline_gpu_decode_2_workers"}.get(workers)
        report.add("3", v.name + (" (train.py default)" if default_workers else ""), rates[v.name], "img/s",
                   variant=v, base=(rates[base.name], "full/model"),
                   target=TARGETS["full_vs_model"] if default_workers else None,
                   key=key or f"full_pipeline_{workers}_worker")

    if args.busy > 0:
        bench_under_load(report, args, device, default, pipelines, rates[base.name])
    for pipe in pipelines.values():
        pipe.close()
    return default, rates[base.name]


def refilled(run):
    """A Pipeline's run(steps), then the wait until its workers have refilled their queues, both in the timed
    window. Each window then pays for decoding every batch it trained on. With the wait outside the window, a
    window starts from full queues (4 batches a worker) and a worker slower than the model goes unseen in a
    window of a few steps: under load on a 2-core CPU, a window is 1-2 steps."""
    def run_and_refill(steps):
        run(steps)
        wait_until_idle()
    return run_and_refill


def bench_under_load(report, args, device, trainer, pipelines, quiet_model_rates):
    """Section 3 under load: --busy other processes spin a core each, at this process's priority, while the
    model-only step and the full pipeline take turns window by window, as in the quiet comparison. The busy
    processes run for this comparison only and are ended when it ends, whatever happens (busy_processes)."""
    busy = f"{args.busy} busy process{'es' * (args.busy > 1)}"
    size = (args.batch_size, args.img_size, device)
    workers = f"{args.workers} worker{'s' * (args.workers > 1)}"
    model = model_only(f"model-only step, {busy}", trainer, *size)
    full = {"full_pipeline_busy": Variant(f"full pipeline, {workers}, {busy}", refilled(pipelines[args.workers].run),
                                          args.batch_size, settle=wait_until_idle, whole_windows=True),
            "full_pipeline_busy_refill_untimed": Variant("  the same, the queue refilled between windows (untimed)",
                                                         pipelines[args.workers].run, args.batch_size,
                                                         settle=wait_until_idle, whole_windows=True)}
    if "nice 10" in pipelines:  # the CPU: what a lower worker priority does under load (train.py's earlier default)
        full["full_pipeline_busy_workers_nice_10"] = Variant(
            "  the same, workers at nice 10", refilled(pipelines["nice 10"].run),
            args.batch_size, settle=wait_until_idle, whole_windows=True)
    with busy_processes(args.busy, args.busy_seconds) as processes:
        rates = compare([model, *full.values()], args, device)
        ended = sum(process.poll() is not None for process in processes)
    note = f"{ended} busy processes ended before the comparison did: raise --busy-seconds" if ended else ""
    report.add("3", model.name, rates[model.name], "img/s", variant=model, key="model_only_busy",
               ratio=statistics.median(rates[model.name]) / statistics.median(quiet_model_rates),
               ratio_text="of quiet", note=note or "medians of two comparisons, not paired")
    for key, v in full.items():
        report.add("3", v.name, rates[v.name], "img/s", variant=v, base=(rates[model.name], "full/model"),
                   target=TARGETS["full_vs_model_busy"] if key == "full_pipeline_busy" else None, note=note,
                   key=key)


def bench_memory(report, args, device, root, folder):
    """Section 6: the memory of a training process as train.py makes it, alone in a fresh interpreter (this one
    holds every contender, and workers forked from it would inherit them): train.build_run, then
    MEMORY_PROBE_STEPS steps of train_one_epoch, then the peak RSS of the process and of its workers."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", root, "--device", str(device),
               "--arch", args.arch, "--width-mult", str(args.width_mult), "-b", str(args.batch_size),
               "--img-size", str(args.img_size), "--workers", str(args.workers)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    try:
        probe = subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=600)
        memory = json.loads(probe.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        report.add("6", "memory of a training process", None, "", note="probe timed out")
        return
    except (ValueError, IndexError):  # it failed: its last words say why
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1][:80]
        report.add("6", "memory of a training process", None, "", note=f"probe failed: {last}")
        return
    main, workers = memory["main"], memory["workers"]
    steps = f"VmHWM of a fresh process from train.build_run, {MEMORY_PROBE_STEPS} steps"
    report.add("6", "peak RSS, training process", [main["peak_rss"]], "MB", key="peak_rss_main", note=steps)
    report.add("6", f"peak RSS, its {len(workers)} loader workers (sum)", [total(w["peak_rss"] for w in workers)],
               "MB", key="peak_rss_workers", note="shared pages counted in each")
    report.add("6", "PSS, process + workers", [total([main["pss"]] + [w["pss"] for w in workers])], "MB",
               key="pss_total", note="shared pages split between them")
    if memory["gpu_peak_mb"] is not None:
        report.add("6", "peak GPU memory allocated", [memory["gpu_peak_mb"]], "MB", key="peak_gpu_memory")


def memory_probe(args, device):
    """The child process of bench_memory: prints one JSON line."""
    with tempfile.TemporaryDirectory(prefix="mobilenetv3-memory-") as folder:
        pipe = Pipeline(args, device, args.memory_probe, folder, args.workers)
        pipe.run(MEMORY_PROBE_STEPS)
        sync(device)
        result = {"main": memory_mb(), "workers": [memory_mb(pid) for pid in child_pids()],
                  "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        pipe.close()
    print(json.dumps(result))
    return 0


def bench_precision(report, args, device):
    """fp32 against bf16 autocast (and fp16 + GradScaler on CUDA), train.py's default memory format."""
    emulated = device.type == "cpu" and not utils.cpu_has_native_bf16()
    batch, img_size = args.batch_size, args.img_size
    if emulated:  # bf16 emulated in software is ~10x slower than fp32: a smaller step tells the ratio
        batch, img_size = min(4, batch), max(32, img_size // 2)
    choices = {"fp32": {"amp": False}, "bf16 autocast": {"amp": True, "amp_dtype": "bfloat16"}}
    if device.type == "cuda":
        choices["fp16 autocast + GradScaler"] = {"amp": True, "amp_dtype": "float16"}
    default_targs = train_args(args, device)
    variants, is_default = [], {}
    for name, overrides in choices.items():
        targs = train_args(args, device, **overrides)
        trainer = make_trainer(train_net(targs), targs, device)
        variants.append(model_only(f"  {name}", trainer, batch, img_size, device))
        is_default[variants[-1].name] = precision_name(targs, device) == precision_name(default_targs, device)
    rates = compare(variants, args, device)
    base = next(v for v in variants if is_default[v.name])
    note = f"{batch} x {img_size}px" + (": bf16 is emulated on this CPU" if emulated else "")
    report.add("C", f"precision, model-only step (train.py default: {base.name.strip()})", None, "", note=note)
    for v in variants:
        report.add("C", v.name + (" (default)" if v is base else ""), rates[v.name], "img/s", variant=v,
                   base=None if v is base else (rates[base.name], "of default"), choice=v is not base,
                   key="precision_" + v.name.strip().split()[0])


def bench_optimizers(report, args, device, step_rate):
    """What runs after backward, alone: Adam as foreach (train.py's CPU choice), as a for-loop and fused
    (train.py's CUDA choice), and train.py's EMA update (one foreach lerp over ~300 tensors) against torch-ema's
    own Python loop over them."""
    targs = train_args(args, device)
    net = train_net(targs).to(device)
    chosen = train.make_optimizer(net, targs, device)
    for param in net.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in chosen.param_groups]
    default = "fused" if chosen.defaults.get("fused") else "foreach" if chosen.defaults.get("foreach") else "for-loop"
    variants, unavailable = [], {}
    implementations = {"foreach": {"foreach": True}, "for-loop": {"foreach": False}, "fused": {"fused": True}}
    for name, option in implementations.items():
        try:
            optimizer = type(chosen)(groups, lr=targs.lr, **option)
            optimizer.step()
        except (RuntimeError, ValueError) as error:  # fused Adam on a CPU needs torch 2.4 or later
            unavailable[name] = str(error).splitlines()[0][:60]
            continue
        variants.append(Variant(f"  Adam {name}", repeated(optimizer.step), 1))

    ema = train.make_ema(net, targs.ema_decay)
    torch_ema_loop = functools.partial(torch_ema.ExponentialMovingAverage.update, ema)  # its own per-tensor loop
    variants += [Variant("  EMA update, one foreach lerp", repeated(ema.update), 1),
                 Variant("  EMA update, torch-ema loop", repeated(torch_ema_loop), 1)]

    rates = compare(variants, args, device)
    step_ms = 1000 * args.batch_size / step_rate
    report.add("C", f"after backward, alone (train.py: Adam {default}, foreach EMA; a training step: {step_ms:.0f} ms)",
               None, "")
    bases = {"Adam": f"  Adam {default}", "EMA": "  EMA update, one foreach lerp"}
    for v in variants:
        base = bases[v.name.split()[0]]
        ratios = paired_ratios(rates[v.name], rates[base]) if v.name != base and base in rates else None
        ms = [1000 / rate for rate in rates[v.name]]
        report.add("C", v.name + (" (default)" if v.name == base else ""), ms, "ms/step", variant=v, ratios=ratios,
                   ratio_text="x speed of default" if ratios else "", choice=ratios is not None,
                   note=f"{100 * statistics.median(ms) / step_ms:.1f}% of a step",
                   key=v.name.strip().replace(", ", "_").replace(" ", "_").lower())
    for name, why in unavailable.items():
        report.add("C", f"  Adam {name}", None, "", note=f"unavailable: {why}")


def bench_compile(report, args, device):
    """torch.compile of the model: compile time (the first step) and the steady-state speed against eager."""
    targs = train_args(args, device)
    eager = make_trainer(train_net(targs), targs, device)
    # train.build_trainer compiles it
    compiled = make_trainer(train_net(targs), train_args(args, device, compile=True), device)
    variants = [model_only("  eager", eager, args.batch_size, args.img_size, device),
                model_only("  torch.compile", compiled, args.batch_size, args.img_size, device)]
    start = time.perf_counter()
    variants[1].run(1)
    sync(device)
    compile_seconds = time.perf_counter() - start
    rates = compare(variants, args, device)
    report.add("C", "torch.compile, model-only step", None, "")
    report.add("C", "  compile (first step)", [compile_seconds], "s", key="compile_seconds")
    report.add("C", "  eager", rates["  eager"], "img/s", variant=variants[0], key="compile_eager")
    report.add("C", "  compiled", rates["  torch.compile"], "img/s", variant=variants[1],
               base=(rates["  eager"], "of eager"), choice=True, key="compile_compiled")


def bench_eval(report, args, device, trainer, splits):
    """Section 5: evaluate.evaluate (what evaluate.py and validation run) over a val loader, one pass per step."""
    val_index = splits.val or splits.train
    images = args.batch_size * max(4, 2 * args.workers)
    val_size = round(args.img_size / 0.875)
    val_set = dataset.ImageFiles(repeat_index(val_index, images), dataset.val_transform(val_size, args.img_size))
    loader = dataset.build_loader(val_set, dataset.EpochSampler(len(val_set), shuffle=False), args.batch_size,
                                  args.workers, train=False, pin_memory=device.type == "cuda")  # as evaluate.py

    def run(steps):
        for _ in range(steps):
            evaluate.evaluate(trainer.net, loader, device, trainer.autocast, trainer.config.norm,
                              trainer.config.channels_last, show_progress=False)
    variant = Variant("evaluation", run, images, settle=wait_until_idle)
    rates = compare([variant], args, device)
    trainer.net.train()
    report.add("5", f"evaluation, evaluate.evaluate ({args.workers} workers, {images} images a pass)", rates["evaluation"],
               "img/s", variant=variant, note="incl. each pass's loader start", key="evaluation")
    del loader
    gc.collect()


def bench_inference(report, args, splits, folder):
    """Section I: what a deployment runs, on the CPU: PyTorch eager (inference mode) against export.py's ONNX
    files in onnxruntime, fp32 and static int8 (calibrated on real images as export.py --int8 does), at batch 1
    (latency) and 32 (throughput), one image size, the same threads; and the size of each file. The network has
    random weights and 1000 classes: speed does not depend on what the weights learned."""
    import export
    img_size, threads = args.img_size, torch.get_num_threads()
    net = model_lib.build_model(args.arch, args.width_mult, 1000)
    calibration = export.load_images(splits.train, args.calib_images, round(img_size / 0.875), img_size, "imagenet")
    # BatchNorm statistics of real images (one pass, cumulative), so that the activations, and so the int8
    # ranges, have a trained network's scale; with the initial ones some tensors were constant, which the
    # percentile calibrator cannot take
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        net.train()(calibration)
    net.eval()
    paths = {"pytorch": os.path.join(folder, "model.pth"), "fp32": os.path.join(folder, "model.onnx"),
             "int8": os.path.join(folder, "model.int8.onnx")}
    torch.save(net.state_dict(), paths["pytorch"])
    for precision, images in (("fp32", None), ("int8", calibration)):
        export.write_onnx(net, paths[precision], {}, export.DEFAULT_OPSET, img_size, None, images)
    sessions = {precision: export.onnx_session(paths[precision], threads) for precision in ("fp32", "int8")}

    report.add("I", f"inference on the CPU, {img_size}px, {threads} threads (onnxruntime {version('onnxruntime')}, "
               f"opset {export.DEFAULT_OPSET})", None, "")
    for batch_size in INFERENCE_BATCHES:
        images = torch.randn(batch_size, 3, img_size, img_size)
        array = images.numpy()

        def eager():
            with torch.inference_mode():
                net(images)
        variants = [Variant("PyTorch eager", repeated(eager), batch_size)]
        for precision, session in sessions.items():
            call = functools.partial(session.run, None, {"images": array})
            variants.append(Variant(f"ONNX {precision}", repeated(call), batch_size))
        rates = compare(variants, args, torch.device("cpu"))
        unit, as_unit = ("ms", lambda r: 1000 * batch_size / r) if batch_size == 1 else ("img/s", lambda r: r)
        report.add("I", f"  batch {batch_size}: " + ("latency" if batch_size == 1 else "throughput"), None, "")
        for v in variants:
            base = {"ONNX fp32": "PyTorch eager", "ONNX int8": "ONNX fp32"}.get(v.name)
            ratios = paired_ratios(rates[v.name], rates[base]) if base else None
            report.add("I", f"    {v.name}", [as_unit(r) for r in rates[v.name]], unit, variant=v, ratios=ratios,
                       ratio_text=f"x speed of {base}" if base else "",
                       target=TARGETS["int8_vs_fp32"] if v.name == "ONNX int8" and batch_size == 1 else None,
                       key=f"inference_b{batch_size}_" + v.name.lower().replace(" ", "_"))
    sizes = {name: os.path.getsize(path) / 2**20 for name, path in paths.items()}
    report.add("I", "  file size", None, "")
    for name, label in (("pytorch", "PyTorch state dict"), ("fp32", "ONNX fp32"), ("int8", "ONNX int8")):
        report.add("I", f"    {label}", [sizes[name]], "MB", ratio=sizes["pytorch"] / sizes[name] if name != "pytorch"
                   else None, ratio_text="x smaller" if name != "pytorch" else "", key=f"file_mb_{name}")


def version(package):
    import importlib.metadata
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def start_worker_with_torchvision_decoder(nice, worker_id):
    """A loader worker's start (dataset.start_worker) that also switches it to torchvision's decode_jpeg, the
    decoder before TorchCodec: decode_jpeg_cpu falls back to it when decode.torchcodec_decode_jpeg is None. Set in
    the worker itself, so it holds however the worker was started (fork or spawn) and the parent keeps TorchCodec."""
    dataset.start_worker(nice, worker_id)
    decode.torchcodec_decode_jpeg = None


def bench_loader(report, args, device, splits, root, folder):
    """Section 4a: the loader alone, one worker each, side by side: dataset.py's (uint8 batches, normalized later
    on the training device by normalize_batch) with its defaults (TorchCodec's decoder, scaled decoding), with
    torchvision's decoder instead, with scaled decoding off, and on a pre-resized copy of the same images
    (tools/resize_copy.py, shorter side 320); and torchvision's ImageFolder with the standard PIL transforms
    (normalized float batches). Each window loads exactly LOADER_BATCHES batches starting from an idle worker,
    so it times the worker, not a queue filled beforehand. The main process only receives, except in the variant
    that also runs normalize_batch here, as a CPU training process would."""
    batch = min(args.batch_size, 32)
    per_window = batch * LOADER_BATCHES
    mean, std = dataset.NORMS["imagenet"]
    start = time.perf_counter()
    resized_root = os.path.join(folder, f"resized-{RESIZED_SHORT_SIDE}")
    copied = sum(resize_copy.make_resized_copy(root, resized_root, RESIZED_SHORT_SIDE).values())
    resized = layouts.find_dataset(resized_root, cache_dir=os.path.join(folder, "cache")).train
    copy_seconds = time.perf_counter() - start

    def our_loader(index, scaled_decoding=True, torchvision_decoder=False):
        """run(steps, normalize=False) over dataset.py's loader with one worker, a new epoch each step."""
        image_set = dataset.ImageFiles(repeat_index(index, per_window), dataset.train_transform(args.img_size),
                                       scaled_decoding=scaled_decoding)
        sampler = dataset.EpochSampler(len(image_set), shuffle=True, seed=0, drop_last=True)
        loader = dataset.build_loader(image_set, sampler, batch, 1, train=True)
        if torchvision_decoder:
            loader.worker_init_fn = functools.partial(start_worker_with_torchvision_decoder, 0)
        epochs = iter(range(1, 10**9))

        def run(steps, normalize=False):
            for _ in range(steps):
                sampler.set_epoch(next(epochs))  # a new shuffle and new augmentations every window
                for images, _ in loader:
                    if normalize:
                        dataset.normalize_batch(images, mean, std)
        return run

    image_folder = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=pil_transforms.Compose([
        pil_transforms.RandomResizedCrop(args.img_size), pil_transforms.RandomHorizontalFlip(),
        pil_transforms.ToTensor(), pil_transforms.Normalize(mean, std)]))
    folder_loader = torch.utils.data.DataLoader(
        image_folder, batch_size=batch, num_workers=1, persistent_workers=True,
        sampler=torch.utils.data.RandomSampler(image_folder, num_samples=per_window))

    def run_folder(steps):
        for _ in range(steps):
            for _ in folder_loader:
                pass

    has_torchcodec = decode.torchcodec_decode_jpeg is not None
    decoder = "TorchCodec" if has_torchcodec else "torchvision's decode_jpeg (torchcodec does not import)"
    ours = our_loader(splits.train)
    variants = {"loader_ours": Variant(f"  dataset.py loader ({decoder}, scaled decoding, v2 on uint8)", ours,
                                       per_window),
                "loader_ours_normalized": Variant("  same + normalize_batch in this process",
                                                  lambda steps: ours(steps, True), per_window)}
    if has_torchcodec:  # else the default already is torchvision's decoder
        variants["loader_torchvision_decoder"] = Variant(
            "  torchvision's decode_jpeg (the decoder before TorchCodec)",
            our_loader(splits.train, torchvision_decoder=True), per_window)
    variants["loader_scaled_decoding_off"] = Variant("  scaled decoding off",
                                                     our_loader(splits.train, scaled_decoding=False), per_window)
    variants["loader_resized_copy"] = Variant(f"  a pre-resized copy (shorter side {RESIZED_SHORT_SIDE})",
                                              our_loader(resized), per_window)
    variants["loader_imagefolder"] = Variant("  ImageFolder + PIL transforms", run_folder, per_window)
    rates = compare(list(variants.values()), args, device)
    default, theirs = rates[variants["loader_ours"].name], rates[variants["loader_imagefolder"].name]
    notes = {"loader_ours": "uint8 out; normalized on the device",
             "loader_scaled_decoding_off": f"only crop boxes >= 2x the output gain: few at {args.img_size}px",
             "loader_resized_copy": f"{copied} files copied in {copy_seconds:.0f}s by tools/resize_copy.py",
             "loader_imagefolder": "normalized floats out"}
    report.add("4", f"loader alone, 1 worker, {batch} x {args.img_size}px batches", None, "")
    for key, v in variants.items():
        base = {"loader_ours": None, "loader_ours_normalized": (theirs, "of ImageFolder"),
                "loader_imagefolder": None}.get(key, (default, "of default"))
        report.add("4", v.name + (" (default)" if key == "loader_ours" else ""), rates[v.name], "img/s/worker",
                   variant=v, base=base, note=notes.get(key, ""), key=key)
    report.add("4", "  dataset.py / ImageFolder", None, "", ratios=paired_ratios(default, theirs),
               target=TARGETS["loader_vs_imagefolder"], key="loader_vs_imagefolder")
    del variants, ours, folder_loader
    gc.collect()


def bench_indexing(report, args, folder):
    """Section 4b: list a generated tree of empty files with dataset.py's indexer (no listing cache yet, then
    cached) and with ImageFolder. The OS has the folders cached in both cases (they were just written)."""
    classes = min(100, args.index_files)
    per_class = args.index_files // classes
    tree = os.path.join(folder, "index-tree")
    for c in range(classes):
        os.makedirs(os.path.join(tree, f"n{c:08d}"))
        for i in range(per_class):
            os.close(os.open(os.path.join(tree, f"n{c:08d}", f"n{c:08d}_{i}.JPEG"), os.O_CREAT | os.O_WRONLY))
    times = {"cold": [], "cached": [], "imagefolder": []}
    for rep in range(args.windows):
        cache = os.path.join(folder, f"index-cache-{rep}")
        for kind in ("cold", "cached"):
            start = time.perf_counter()
            _, index = layouts.class_folder_index(tree, cache)
            times[kind].append(time.perf_counter() - start)
        start = time.perf_counter()
        found = torchvision.datasets.ImageFolder(tree)
        times["imagefolder"].append(time.perf_counter() - start)
        assert len(index) == len(found) == classes * per_class
    shutil.rmtree(tree)
    report.add("4", f"index {classes * per_class} files in {classes} class folders", None, "")
    report.add("4", "  dataset.py, first listing", times["cold"], "s", key="index_cold")
    report.add("4", "  dataset.py, from its listing cache", times["cached"], "s", key="index_cached")
    report.add("4", "  ImageFolder", times["imagefolder"], "s", key="index_imagefolder",
               ratios=paired_ratios(times["imagefolder"], times["cold"]), ratio_text="x the first listing's time")


class TouchIndex(torch.utils.data.Dataset):
    """Items are chunks of positions; reading each entry of the index is all it does (as a real __getitem__
    reads a path). Returns the worker's pid so the caller knows whose memory to read."""

    def __init__(self, lookup, size):
        self.lookup, self.size = lookup, size

    def __len__(self):
        return self.size

    def __getitem__(self, chunk):
        for i in chunk.tolist():
            self.lookup(i)
        return os.getpid()


def worker_memory(lookup, size, workers):
    """USS and PSS (MB) of each worker after the workers together read every entry once, in random order."""
    chunks = np.array_split(np.random.default_rng(0).permutation(size), workers * 16)
    with warnings.catch_warnings():  # more workers than cores is the point here
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = torch.utils.data.DataLoader(TouchIndex(lookup, size), batch_size=None, sampler=chunks,
                                             num_workers=workers, persistent_workers=True)
        pids = set(loader)  # persistent workers stay alive after the epoch: measure them now
    memory = [memory_mb(pid) for pid in pids]
    del loader
    gc.collect()
    return memory


def bench_index_memory(report, args):
    """Section 4c: workers reading a 1.28M-entry index. Reading a Python str updates its reference count, which
    copies its memory page into the worker (copy-on-write after fork); a FileIndex's numpy arrays are only read."""
    n = args.index_entries
    classes = min(1000, n)
    names = [f"n{c:08d}/n{c:08d}_{i:07d}.JPEG" for c in range(classes) for i in range(n // classes)]
    labels = np.arange(len(names)) // (n // classes)
    index = layouts.FileIndex("/nonexistent", [os.fsencode(name) for name in names], labels)
    list_mb = (sys.getsizeof(names) + sum(sys.getsizeof(name) for name in names)) / 2**20
    index_mb = (index.paths.nbytes + index.labels.nbytes) / 2**20
    gc.collect()
    memory = {"FileIndex": worker_memory(index.path, len(index), args.memory_workers),
              "list of str": worker_memory(names.__getitem__, len(names), args.memory_workers)}
    report.add("4", f"{args.memory_workers} workers reading a {len(names)}-entry index (sum over workers)", None, "")
    uss = {}
    for kind, size in (("FileIndex", index_mb), ("list of str", list_mb)):
        uss[kind] = total(m["uss"] for m in memory[kind])
        pss = total(m["pss"] for m in memory[kind])
        report.add("4", f"  {kind} ({size:.0f} MB in the parent): private (USS)", [uss[kind]], "MB",
                   note=f"PSS {pss:.0f} MB" if pss else "", key=f"workers_uss_{kind.split()[0]}")
    if uss["FileIndex"] and uss["list of str"]:
        report.add("4", "  list / FileIndex, worker private memory", None, "",
                   ratio=uss["list of str"] / uss["FileIndex"], key="workers_uss_ratio")


def bench_gpu_decode(report, args, device, splits):
    """JPEG decoding: libjpeg-turbo on one CPU core against nvjpeg on batches of file bytes (where it pays),
    both through dataset.py's own calls (decode_jpeg_cpu, and decode_jpegs_on as --decode-on device uses it)."""
    read = (decode.read_image_file(splits.train.path(i)) for i in range(min(256, len(splits.train))))
    data = [item for item, size in read if size is not None]  # JPEGs (other files come back decoded)
    try:
        decode.device_jpeg_decoder(device)
    except dataset.DataError as error:
        report.add("G", "GPU decoding", None, "", note=str(error))
        return
    usable = []
    for item in data:  # nvjpeg refuses some JPEGs (CMYK, progressive on older versions): leave them out
        with contextlib.suppress(RuntimeError):
            decode.decode_jpegs_on(device, [item])
            usable.append(item)
    if not usable:
        report.add("G", "GPU decoding", None, "", note="no JPEG nvjpeg can decode")
        return
    cpu_batch = usable[:32]
    on_cpu = lambda: [decode.decode_jpeg_cpu(item) for item in cpu_batch]  # noqa: E731
    variants = [Variant("  CPU, 1 core", repeated(on_cpu), len(cpu_batch), threads=1)]
    for size in (1, 8, 32, 128):
        batch = [usable[i % len(usable)] for i in range(size)]
        # one nvjpeg call for the whole list
        on_gpu = lambda batch=batch: decode.decode_jpegs_on(device, batch)  # noqa: E731
        variants.append(Variant(f"  GPU, batches of {size}", repeated(on_gpu), size))
    rates = compare(variants, args, device)
    cpu_rate = rates[variants[0].name]
    report.add("G", f"JPEG decoding ({len(usable)} files, {decode.device_jpeg_decoder(device)}); ratio = CPU cores "
               "one GPU replaces", None, "")
    report.add("G", variants[0].name, cpu_rate, "img/s", variant=variants[0], key="decode_cpu")
    for v in variants[1:]:
        report.add("G", v.name, rates[v.name], "img/s", variant=v, base=(cpu_rate, "cores"),
                   key="decode_gpu_" + v.name.split()[-1])


# ---------------------------------------------------------------- data

def source_images(data_path, folder, limit):
    """([(image path, class name)], description): the images to benchmark with."""
    if data_path is None and os.path.isdir(SAMPLE_DATA):
        data_path = SAMPLE_DATA
    if data_path is None:
        return generate_images(os.path.join(folder, "generated")), "200 generated photo-like JPEGs, 500x375"
    data_path = os.path.abspath(data_path)
    if not os.path.isdir(data_path):
        raise UserError(f"--data-path {data_path} is not a folder")
    if os.path.isdir(os.path.join(data_path, "train")) or layouts.kaggle_root(data_path):
        try:
            splits = layouts.find_dataset(data_path)
        except dataset.DataError as error:
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
    images = []
    for i in range(count):
        start, end = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
        angle, waves = rng.uniform(0, 2 * np.pi), rng.uniform(2, 12)
        along = (x * np.cos(angle) + y * np.sin(angle))[..., None]
        pixels = start + (end - start) * along + 25 * np.sin(waves * (x + y))[..., None]
        pixels += rng.normal(0, 8, pixels.shape)
        path = os.path.join(folder, f"class{i % classes}_{i:04d}.JPEG")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        images.append((path, f"class{i % classes}"))
    return images


def lay_out(images, root, min_train=0):
    """root/train/<class>/ and root/val/<class>/ holding links to the images (copies where links fail); train/
    links them several times over when that is needed to hold min_train images (a batch of train.py's)."""
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
    """Table rows (section, name, value, unit, ratio, target) and every figure by key, for the JSON."""

    def __init__(self):
        self.rows, self.figures = [], {}

    def add(self, section, name, values, unit, variant=None, base=None, ratios=None, ratio=None, ratio_text="",
            target=None, choice=False, note="", key=None):
        """values: one figure per window; base: (the windows of what to divide by, the ratio's label); ratios:
        per-round ratios (their median is shown, their range goes in the note); ratio: a single ratio."""
        values = values if values and None not in values else None  # None: not measurable here (no /proc)
        value = statistics.median(values) if values else None
        if base is not None:
            base_values, ratio_text = base
            ratios = paired_ratios(values, base_values)
        if ratios:
            ratio = statistics.median(ratios)
            if len(ratios) > 1:
                note = f"rounds {min(ratios):.2f}-{max(ratios):.2f}" + (f"; {note}" if note else "")
        if not ratio_text and ratio is not None:
            ratio_text = "x"
        result = ""
        if target is not None and ratio is not None:
            result = "PASS" if ratio >= target else "MISS"
        elif choice and ratio is not None:  # an alternative to a default: is it worth switching?
            result = "faster" if ratio > 1.03 else "slower" if ratio < 0.97 else "same"
        self.rows.append({"section": section, "name": name, "value": value, "unit": unit, "ratio": ratio,
                          "ratio_text": ratio_text, "target": target, "result": result, "note": note})
        if key:
            self.figures[key] = {**(figure(values, variant) if values else {}), "unit": unit, "ratio": ratio,
                                 "ratios": ratios, "target": target, "result": result, "name": name.strip(),
                                 "note": note}

    def print(self, header):
        cells = [("#", "measurement", "value", "unit", "ratio", "target", "result", "note")]
        for r in sorted(self.rows, key=lambda r: SECTIONS.index(r["section"])):  # stable: keeps order within one
            value = "" if r["value"] is None else f"{r['value']:.3g}" if r["value"] < 10 else f"{r['value']:.1f}"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f} {r['ratio_text']}".strip()
            target = "" if r["target"] is None else f">= {r['target']:g}"
            cells.append((r["section"], r["name"], value, r["unit"], ratio, target, r["result"], r["note"]))
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        right = {2, 4}  # numbers align on the right
        print("\n".join(header))
        for n, row in enumerate(cells):
            print("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                            for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
            if n == 0:
                print("-" * (sum(widths) + 2 * (len(widths) - 1)))


def environment(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": str(device), "device_name": name, "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": utils.cpu_has_native_bf16(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def main(args):
    started = time.perf_counter()
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == get_args_parser().get_default(name):
                setattr(args, name, value)
    device = utils.pick_device(args.device)
    args.batch_size = args.batch_size or (16 if device.type == "cpu" else 128)
    args.workers = utils.default_workers(device) if args.workers is None else args.workers
    for flag, value in {"--batch-size": args.batch_size, "--windows": args.windows, "--img-size": args.img_size,
                        "--max-images": args.max_images, "--memory-workers": args.memory_workers,
                        "--calib-images": args.calib_images}.items():
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if args.busy < 0 or args.busy_seconds <= 0:
        raise UserError(f"--busy must be 0 or more and --busy-seconds positive (got {args.busy}, {args.busy_seconds})")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1 (got {args.threads})")
    if args.workers < 1:
        raise UserError("--workers must be at least 1: the pipeline benchmark measures loader processes")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_decode is None:
        args.gpu_decode = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.main sets it
    utils.seed_everything(0)
    if args.memory_probe:
        return memory_probe(args, device)
    env = environment(device)
    report = Report()

    with tempfile.TemporaryDirectory(prefix="mobilenetv3-benchmark-") as folder, \
            mock.patch.dict(os.environ, XDG_CACHE_HOME=os.path.join(folder, "cache")):  # dataset.py's index cache
        images, data_description = source_images(args.data_path, folder, args.max_images)
        root = lay_out(images, os.path.join(folder, "images"), min_train=args.batch_size)
        splits = layouts.find_dataset(root, cache_dir=os.path.join(folder, "cache"))
        print(f"benchmarking on {env['device_name']} ({device}) with {data_description} ...", flush=True)

        if not args.inference_only:
            trainer, step_rates = bench_training(report, args, device, root, folder)
            bench_memory(report, args, device, root, folder)
            bench_eval(report, args, device, trainer, splits)
            bench_loader(report, args, device, splits, root, folder)
            if args.index_files > 0:
                bench_indexing(report, args, folder)
            if args.index_entries > 0:
                bench_index_memory(report, args)
            bench_precision(report, args, device)
            bench_optimizers(report, args, device, statistics.median(step_rates))
            if args.compile:
                bench_compile(report, args, device)
            if args.gpu_decode and device.type == "cuda":
                bench_gpu_decode(report, args, device, splits)
        if args.inference or args.inference_only:
            bench_inference(report, args, splits, folder)

    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    wall = time.perf_counter() - started
    load = env["load_average_start"], env["load_average_end"]
    report.print([
        "",
        f"MobileNetV3 benchmark: {env['device_name']} ({device}, {env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch threads) | torch {env['torch']} | {args.arch} {args.width_mult:g} | "
        f"batch {args.batch_size} | {args.img_size}px | {args.workers} workers",
        f"data: {data_description} | median of {args.windows} windows of ~{args.window_seconds:g}s; ratios are "
        f"medians of per-round ratios | load average {load[0][0] if load[0] else 'n/a'} -> "
        f"{load[1][0] if load[1] else 'n/a'} | {wall:.0f}s",
        "sections: 1 model-only step, 2 vs torchvision, 3 full pipeline, 4 data, 5 evaluation, 6 memory, "
        "I inference (CPU, PyTorch vs ONNX fp32 vs int8), C choices behind train.py's defaults, G GPU decoding",
        ""])
    if args.json:
        config = {k: v for k, v in vars(args).items()}
        with open(args.json, "w") as f:
            json.dump({"config": config, "environment": env, "data": data_description, "wall_seconds": wall,
                       "figures": report.figures, "rows": report.rows}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, get_args_parser().parse_args()))
