"""tools/benchmark.py runs end to end on tiny settings and writes every figure (speed is not checked here), and its busy
processes never outlive the comparison they load."""
import contextlib
import json
import subprocess
import sys
import time
from unittest import mock

import pytest

import decode
from tools import benchmark

FIGURES = ("model_only", "torchvision", "ours_width_1", "ours_vs_torchvision",
           "full_pipeline", "full_pipeline_refill_timed", "model_only_busy", "full_pipeline_busy",
           "full_pipeline_busy_refill_untimed", "full_pipeline_busy_workers_nice_10",
           "loader_ours", "loader_ours_normalized", "loader_torchvision_decoder", "loader_scaled_decoding_off",
           "loader_resized_copy", "loader_imagefolder", "loader_vs_imagefolder",
           "index_cold", "index_cached", "index_imagefolder", "workers_uss_FileIndex", "workers_uss_list",
           "evaluation", "save_seconds", "save_check_us", "peak_rss_main", "peak_rss_workers", "precision_fp32", "precision_bf16", "adam_foreach",
           "adam_for-loop", "adam_fused", "ema_update_torch-ema_loop", "ema_update_one_foreach_lerp",
           "inference_b1_pytorch_eager", "inference_b1_onnx_fp32", "inference_b1_onnx_int8",
           "inference_b32_pytorch_eager", "inference_b32_onnx_fp32", "inference_b32_onnx_int8",
           "file_mb_pytorch", "file_mb_fp32", "file_mb_int8")


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    """One tiny benchmark run: (its JSON, the busy processes it started, whether they all ran while it measured,
    whether its args were left as parsed)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    started, alive = [], []
    original = benchmark.busy_processes

    @contextlib.contextmanager
    def recorded(count, seconds):
        with original(count, seconds) as processes:
            started.extend(processes)
            yield processes
            alive.extend(process.poll() is None for process in processes)  # at the end of the comparison

    args = benchmark.get_args_parser().parse_args([
        "--data-path", tiny_data, "--device", "cpu", "--arch", "small", "--width-mult", "0.5", "-b", "4",
        "--img-size", "32", "--workers", "1", "--threads", "1", "--windows", "1", "--steps", "1",
        "--index-files", "100", "--index-entries", "2000", "--memory-workers", "1", "--gpu-decode",
        "--calib-images", "8", "--busy", "2", "--busy-seconds", "60", "--json", str(out)])
    parsed = vars(args).copy()
    with mock.patch.object(benchmark, "busy_processes", recorded):
        assert benchmark.main(args) == 0
    return json.loads(out.read_text()), started, alive, vars(args) == parsed


def test_benchmark_writes_every_figure(tiny_run):
    result = tiny_run[0]
    expected = [key for key in FIGURES  # torchvision's decoder is the default where torchcodec does not import
                if key != "loader_torchvision_decoder" or decode.torchcodec_decode_jpeg is not None]
    missing = [key for key in expected if key not in result["figures"]]
    assert not missing, missing
    figures = result["figures"]
    assert any(key.startswith("model_only_channels_last_") for key in figures)  # the other memory format
    assert figures["full_pipeline"]["median"] > 0
    assert figures["full_pipeline_gpu_decode_1_worker"]["median"] > 0  # train.py --decode-on device
    assert figures["ours_vs_torchvision"]["ratio"] > 0
    assert figures["full_pipeline_busy"]["ratio"] > 0 and figures["full_pipeline_busy"]["target"] == 0.8
    for key in ("loader_scaled_decoding_off", "loader_resized_copy"):
        assert figures[key]["median"] > 0 and figures[key]["ratio"] > 0, key  # img/s and the ratio to the default
    assert figures["inference_b1_onnx_int8"]["ratio"] > 0 and figures["inference_b1_onnx_int8"]["target"]
    assert figures["file_mb_int8"]["median"] < figures["file_mb_fp32"]["median"]  # int8 weights
    assert 0 < figures["save_seconds"]["ratio"] < 1 and 0 < figures["save_check_us"]["ratio"] < 1  # of the interval


def test_the_benchmark_leaves_its_args_as_parsed(tiny_run):
    assert tiny_run[3]  # --quick, the device's defaults and the rest go to a copy


def test_busy_processes_are_gone_after_the_benchmark(tiny_run):
    _, started, alive, _ = tiny_run
    assert len(started) == 2 and alive == [True, True]  # both loaded the whole comparison
    assert all(process.returncode is not None for process in started)  # ended and waited for
    assert not benchmark.child_pids()  # no busy process, and every loader closed (workers ignore SIGTERM)
    assert not benchmark.busy_pids


def test_busy_processes_are_gone_even_when_the_measurement_raises():
    with pytest.raises(KeyboardInterrupt):  # what Ctrl-C raises
        with benchmark.busy_processes(2, seconds=60) as processes:
            assert set(process.pid for process in processes) <= set(benchmark.child_pids())
            raise KeyboardInterrupt
    assert all(process.returncode is not None for process in processes)
    assert not set(process.pid for process in processes) & set(benchmark.child_pids())
    assert not benchmark.busy_pids


def test_busy_processes_end_themselves_at_their_deadline():
    # the bound that holds even if the benchmark dies without ending them (kill -9)
    with benchmark.busy_processes(1, seconds=0.5) as processes:
        assert processes[0].wait(timeout=30) == 0


def test_wait_until_idle_waits_for_a_working_child_and_no_longer(tmp_path):
    # a child that is not a busy process, as a loader worker: works for 1 s, says so, then sleeps
    done = tmp_path / "done"
    work = ("import pathlib, time\nend = time.monotonic() + 1\nwhile time.monotonic() < end:\n    pass\n"
            f"pathlib.Path({str(done)!r}).touch()\ntime.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", work])
    try:
        benchmark.wait_until_idle(timeout=120)
        assert done.exists()  # it waited for the work
        assert child.poll() is None  # and saw the child idle, not gone: its sleep ends long before the timeout
    finally:
        child.kill()
        child.wait()


def test_wait_until_idle_does_not_wait_for_the_busy_processes():
    with benchmark.busy_processes(2, seconds=60):
        start = time.perf_counter()
        benchmark.wait_until_idle(timeout=10)
        assert time.perf_counter() - start < 2  # no loader workers: idle at once, busy processes or not


def test_the_live_loader_goes_on_across_epochs_and_refuses_an_empty_loader():
    class Batches:
        sampler = None

        def __init__(self, items):
            self.items = items

        def __iter__(self):
            return iter(self.items)
    live = iter(benchmark.LiveLoader(Batches([1, 2, 3])))
    assert [next(live) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    with pytest.raises(benchmark.UserError, match="yields no batch"):
        next(iter(benchmark.LiveLoader(Batches([]))))
