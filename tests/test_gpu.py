"""What only a GPU can show: CUDA fp16 with a GradScaler, fused Adam, NCCL collectives, nvjpeg decoding.

Skipped without CUDA (every CPU-runnable version of these paths is tested in the other files); run on a GPU
machine by tests/gpu_check.sh, or alone with `python -m pytest tests/test_gpu.py`.
"""
import json

import numpy as np
import pytest
import torch

import dataset
import decode
import evaluate
import flags
import layouts
import train
import utils
from conftest import tiny_train_args
from test_utils import torchrun_environment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fp16_grad_scaler_fused_adam_channels_last_on_cuda(tiny_data, tmp_path, capsys):
    args = flags.get_args_parser().parse_args(tiny_train_args(tiny_data, tmp_path, "--device", "cuda",
                                                              "--max-steps", "6", "--ema-decay", "0.9"))
    assert utils.run_cli(train.main, args) == 0
    out = capsys.readouterr().out
    assert "precision fp16 + GradScaler" in out and "channels_last True" in out
    last = torch.load(tmp_path / "ckpt/last.pth", weights_only=True)
    # the default initial scale, halved at each overflow, not yet grown (that takes 2000 steps)
    assert last["step"] == 6 and last["scaler"]["scale"] == 2.0 ** 16 * 0.5 ** last["scaler_skips"]
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
    splits = layouts.find_dataset(tiny_data)
    samples = dataset.EncodedImageFiles(splits.train, 32)
    batch, labels = samples.collate([samples[(i, 1000 + i)] for i in range(8)])
    on_cpu, _ = samples.batch_to(torch.device("cpu"), batch, labels)
    on_gpu, gpu_labels = samples.batch_to(torch.device("cuda"), batch, labels)
    assert torch.equal(gpu_labels.cpu(), labels)
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().float().mean() < 2


def odd_jpegs(folder):
    """Baseline, progressive, grayscale, and phone photos turned by EXIF (one with an XMP segment before its
    EXIF one, which TorchCodec's CUDA and CPU decoders read differently), as read_image_file gives them."""
    from PIL import Image
    rng = np.random.default_rng(0)
    pixels = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
    files = {"baseline.jpg": {}, "progressive.jpg": {"progressive": True}, "gray.jpg": {"mode": "L"}}
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"turned{orientation}.jpg"] = {"exif": exif.tobytes()}
    for name, options in files.items():
        image = Image.fromarray(pixels).convert(options.pop("mode", "RGB"))
        image.save(folder / name, quality=90, **options)
    data = (folder / "turned6.jpg").read_bytes()  # an XMP APP1 segment inserted just after the start of image
    (folder / "xmp_first.jpg").write_bytes(data[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + data[2:])
    return {path.name: decode.read_image_file(path) for path in sorted(folder.glob("*.jpg"))}


@pytest.mark.skipif(decode.torchcodec_decode_jpeg is None, reason="torchcodec is not installed")
def test_torchcodec_and_torchvision_nvjpeg_decode_the_stored_pixels(tmp_path):
    files = odd_jpegs(tmp_path)
    jpegs = [data for data, _ in files.values()]
    device = torch.device("cuda")
    # one batched call each: a decoder that refused one of these files would raise here, not fall back quietly
    torchcodec_images = decode.decode_with_torchcodec(device, jpegs)
    torchvision_images = decode.decode_with_torchvision(device, jpegs)
    for (name, (data, size)), ours, theirs in zip(files.items(), torchcodec_images, torchvision_images, strict=True):
        on_cpu = decode.decode_jpeg_cpu(data)
        assert ours.device.type == "cuda" and tuple(ours.shape[1:]) == size == tuple(theirs.shape[1:]), name
        assert (ours.cpu().int() - on_cpu.int()).abs().float().mean() < 2, name
        assert (theirs.cpu().int() - on_cpu.int()).abs().float().mean() < 2, name
    assert decode.device_jpeg_decoder(device) == "TorchCodec"


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
