"""Helpers that are not the training recipe: one-line errors, devices and torch.distributed, metrics, random
states and stop signals. Every other module imports from here; this file imports none of them.
"""
import contextlib
import os
import random
import re
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

class UserError(Exception):
    """A problem with what the user gave us (flags, files). Shown as one line, no traceback."""


class CheckpointError(UserError):
    pass


class DataError(UserError):
    """A problem with the data that the user has to fix; the message is one line."""


# what a collective raises when another rank of the run has gone (Gloo, NCCL)
PEER_FAILURE = re.compile(r"Connection closed by peer|Connection reset by peer|remote worker|communicator was aborted")


def warn(message, every_rank=True):
    """One 'warning: ...' line on stderr; every_rank=False: on rank 0 only (what every rank finds alike). The main
    process writes through tqdm.write, which redraws a progress bar below it; a loader worker clears the line."""
    if not every_rank and os.environ.get("RANK", "0") != "0":
        return
    if torch.utils.data.get_worker_info() is None:
        tqdm.write(f"warning: {message}", file=sys.stderr)
    else:
        clear_line = "\r\x1b[K" if sys.stderr.isatty() else ""
        print(f"{clear_line}warning: {message}", file=sys.stderr, flush=True)


def plural(count, word):
    """'1 class', '2 classes', '3 images', '2 epochs'."""
    if count == 1:
        return f"1 {word}"
    return f"{count} {word}es" if word.endswith(("s", "x", "sh")) else f"{count} {word}s"


def run_cli(main, args):
    """Run main(args); turn user errors into one line on stderr and exit code 2.

    In a distributed run, a rank whose peer failed sees its collectives fail (Gloo: the connection closes; the
    error of the failed rank is printed by that rank): that is one line too, exit code 3, not a traceback."""
    try:
        return main(args) or 0
    except UserError as e:
        # an error raised in a DataLoader worker arrives with the worker's traceback: keep its last line
        lines = [line for line in str(e).splitlines() if line.strip()]
        print(f"error: {lines[-1].split(': ', 1)[-1] if len(lines) > 1 else str(e)}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:  # torch.distributed.DistError is one; Gloo's lost connections are plain ones
        if not (is_distributed() and (isinstance(e, dist.DistError) or PEER_FAILURE.search(str(e)))):
            raise
        reason = " ".join(str(e).split())[:160]
        print(f"error: rank {dist.get_rank()}: another process of this run stopped, so this one stops too ({reason})",
              file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()  # loader workers are ended at exit by dataset.end_loader_workers


def check_versions():
    """The lower bounds of requirements.txt that the code relies on (nn.utils.get_total_norm and
    clip_grads_with_norm_ are torch 2.6; transforms v2's make_params is torchvision 0.21)."""
    def version(text):
        return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:2])
    import torchvision
    for name, installed, needed in (("torch", torch.__version__, (2, 6)), ("torchvision", torchvision.__version__, (0, 21))):
        if version(installed) < needed:
            raise UserError(f"{name} {installed} is too old: this repository needs {name} >= "
                            f"{'.'.join(map(str, needed))} (pip install -r requirements.txt)")
    if sys.version_info < (3, 10):
        raise UserError(f"Python {sys.version.split()[0]} is too old: this repository needs Python >= 3.10")


# ---------------------------------------------------------------- devices and distributed

def cpu_has_native_bf16():
    """Whether the CPU computes bf16 natively (elsewhere bf16 autocast is emulated: docs/performance.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_for(device, amp, amp_dtype="auto"):
    """(autocast context factory, GradScaler or None, name) for --amp / --amp-dtype on device.

    fp16 always comes with a GradScaler, on every device that autocasts it (CPU included), so the CPU tests run
    the scaler code a CUDA fp16 run uses; bf16 has fp32's range and needs none. "auto" is fp16 on CUDA, bf16
    elsewhere. The name comes from the dtype: "fp16 + GradScaler", "bf16 autocast" or "fp32"."""
    if not amp:
        return contextlib.nullcontext, None, "fp32"
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(amp_dtype)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    if dtype == torch.float16:
        return (lambda: torch.autocast(device.type, dtype=dtype)), torch.amp.GradScaler(device.type), "fp16 + GradScaler"
    return (lambda: torch.autocast(device.type, dtype=dtype)), None, "bf16 autocast"


def sum_dtype(device):
    """For sums that must be exact over a whole epoch or validation set (float64; MPS has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown --device {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available on this machine")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for, but this machine has no usable MPS (Apple GPU) device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_cores():
    """CPU cores this process may use, shared among the processes torchrun started on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_workers(device=None):
    """Data loader processes: this process's share of the CPU cores, at most 8. When the model also trains on the
    CPU, half of them: the rest compute the model (docs/performance.md)."""
    cores = cpu_cores()
    return max(1, min(8, cores // 2 if device is not None and device.type == "cpu" else cores))


def launched_by_torchrun():
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def process_group_backend(device):
    """The backend of each device type. NCCL serves CUDA tensors only, so a CUDA run also gets Gloo for the CPU
    tensors and Python objects the loop exchanges (stop flags, RNG states, error messages); a CPU run gets Gloo."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "cpu:gloo"


def setup_distributed(device_name="auto"):
    """Start torch.distributed when launched by torchrun, even for one process, so that `torchrun
    --nproc_per_node=1` runs exactly the code of an 8-GPU run (process group, DDP, collectives, rank-0 writes).
    Returns (rank, world_size, device)."""
    device = pick_device(device_name)
    if not launched_by_torchrun():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=process_group_backend(device))
    except (RuntimeError, ValueError) as e:  # DistNetworkError, Gloo's "connectFullMesh failed", a timeout
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"rank {os.environ['RANK']}: could not join the process group ({reason}); with torchrun "
                        "--max-restarts, launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see README)") from None
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if not is_distributed() or dist.get_rank() == 0:
        print(*args, **kwargs)


def backend_name():
    """For the start-up line: the process group's backends, or "none" in a single process."""
    return dist.get_backend() if is_distributed() else "none"


def _collective(tensor, op):
    """Run op on tensor, through a CPU copy for devices no backend serves (MPS: Gloo takes CPU tensors only)."""
    if tensor.device.type in ("cpu", "cuda"):
        op(tensor)
        return tensor
    cpu = tensor.cpu()
    op(cpu)
    tensor.copy_(cpu)
    return tensor


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks (in place) and return it; a no-op in a single process."""
    if is_distributed():
        _collective(tensor, dist.all_reduce)
    return tensor


def any_rank(*flags):
    """For each flag, True on every rank when it is true on any rank: decisions that change the flow must agree.
    One all-reduce of a CPU tensor (which the Gloo backend carries on every device type) for all the flags;
    one flag gives a bool, several a list."""
    agreed = [bool(flag) for flag in flags]
    if is_distributed():
        box = torch.tensor(agreed, dtype=torch.float32)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        agreed = [bool(value) for value in box.tolist()]
    return agreed[0] if len(agreed) == 1 else agreed


def broadcast_tensors(tensors, src=0):
    """Copy rank src's tensors to every rank (BN statistics drift apart per rank between DDP's broadcasts)."""
    if is_distributed():
        for tensor in tensors:
            _collective(tensor, lambda t: dist.broadcast(t, src))


def fail_together(step, *args, **kwargs):
    """step(*args, **kwargs) on every rank; if it raised a UserError on any rank, every rank raises: a failing rank
    its own error, the others the lowest failing rank's message, so no rank goes on to wait for a peer that has
    stopped. step must run no collective itself, since a failing rank would skip it."""
    error, result = None, None
    try:
        result = step(*args, **kwargs)
    except UserError as e:
        error = e
    errors = gather_objects(None if error is None else (type(error).__name__, str(error)))
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise error if error is not None else UserError(failed[1])
    return result


def gather_objects(obj):
    """A list with every rank's obj (in rank order); [obj] in a single process."""
    if not is_distributed():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def broadcast_object(obj, src=0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------- metrics

class MetricMeter:
    """Running sums of training figures, kept on the device (reading them is a host sync): loss x images, top-1
    hits, images and distillation term x images, as train.train_step returns them; with the seconds since
    the last reset and the time spent waiting for data in them."""

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=sum_dtype(device), device=device)
        self.reset()

    def reset(self):
        self.sums.zero_()
        self.start, self.data_wait = time.perf_counter(), 0.0

    def add(self, sums):
        self.sums += sums

    def read(self):
        """{loss, top1 (%), images, kd_loss, time (seconds)}: per-image means of the sums."""
        loss, hits, images, kd = self.sums.tolist()
        count = max(images, 1)
        return {"loss": loss / count, "top1": 100 * hits / count, "images": int(images), "kd_loss": kd / count,
                "time": time.perf_counter() - self.start}


def correct_topk(logits, target, topk=(1, 5)):
    """Number of samples whose target is within the top-k predictions, for each k (as a float tensor).

    Counts rather than percentages so that sums over batches and ranks are exact.
    target may be class indices or (mixup/cutmix) soft labels, scored against their argmax.
    """
    if target.ndim == 2:
        target = target.argmax(dim=1)
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(target[:, None])
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in topk]).float()


# ---------------------------------------------------------------- output folders

def check_writable(path):
    """UserError now, not after the work, when path's folder is missing or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {path}: its folder does not exist or is not writable")


def prepare_log_dir(folder):
    """Create the TensorBoard run folder now, so that an unwritable or impossible --log-dir is one line at start."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-probe-").close()
    except OSError as e:
        raise UserError(f"cannot write TensorBoard logs to {folder}: {e.strerror or e}") from None


# ---------------------------------------------------------------- reproducibility

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state():
    """RNG states as plain types and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_to_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- signals

class StopRequest:
    """While in its `with` block, SIGTERM/SIGINT set a flag; the training loop finishes its step, saves and exits.
    A second Ctrl-C falls back to the default behaviour (stop at once). Leaving the block puts the previous
    handlers back: a process that goes on (a test, a notebook) must not keep a handler that ignores SIGTERM,
    nor pass it to processes it forks.
    """

    def __init__(self):
        self.signal_name, self.previous = None, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        return False

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{self.signal_name} received: finishing this step and saving a checkpoint...",
              file=sys.stderr, flush=True)

    def __bool__(self):
        return self.signal_name is not None


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


def ignore_stop_signals(worker_id=None):
    """DataLoader worker init: let only the main process handle Ctrl-C/SIGTERM, so it can save cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
