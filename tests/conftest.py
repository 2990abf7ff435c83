"""Shared fixtures: tiny generated datasets (real JPEG files in ImageNet layouts) and helpers to run the scripts."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Tests run beside other processes: one thread avoids OpenMP oversubscription, and the same thread count in this
# process and in the scripts it starts keeps float results identical (train.py leaves threads alone when set).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Three classes a small network separates in a few dozen steps: dominant red, green or blue, with noise.
COLOURS = {"n00000001": (200, 40, 40), "n00000002": (40, 200, 40), "n00000003": (40, 40, 200)}


def write_image(path, colour, seed, size=40):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_class_folders(root, train_per_class=16, val_per_class=6, classes=None, size=40):
    """train/<class>/*.JPEG and val/<class>/*.JPEG under root; returns root as str."""
    classes = classes or list(COLOURS)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                seed = (split == "val") * 100_000 + c * 1000 + i
                write_image(os.path.join(folder, f"{name}_{i}.JPEG"), COLOURS[name], seed=seed, size=size)
    return str(root)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """3 classes, 16 train + 6 val images each, 40 px JPEGs (shared by all tests; do not modify)."""
    return make_class_folders(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # the dataset index cache goes to a temp folder, never to the user's home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def tiny_train_args(data_path, out, *extra):
    """Flags for a fast CPU run of train.py on tiny data (32 px, Small 0.5, batch 8)."""
    return ["--data-path", str(data_path), "--output-dir", str(out / "ckpt"), "--log-dir", str(out / "runs"),
            "--run-name", "t", "--arch", "small", "--width-mult", "0.5", "--img-size", "32", "-b", "8",
            "--workers", "0", "--device", "cpu", "--print-freq", "1", "--lr", "2e-3", *extra]


def free_port():
    """A TCP port nothing listens on now: torchrun runs of tests running side by side never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, *args, timeout=240, env=None):
    """Run a script of the repo in a fresh interpreter; returns CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=full_env)


def assert_clean_error(proc, *fragments):
    """A user error: non-zero exit, one 'error:' line naming the problem, and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory):
    """A short real training run on tiny_data; returns the output folder (ckpt/best.pth, ckpt/last.pth, runs/)."""
    import flags
    import train
    out = tmp_path_factory.mktemp("trained")
    args = flags.get_args_parser().parse_args(tiny_train_args(tiny_data, out, "--epochs", "3", "--ema-decay", "0.9"))
    assert train.main(args) == 0
    return out


def pytest_configure(config):
    # tests and tools/benchmark.py call torchvision's deprecated decoders directly, to compare with (dataset.py silences
    # the notice around its own calls only)
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities of TorchVision")
