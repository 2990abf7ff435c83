"""What only a GPU can show: CUDA fp16 with a GradScaler, fused Adam, NCCL collectives, nvjpeg decoding.

Skipped without CUDA (every CPU-runnable version of these paths is tested in the other files); run on a GPU
machine by tests/gpu_check.sh, or alone with `python -m pytest tests/test_gpu.py`.
"""
import json

import pytest
import torch

import dataset
import evaluate
import train
import utils
from conftest import tiny_train_args
from test_utils import torchrun_environment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fp16_grad_scaler_fused_adam_channels_last_on_cuda(tiny_data, tmp_path, capsys):
    args = train.get_args_parser().parse_args(tiny_train_args(tiny_data, tmp_path, "--device", "cuda",
                                                              "--max-steps", "6", "--ema-decay", "0.9"))
    assert utils.run_cli(train.main, args) == 0
    out = capsys.readouterr().out
    assert "precision fp16 + GradScaler" in out and "channels_last True" in out
    last = torch.load(tmp_path / "ckpt/last.pth", weights_only=True)
    assert last["step"] == 6 and last["scaler"]["scale"] > 0
    assert last["nonfinite_steps"] == 0  # GradScaler's calibration skips are counted apart (scaler_skips)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_nccl_process_group_and_every_collective(monkeypatch):
    torchrun_environment(monkeypatch)
    try:
        rank, world_size, device = utils.setup_distributed("cuda")
        assert device == torch.device("cuda", 0) and utils.backend_name() == "cpu:gloo,cuda:nccl"
        assert utils.any_rank(True) and not utils.any_rank(False)
        assert utils.all_reduce_sum(torch.ones(2, device=device)).tolist() == [1.0, 1.0]
        buffers = [torch.arange(3.0, device=device)]
        utils.broadcast_tensors(buffers)
        assert buffers[0].tolist() == [0.0, 1.0, 2.0]
        assert utils.gather_objects({"a": 1}) == [{"a": 1}] and utils.broadcast_object(5) == 5
    finally:
        utils.cleanup_distributed()


def test_nvjpeg_batch_decoding_matches_the_cpu_within_a_grey_level(tiny_data):
    splits = dataset.find_dataset(tiny_data)
    samples = dataset.EncodedImageFiles(splits.train, 32)
    batch, labels = samples.collate([samples[(i, 1000 + i)] for i in range(8)])
    on_cpu, _ = samples.batch_to(torch.device("cpu"), batch, labels)
    on_gpu, gpu_labels = samples.batch_to(torch.device("cuda"), batch, labels)
    assert torch.equal(gpu_labels.cpu(), labels)
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().float().mean() < 2


def test_evaluation_on_cuda_equals_the_cpu(trained, tiny_data, tmp_path):
    results = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.json"
        args = evaluate.get_args_parser().parse_args([str(trained / "ckpt/best.pth"), "--data-path", tiny_data,
                                                      "--workers", "0", "--device", device, "--no-amp",
                                                      "--json", str(path)])
        assert evaluate.main(args) == 0
        results[device] = json.load(open(path))
    assert results["cpu"]["images"] == results["cuda"]["images"]
    assert abs(results["cpu"]["top1"] - results["cuda"]["top1"]) <= 100 / results["cpu"]["images"]
    assert results["cpu"]["loss"] == pytest.approx(results["cuda"]["loss"], rel=1e-3)
