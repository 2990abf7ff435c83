"""utils.py: process-group setup as a GPU run does it, collectives on every backend, checkpoint files, versions."""
import os
import stat

import pytest
import torch
import torch.distributed as dist

import checkpoint
import utils
from conftest import free_port


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


def test_fail_together_in_one_process_raises_the_error_itself():
    """(Two ranks: test_the_collectives_combine_two_ranks.)"""
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


TWO_RANKS = r"""
import json, sys
import torch
import utils

rank, world_size, device = utils.setup_distributed("cpu")
seen = {"rank": rank, "world_size": world_size, "backend": utils.backend_name()}
seen["any_one"] = utils.any_rank(rank == 1)     # true on rank 1 only
seen["any_none"] = utils.any_rank(False)
seen["sum"] = utils.all_reduce_sum(torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)).tolist()
tensors = [torch.full((3,), float(rank)), torch.arange(4) * (rank + 1)]
utils.broadcast_tensors(tensors)
seen["broadcast"] = [t.tolist() for t in tensors]
seen["gathered"] = utils.gather_objects({"rank": rank})
seen["object"] = utils.broadcast_object(f"from rank {rank}")


def together(failing, error=utils.UserError):
    def step():
        if rank in failing:
            raise error(f"{error.__name__} on rank {rank}")
        return rank
    try:
        return ["returned", utils.fail_together(step)]
    except utils.UserError as e:
        return [type(e).__name__, str(e)]


seen["none_fails"] = together(())
seen["rank1_fails"] = together((1,), utils.DataError)
seen["rank0_fails"] = together((0,))
seen["both_fail"] = together((0, 1))
utils.cleanup_distributed()
json.dump(seen, open(sys.argv[1], "w"))
"""


def test_the_collectives_combine_two_ranks(tmp_path):
    """Two processes on Gloo, as torchrun starts them: each collective combines what both ranks hold, and a
    failure on one rank reaches the other, so no rank waits for a peer that stopped."""
    import json
    import subprocess
    import sys
    from conftest import REPO
    port = free_port()
    processes = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
        processes.append(subprocess.Popen([sys.executable, "-c", TWO_RANKS, str(tmp_path / f"rank{rank}.json")],
                                          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    seen = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in range(2)]
    for rank, mine in enumerate(seen):
        assert (mine["rank"], mine["world_size"], mine["backend"]) == (rank, 2, "cpu:gloo")
        assert mine["any_one"] is True and mine["any_none"] is False
        assert mine["sum"] == [1.0 + 2.0, 0.0 + 10.0]
        assert mine["broadcast"] == [[0.0, 0.0, 0.0], [0, 1, 2, 3]]  # rank 0's tensors, in place
        assert mine["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert mine["object"] == "from rank 0"
        assert mine["none_fails"] == ["returned", rank]
        # the failing rank raises its own error; the other one a UserError with the same message
        assert mine["rank1_fails"] == ["DataError" if rank == 1 else "UserError", "DataError on rank 1"]
        assert mine["rank0_fails"] == ["UserError", "UserError on rank 0"]
        assert mine["both_fail"] == ["UserError", f"UserError on rank {rank}"]  # each failing rank: its own error
