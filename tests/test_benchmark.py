"""benchmark.py runs end to end on tiny settings and writes every figure (speed is not checked here)."""
import json

import benchmark

FIGURES = ("model_only", "torchvision", "ours_width_1", "ours_vs_torchvision",
           "full_pipeline", "loader_ours", "loader_ours_normalized", "loader_imagefolder", "loader_vs_imagefolder",
           "index_cold", "index_cached", "index_imagefolder", "workers_uss_FileIndex", "workers_uss_list",
           "evaluation", "peak_rss_main", "peak_rss_workers", "precision_fp32", "precision_bf16", "adam_foreach",
           "adam_for-loop", "adam_fused", "ema_update_torch-ema", "ema_update_one_foreach_lerp",
           "inference_b1_pytorch_eager", "inference_b1_onnx_fp32", "inference_b1_onnx_int8",
           "inference_b32_pytorch_eager", "inference_b32_onnx_fp32", "inference_b32_onnx_int8",
           "file_mb_pytorch", "file_mb_fp32", "file_mb_int8")


def test_benchmark_writes_every_figure(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    args = benchmark.get_args_parser().parse_args([
        "--data-path", tiny_data, "--device", "cpu", "--arch", "small", "--width-mult", "0.5", "-b", "4",
        "--img-size", "32", "--workers", "1", "--threads", "1", "--windows", "1", "--steps", "1",
        "--index-files", "100", "--index-entries", "2000", "--memory-workers", "1", "--gpu-decode", "--calib-images", "8",
        "--json", str(out)])
    assert benchmark.main(args) == 0
    assert not benchmark.child_pids()  # every loader closed: no worker left (they ignore SIGTERM) to block exit
    result = json.loads(out.read_text())
    missing = [key for key in FIGURES if key not in result["figures"]]
    assert not missing, missing
    assert any(key.startswith("model_only_channels_last_") for key in result["figures"])  # the other memory format
    assert result["figures"]["full_pipeline"]["median"] > 0
    assert result["figures"]["full_pipeline_gpu_decode_1_worker"]["median"] > 0  # train.py --decode-on device
    assert result["figures"]["ours_vs_torchvision"]["ratio"] > 0
    assert result["figures"]["inference_b1_onnx_int8"]["ratio"] > 0 and result["figures"]["inference_b1_onnx_int8"]["target"]
    assert result["figures"]["file_mb_int8"]["median"] < result["figures"]["file_mb_fp32"]["median"]  # int8 weights
