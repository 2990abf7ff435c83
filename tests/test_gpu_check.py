"""tests/gpu_check.sh's dry run (GPU_CHECK_DRY_RUN=1: the GPU check's steps on the CPU, at tiny sizes), offline.

pip may reach no index, only a folder holding one wheel nothing has installed (which the script must install
with --no-index and see), and where this machine allows it the whole run has a network namespace of its own with
loopback alone, as on the GPU machine. So the GPU check cannot come to depend on the network, or on a package the
GPU machine lacks, without this test failing. About 30-45 s on 2 cores.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

from conftest import REPO

STEPS = ("wheels: installed gpu_check_probe 1.0", "environment and data", "unit tests that need CUDA",
         "torchrun x1 fp16 + GradScaler + EMA + channels_last: SIGTERM mid-run, --resume auto",
         "evaluate.py under torchrun x1", "--decode-on device: pixels against the CPU path", "speed: images/s rows")
ROWS = ("JPEG decoding, TorchCodec", "JPEG decoding, torchvision", "JPEG decoding on 1 CPU core", "model-only step (",
        "full pipeline, 500x375 JPEGs decoded by the CPU workers, 1 loader", "full pipeline, 500x375 JPEGs decoded on "
        "the device", "full pipeline, 500x375 JPEGs decoded by the CPU workers, 2 loader", "full pipeline, JPEGs "
        "pre-resized to 320 px decoded by the CPU workers", "full pipeline, JPEGs pre-resized to 320 px decoded on "
        "the device", "model-only step, torch.compile")


def probe_wheel(folder):
    """A pure-Python wheel that is installed nowhere: the script has to install it from the folder alone."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "gpu_check_probe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("gpu_check_probe/__init__.py", "")
        info = "gpu_check_probe-1.0.dist-info/"
        wheel.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n")
        wheel.writestr(info + "WHEEL", "Wheel-Version: 1.0\nGenerator: test_gpu_check\nRoot-Is-Purelib: true\n"
                                       "Tag: py3-none-any\n")
        wheel.writestr(info + "RECORD", "")
    return folder


def without_network(command):
    """command in a network namespace of its own with only loopback up, where unshare is allowed (root)."""
    if shutil.which("unshare") and shutil.which("ip") and subprocess.run(
            ["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *command], True
    return command, False


def test_the_dry_run_completes_offline_with_every_step_passed(tmp_path):
    wheels, out = probe_wheel(tmp_path / "wheels"), tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(out), GPU_CHECK_WHEELS=str(wheels), PYTHON=sys.executable,
               PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), PIP_CONFIG_FILE=os.devnull, OMP_NUM_THREADS="1")
    command, isolated = without_network(["bash", os.path.join(REPO, "tests", "gpu_check.sh")])
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    summary = (out / "summary.txt").read_text()
    statuses = [line.split()[0] for line in summary.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert statuses == ["PASS"] * len(STEPS), summary
    for name in STEPS:
        assert f"PASS {name}" in summary, (name, summary)
    assert "ROW FAIL" not in summary and "ROW SKIP" not in summary, summary
    assert summary.rstrip().endswith("s") and "gpu_check: 0 failed" in summary

    assert sorted(os.listdir(out)) == ["eval.json", "gpu_check.log", "results.json", "summary.txt"]
    results = json.loads((out / "results.json").read_text())
    assert [step["status"] for step in results["steps"]] == ["PASS"] * len(STEPS)
    rows = results["rows"]
    assert len(rows) == len(ROWS), [row["row"] for row in rows]
    for start in ROWS:
        assert any(row["row"].startswith(start) and row["images_per_s"] > 0 for row in rows), start
    environment = results["environment"]
    assert environment["dry_run"] and environment["torch-ema"] and environment["device_jpeg_decoder"]
    assert json.loads((out / "eval.json").read_text())["images"] == 24

    log = (out / "gpu_check.log").read_text()
    assert "gpu_check_probe 1.0: installed from gpu_check_probe-1.0-py3-none-any.whl; seen: 1.0" in log
    assert "resumed run against the run left alone" in log and "SIGTERM received" in log
    print(f"dry run: {wall:.0f}s wall, {results['wall_seconds']}s by the script; network namespace: {isolated}")
