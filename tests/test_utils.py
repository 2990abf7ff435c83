"""utils.py: process-group setup as a GPU run does it, collectives on every backend, checkpoint files, versions."""
import os
import socket
import stat

import pytest
import torch
import torch.distributed as dist

import checkpoint
import utils


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_environment(monkeypatch, world_size=1, rank=0):
    for name, value in dict(RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world_size,
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()).items():
        monkeypatch.setenv(name, str(value))


def test_a_cuda_run_gives_cpu_tensors_a_backend_too(monkeypatch):
    """The process group a CUDA run starts must carry the CPU tensors and objects the loop exchanges. NCCL
    registers for CUDA tensors only; on this CPU machine Gloo restricted to the same device types stands in for
    it ("nccl" alone becomes "cuda:gloo", which fails on a CPU tensor exactly as NCCL does)."""
    torchrun_environment(monkeypatch)
    monkeypatch.setattr(utils, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    asked = []
    real_init = dist.init_process_group

    def init_like_a_gpu_run(backend=None, **kwargs):
        asked.append(backend)
        stand_in = "cuda:gloo" if backend == "nccl" else backend.replace("nccl", "gloo")
        real_init(backend=stand_in, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", init_like_a_gpu_run)
    try:
        rank, world_size, device = utils.setup_distributed("cuda")
        assert (rank, world_size, device) == (0, 1, torch.device("cuda", 0))
        assert asked == ["cpu:gloo,cuda:nccl"]
        # every collective of the loop, with the CPU tensors and objects it really sends
        assert utils.any_rank(True) and not utils.any_rank(False)
        assert utils.all_reduce_sum(torch.tensor([3.0])).tolist() == [3.0]
        buffers = [torch.arange(4.0)]
        utils.broadcast_tensors(buffers)
        assert buffers[0].tolist() == [0, 1, 2, 3]
        assert utils.gather_objects({"rng": 1}) == [{"rng": 1}]
        assert utils.broadcast_object("path") == "path"
        assert utils.fail_together(lambda: 7) == 7
    finally:
        utils.cleanup_distributed()


def test_torchrun_with_one_process_starts_the_process_group(monkeypatch):
    torchrun_environment(monkeypatch)
    try:
        assert utils.setup_distributed("cpu") == (0, 1, torch.device("cpu"))
        assert utils.is_distributed() and utils.backend_name() == "cpu:gloo"
    finally:
        utils.cleanup_distributed()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name)
    assert utils.setup_distributed("cpu") == (0, 1, torch.device("cpu")) and not utils.is_distributed()


def test_fail_together_raises_the_error_on_every_rank():
    with pytest.raises(utils.UserError, match="disk on fire"):
        utils.fail_together(lambda: (_ for _ in ()).throw(utils.UserError("disk on fire")))


@pytest.mark.parametrize("dtype, name", [("float16", "fp16 + GradScaler"), ("bfloat16", "bf16 autocast")])
def test_precision_is_named_from_the_dtype_and_fp16_always_gets_a_scaler(dtype, name):
    autocast, scaler, label = utils.precision_for(torch.device("cpu"), True, dtype)
    assert label == name
    assert (scaler is not None) == (dtype == "float16")
    with autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == getattr(torch, dtype)
    assert utils.precision_for(torch.device("cpu"), False, dtype)[1:] == (None, "fp32")


def test_checkpoints_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        checkpoint.save_checkpoint({"format": checkpoint.CHECKPOINT_FORMAT}, tmp_path / "last.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "last.pth").st_mode) == 0o644  # mkstemp alone gives 0600


def test_old_versions_are_one_line(monkeypatch):
    utils.check_versions()  # the installed ones are fine
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(utils.UserError, match=r"torch 2\.5\.1\+cu121 is too old: .*torch >= 2\.6"):
        utils.check_versions()


def test_a_folder_given_as_checkpoint_says_so(tmp_path):
    with pytest.raises(utils.CheckpointError, match="is a folder, not a checkpoint file"):
        checkpoint.load_checkpoint(str(tmp_path))
    with pytest.raises(utils.CheckpointError, match="checkpoint not found"):
        checkpoint.load_checkpoint(str(tmp_path / "missing.pth"))
