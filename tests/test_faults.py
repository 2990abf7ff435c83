"""Reliability: kills, preemption, divergence, failed writes, bad inputs and hostile checkpoints lose nothing."""
import contextlib
import glob
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import flags
import train
import utils
from conftest import REPO, assert_clean_error, free_port, make_class_folders, run_script, tiny_train_args

# Runs train.main with torch.save slowed down after the bytes are written and before the rename, so a kill can be
# aimed at the middle of a checkpoint write.
SLOW_SAVE = """
import sys, time, torch
sys.path.insert(0, {repo!r})
real_save = torch.save
def slow_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    f.flush()
    time.sleep(0.4)
torch.save = slow_save
import flags, train, utils
sys.exit(utils.run_cli(train.main, flags.get_args_parser().parse_args(sys.argv[1:])))
"""

# Runs train.main writing each finished step's number to the file named by STEP_LOG: what a kill -9 interrupted.
STEP_LOG = """
import os, sys
sys.path.insert(0, {repo!r})
import flags, train, utils
real_after_step = train.SkippedSteps.after_step
def after_step(self, applied, figures):
    real_after_step(self, applied, figures)
    with open(os.environ["STEP_LOG"], "a") as f:
        f.write(f"{{self.state.step + 1}}\\n")
train.SkippedSteps.after_step = after_step
sys.exit(utils.run_cli(train.main, flags.get_args_parser().parse_args(sys.argv[1:])))
"""


def start_training(argv, slow_save=False):
    cmd = [sys.executable, "-c", SLOW_SAVE.format(repo=REPO)] if slow_save else [sys.executable, os.path.join(REPO, "train.py")]
    return subprocess.Popen(cmd + [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))


def wait_for(condition, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def all_checkpoints_load(folder):
    paths = glob.glob(os.path.join(folder, "*.pth"))
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["format"] in (checkpoint.CHECKPOINT_FORMAT, checkpoint.WEIGHTS_FORMAT) and "model" in ckpt, path
    return len(paths)


def test_kill_9_at_random_moments_then_resume_auto_finishes_the_run(tiny_data, tmp_path):
    argv = tiny_train_args(tiny_data, tmp_path, "--epochs", "5", "--resume", "auto")
    ckpt_dir = tmp_path / "ckpt"
    rng = random.Random(0)
    kills = 0
    # 1) during a checkpoint write: the temp file exists, the rename has not happened yet
    proc = start_training(argv, slow_save=True)
    assert wait_for(lambda: glob.glob(str(ckpt_dir / ".tmp-*.pth-*")), timeout=120), proc.communicate()
    proc.kill(), proc.wait()
    kills += 1
    all_checkpoints_load(ckpt_dir)
    # 2) at random moments
    for delay in (rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0)):
        proc = start_training(argv)
        assert wait_for(lambda: proc.poll() is not None or glob.glob(str(tmp_path / "runs/t/events*")), timeout=120)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        all_checkpoints_load(ckpt_dir)
    proc = start_training(argv)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert kills >= 2
    last = torch.load(ckpt_dir / "last.pth", weights_only=True)
    assert last["epoch"] == 5 and last["step"] == 5 * 6 and last["batch_in_epoch"] == 0
    assert all_checkpoints_load(ckpt_dir) == 3  # last.pth, best.pth, best_weights.pth
    assert not glob.glob(str(ckpt_dir / ".tmp-*"))  # temp files of killed writes are cleaned up on restart


def test_kill_9_loses_at_most_the_save_interval_and_the_run_ends_as_an_uninterrupted_one(tmp_path):
    """--save-every-steps 3: after a kill -9 at a random step the run resumes from a checkpoint at most 3 steps old,
    and the run, killed three times, ends with the weights of a run never interrupted."""
    data = make_class_folders(tmp_path / "data", train_per_class=24, val_per_class=2)  # 72 images: 18 steps of 4
    common = ["--epochs", "2", "-b", "4", "--deterministic", "--ema-decay", "0.99", "--save-every-steps", "3"]
    assert train.main(flags.get_args_parser().parse_args(tiny_train_args(data, tmp_path / "a", *common))) == 0
    # a loader worker alive at each kill: the run folder's lock must die with the process, not with its workers
    argv = tiny_train_args(data, tmp_path / "b", *common, "--resume", "auto", "--workers", "1")
    step_log, last = tmp_path / "steps.log", tmp_path / "b/ckpt/last.pth"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", STEP_LOG=str(step_log))
    finished = lambda: int(step_log.read_text().split()[-1]) if step_log.exists() and step_log.read_text() else 0  # noqa: E731
    rng, lost = random.Random(1), []
    for target in sorted(rng.sample(range(4, 34), 3)):
        proc = subprocess.Popen([sys.executable, "-c", STEP_LOG.format(repo=REPO), *map(str, argv)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: proc.poll() is not None or finished() >= target, timeout=120)
        proc.kill()
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        lost.append(finished() - torch.load(last, weights_only=True)["step"])
    assert all(0 <= steps <= 3 for steps in lost), lost
    assert train.main(flags.get_args_parser().parse_args(argv)) == 0
    a, b = (torch.load(tmp_path / run / "ckpt/last.pth", weights_only=True) for run in ("a", "b"))
    assert a["step"] == b["step"] == 36
    for key in ("model", "ema_model"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


def test_the_minutes_interval_saves_inside_an_epoch(tiny_data, tmp_path, monkeypatch):
    saved_at = []  # (epoch, micro-batch) of every checkpoint written
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda run, state, also_best=False: (
        saved_at.append((state.epoch, state.batch_in_epoch)), real_save(run, state, also_best))[1])
    argv = tiny_train_args(tiny_data, tmp_path, "--epochs", "1", "--save-every-minutes", "1e-9")
    assert train.main(flags.get_args_parser().parse_args(argv)) == 0
    assert saved_at == [(0, batch) for batch in range(1, 6)] + [(1, 0)]  # after every step, then the epoch's end


# train.py for torchrun, each worker writing its pid (pids/<rank>) and rank 0 each finished step (steps.log)
ELASTIC_WORKER = """
import os, sys
sys.path.insert(0, {repo!r})
import flags, train, utils
folder = {folder!r}
with open(os.path.join(folder, "pids", os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
real_after_step = train.SkippedSteps.after_step
def after_step(self, applied, figures):
    real_after_step(self, applied, figures)
    if os.environ["RANK"] == "0":
        with open(os.path.join(folder, "steps.log"), "a") as f:
            f.write(f"{{self.state.step + 1}}\\n")
train.SkippedSteps.after_step = after_step
sys.exit(utils.run_cli(train.main, flags.get_args_parser().parse_args(sys.argv[1:])))
"""


def test_torchrun_restarts_a_killed_worker_and_the_job_ends_as_an_uninterrupted_one(tmp_path):
    """torchrun --max-restarts with the README's launcher setting: one of two workers killed with SIGKILL mid-epoch,
    torchrun restarts both, they resume from the interval checkpoint and end with the weights of a run never
    interrupted."""
    data = make_class_folders(tmp_path / "data", train_per_class=24, val_per_class=2)  # 72 images: 9 steps of 4 x 2
    (tmp_path / "pids").mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(ELASTIC_WORKER.format(repo=REPO, folder=str(tmp_path)))
    common = ["--epochs", "2", "-b", "4", "--deterministic", "--ema-decay", "0.99", "--save-every-steps", "2",
              "--resume", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")

    def torchrun(run):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--max-restarts=2", str(worker), *map(str, tiny_train_args(data, tmp_path / run,
                                                                                             *common))],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    reference = torchrun("a")
    out, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, out[-3000:]
    (tmp_path / "steps.log").unlink()
    job = torchrun("b")
    steps = lambda: (tmp_path / "steps.log").read_text().split() if (tmp_path / "steps.log").exists() else []  # noqa
    assert wait_for(lambda: job.poll() is not None or len(steps()) >= 5, timeout=120)
    os.kill(int((tmp_path / "pids/1").read_text()), signal.SIGKILL)  # rank 1, mid-epoch 1
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out[-3000:]
    assert "resumed from" in out and "Traceback" not in out.split("resumed from")[-1], out[-3000:]
    a, b = (torch.load(tmp_path / run / "ckpt/last.pth", weights_only=True) for run in ("a", "b"))
    assert a["step"] == b["step"] == 18
    for key in ("model", "ema_model"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


def test_a_process_group_that_cannot_start_is_one_line(tiny_data, tmp_path):
    import socket
    with socket.socket() as taken:  # the port rank 0 must listen on is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(taken.getsockname()[1]))
        proc = run_script("train.py", *tiny_train_args(tiny_data, tmp_path), env=env, timeout=120)
    assert_clean_error(proc, "rank 0: could not join the process group", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = make_class_folders(tmp_path / "data", train_per_class=24, val_per_class=2)  # 72 images: 18 steps of 4
    common = ["--epochs", "2", "-b", "4", "--deterministic", "--ema-decay", "0.99"]
    assert train.main(flags.get_args_parser().parse_args(tiny_train_args(data, tmp_path / "a", *common))) == 0

    proc = start_training(tiny_train_args(data, tmp_path / "b", *common))
    assert wait_for(lambda: os.path.exists(tmp_path / "b/runs/t") and glob.glob(str(tmp_path / "b/runs/t/events*")))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received" in out and "--resume auto" in out
    stopped = torch.load(tmp_path / "b/ckpt/last.pth", weights_only=True)
    assert stopped["epoch"] == 0 and 0 < stopped["batch_in_epoch"] < 18, "the signal should land inside epoch 1"
    resumed = flags.get_args_parser().parse_args(tiny_train_args(data, tmp_path / "b", *common, "--resume", "auto"))
    assert train.main(resumed) == 0

    a = torch.load(tmp_path / "a/ckpt/last.pth", weights_only=True)
    b = torch.load(tmp_path / "b/ckpt/last.pth", weights_only=True)
    assert a["step"] == b["step"] == 36
    for key in ("model", "ema_model"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


def test_non_finite_loss_is_skipped_then_stops_and_keeps_the_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real_step = train.train_step
    calls = {"n": 0}

    def poisoned_step(model, params, micro_batches, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] in poisoned:  # NaN inputs: NaN activations (and BN statistics), loss and gradients
            micro_batches = [(images * float("nan"), targets) for images, targets in micro_batches]
        return real_step(model, params, micro_batches, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", poisoned_step)
    poisoned = {3, 4, 5}  # a few bad steps: skipped and counted, training goes on
    run_args = tiny_train_args(tiny_data, tmp_path, "--epochs", "2")
    assert train.main(flags.get_args_parser().parse_args(run_args)) == 0
    last = torch.load(tmp_path / "ckpt/last.pth", weights_only=True)
    assert last["nonfinite_steps"] == 3 and last["step"] == 12
    assert all(torch.isfinite(v).all() for v in last["model"].values())  # BN statistics were taken back
    before = hashlib.sha256(open(tmp_path / "ckpt/last.pth", "rb").read()).hexdigest()

    calls["n"], poisoned = 0, set(range(2, 1000))  # then a loss that stays non-finite
    with pytest.raises(utils.UserError, match="not finite for 20 steps"):
        train.main(flags.get_args_parser().parse_args(run_args + ["--epochs", "6", "--resume", "auto",
                                                                  "--eval-every", "10"]))
    assert hashlib.sha256(open(tmp_path / "ckpt/last.pth", "rb").read()).hexdigest() == before


def test_failed_checkpoint_write_is_one_error_and_the_old_file_survives(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    checkpoint.save_checkpoint({"format": checkpoint.CHECKPOINT_FORMAT, "model": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # some bytes reach the temp file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(utils.CheckpointError, match="No space left on device"):
        checkpoint.save_checkpoint({"format": checkpoint.CHECKPOINT_FORMAT, "model": {"w": torch.zeros(3)}}, path)
    assert torch.load(path, weights_only=True)["model"]["w"].tolist() == [1, 1, 1]
    assert os.listdir(tmp_path) == ["last.pth"]  # no temp file left behind


@pytest.fixture
def full_disk(tmp_path):
    """A real filesystem of 4 MB (a tmpfs: needs root), filled but for a few KB."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder, leave=8192):
    with open(folder / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * (os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize - leave))


def test_a_full_disk_is_one_line_and_the_last_good_checkpoint_stays(full_disk, tiny_data, capsys):
    path = full_disk / "last.pth"
    checkpoint.save_checkpoint({"format": checkpoint.CHECKPOINT_FORMAT, "model": {"w": torch.ones(3)}}, path)
    fill(full_disk)
    with pytest.raises(utils.CheckpointError, match=r"could not write checkpoint .*: no space left on device, 0 MB"):
        checkpoint.save_checkpoint({"format": checkpoint.CHECKPOINT_FORMAT, "model": {"w": torch.zeros(10**6)}}, path)
    assert torch.load(path, weights_only=True)["model"]["w"].tolist() == [1, 1, 1]
    assert sorted(os.listdir(full_disk)) == ["filler", "last.pth"]  # no temp file left behind
    (full_disk / "last.pth").unlink()
    code, err = cli(capsys, *tiny_train_args(tiny_data, full_disk, "--max-steps", "1", "--log-dir",
                                             full_disk.parent / "runs"))  # train.py, its checkpoints on the full disk
    last_line = err.splitlines()[-1].split("\r")[-1]  # after the progress bar, which it clears
    assert code == 2 and last_line.startswith("error: could not write checkpoint") and "no space left" in last_line
    assert err.count("\n") == 1 and "Traceback" not in err, err


def cli(capsys, *argv):
    """Run train.py's main the way the command line does; returns (exit code, stderr)."""
    code = utils.run_cli(train.main, flags.get_args_parser().parse_args([str(a) for a in argv]))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["-b", "0"], "--batch-size must be at least 1"),
    (["--width-mult", "0"], "--width-mult must be a positive number"),
    (["--kd-alpha", "1.5"], "--kd-alpha must be in [0, 1]"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--min-scale", "0"], "--min-scale must be in (0, 1]"),
    (["--img-size", "16"], "--img-size must be at least 32 pixels"),
    (["--weight-decay", "nan"], "--weight-decay must be 0 or more"),
    (["--teacher", "nowhere.pth"], "--teacher file not found"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--resume", "nowhere.pth"], "--resume file not found"),
    (["--ema-decay", "1.5"], "--ema-decay must be in"),
    (["--decode-on", "device", "--auto-augment", "ra"], "--decode-on device does the crop and flip only"),
    (["--bn-momentum", "0"], "--bn-momentum must be in (0, 1]"),
    (["--momentum", "-0.9"], "--momentum must be in [0, 1)"),
    (["--lr-gamma", "-0.1"], "--lr-gamma must be in (0, 1]"),
    (["--seed", str(2**63)], "--seed must be in (-2**63, 2**63)"),
    (["--run-name", "latest"], "not latest, the link to the newest run"),
    (["--run-name", "../elsewhere"], "--run-name must be a folder name, not a path"),
    (["--kd-alpha", "0.9"], "--kd-alpha set how a teacher distils: give one with --teacher"),
    (["--val-crop-size", "64", "--val-resize-size", "48"], "--val-resize-size 48 is smaller than the validation crop 64"),
    (["--amp-dtype", "float16"], "--amp-dtype float16 needs --amp"),
    (["--save-every-minutes", "-1"], "--save-every-minutes must be 0 or more"),
    (["--num-classes", "0"], "--num-classes must be at least 1"),
])
def test_bad_flag_values_are_one_line(tiny_data, tmp_path, capsys, flags, message):
    code, err = cli(capsys, *tiny_train_args(tiny_data, tmp_path), *flags)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_data_folders_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimages/train/a").mkdir(parents=True)
    (tmp_path / "noimages/train/a/readme.txt").write_text("not an image")
    (tmp_path / "a_file").write_text("not a folder")
    for folder, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "a_file", "is not a folder"),
                            (tmp_path / "empty", "empty"), (tmp_path / "noimages", "no image files")):
        code, err = cli(capsys, *tiny_train_args(folder, tmp_path / "out"))
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err.lower(), err


def test_resume_from_an_incompatible_or_broken_checkpoint(trained, tiny_data, tmp_path, capsys):
    last = trained / "ckpt/last.pth"
    code, err = cli(capsys, *tiny_train_args(tiny_data, tmp_path, "--resume", last, "--width-mult", "0.75"))
    assert code == 2 and "width_mult" in err and err.count("\n") == 1, err
    code, err = cli(capsys, *tiny_train_args(tiny_data, tmp_path, "--resume", last, "--arch", "large"))
    assert code == 2 and "arch" in err, err
    (tmp_path / "noise.pth").write_bytes(os.urandom(4096))
    code, err = cli(capsys, *tiny_train_args(tiny_data, tmp_path, "--resume", tmp_path / "noise.pth"))
    assert code == 2 and "not a readable PyTorch checkpoint" in err, err
    torch.save({"just": "a dict"}, tmp_path / "other.pth")
    code, err = cli(capsys, *tiny_train_args(tiny_data, tmp_path, "--resume", tmp_path / "other.pth"))
    assert code == 2 and "not a checkpoint of this project" in err, err
    weights = trained / "ckpt/best_weights.pth"  # this project's file, but weights only
    code, err = cli(capsys, *tiny_train_args(tiny_data, tmp_path, "--resume", weights))
    assert code == 2 and "holds weights only" in err and f"--pretrained {weights}" in err and "last.pth" in err, err
    assert err.count("\n") == 1, err


class CreatesAFile:
    """Unpickling this runs code: it would create the file named in `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_two_runs_started_into_one_folder_at_the_same_moment_one_trains_the_other_is_refused(tiny_data, tmp_path):
    for attempt in range(2):
        argv = tiny_train_args(tiny_data, tmp_path / str(attempt), "--epochs", "1", "--max-steps", "3")
        racers = [start_training(argv) for _ in range(2)]
        results = [(proc.communicate(timeout=120)[1], proc.returncode)[::-1] for proc in racers]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        refused = next(err for code, err in results if code == 2).splitlines()[-1].split("\r")[-1]
        assert ("another run is training in" in refused or "belongs to an earlier run" in refused), refused
        assert torch.load(tmp_path / str(attempt) / "ckpt/last.pth", weights_only=True)["step"] == 3


def test_the_run_folder_lock_dies_with_its_process_not_with_its_forked_children(tmp_path):
    """A killed run's loader workers (forked, alive a few seconds more) must not keep its folder locked: an
    immediate restart of the job would be refused."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
sys.path.insert(0, {REPO!r})
import checkpoint
checkpoint.lock_run_folder({str(tmp_path)!r})
child = os.fork()
print(child or os.getpid(), flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())  # the parent prints its forked child's pid
    holder.kill()
    holder.wait()
    try:
        checkpoint.lock_run_folder(str(tmp_path))  # the child, like a loader worker, is still alive here
    finally:
        os.kill(child, signal.SIGKILL)
        checkpoint.unlock_run_folders()


def test_two_output_folders_of_one_name_are_two_runs_in_tensorboard(tiny_data, tmp_path, capsys):
    def run(experiment, *extra):
        argv = [a for a in tiny_train_args(tiny_data, tmp_path) if a not in ("--run-name", "t")]
        argv[argv.index("--output-dir") + 1] = str(tmp_path / experiment / "ckpt")
        return cli(capsys, *argv, "--epochs", "1", *extra)[0]
    assert run("expA") == 0 and run("expB") == 0  # the second is not refused: it is another run
    assert sorted(os.listdir(tmp_path / "runs")) == ["ckpt", "ckpt-2"]
    assert all(glob.glob(str(tmp_path / "runs" / name / "events*")) for name in ("ckpt", "ckpt-2"))
    events = lambda name: len(glob.glob(str(tmp_path / "runs" / name / "events*")))  # noqa: E731
    before = events("ckpt"), events("ckpt-2")
    assert run("expA", "--epochs", "2", "--resume", "auto") == 0  # a resume logs to its own run's folder
    assert sorted(os.listdir(tmp_path / "runs")) == ["ckpt", "ckpt-2"]
    assert events("ckpt") > before[0] and events("ckpt-2") == before[1]
    argv = tiny_train_args(tiny_data, tmp_path, "--epochs", "1")
    argv[argv.index("--run-name") + 1], argv[argv.index("--output-dir") + 1] = "ckpt", str(tmp_path / "expC/other")
    code, err = cli(capsys, *argv)  # runs/ckpt holds expA's events
    assert code == 2 and "holds the TensorBoard events of another run" in err and "--resume" not in err, err
    import shutil  # a run moved elsewhere, both its folders, is still one run
    shutil.copytree(tmp_path / "expA", tmp_path / "moved/expA")
    shutil.copytree(tmp_path / "runs/ckpt", tmp_path / "moved/runs/ckpt")
    argv = tiny_train_args(tiny_data, tmp_path / "moved", "--epochs", "3", "--resume", "auto")
    argv[argv.index("--run-name") + 1], argv[argv.index("--output-dir") + 1] = "ckpt", str(tmp_path / "moved/expA/ckpt")
    assert cli(capsys, *argv)[0] == 0


def test_a_held_out_split_stays_the_runs_own_when_the_folder_changes(tmp_path, capsys):
    import shutil
    import evaluate
    data = make_class_folders(tmp_path / "data", train_per_class=16, val_per_class=1)
    shutil.rmtree(os.path.join(data, "val"))
    argv = tiny_train_args(data, tmp_path, "--val-split-fraction", "0.25", "--resume", "auto")
    assert cli(capsys, *argv, "--epochs", "1")[0] == 0
    held_out = torch.load(tmp_path / "ckpt/best.pth", weights_only=True)["val_split_files"]
    assert len(held_out) == 12
    import export
    onnx_file = tmp_path / "best.onnx"
    assert export.main(export.get_args_parser().parse_args([str(tmp_path / "ckpt/best_weights.pth"), "--output",
                                                            str(onnx_file), "--check-images", "4"])) == 0
    make_class_folders(tmp_path / "more", train_per_class=8, val_per_class=0)  # new images, other names
    for folder in (tmp_path / "more/train").iterdir():
        for image in folder.iterdir():
            shutil.copy(image, tmp_path / "data/train" / folder.name / f"new_{image.name}")

    def evaluate_best():
        return utils.run_cli(evaluate.main, evaluate.get_args_parser().parse_args(
            [str(tmp_path / "ckpt/best_weights.pth"), "--workers", "0", "--json", str(tmp_path / "m.json")]))
    assert evaluate_best() == 0 and json.load(open(tmp_path / "m.json"))["images"] == 12
    capsys.readouterr()  # an .onnx file holds the split's fingerprint only: a new draw is refused, never scored
    assert utils.run_cli(evaluate.main, evaluate.get_args_parser().parse_args([str(onnx_file), "--workers", "0"])) == 2
    assert "changed since training" in capsys.readouterr().err
    assert cli(capsys, *argv, "--epochs", "2")[0] == 0  # resumed: the same 12 validation images, not a new draw
    last = torch.load(tmp_path / "ckpt/last.pth", weights_only=True)
    assert last["val_split_files"] == held_out and last["metrics"]["val_images"] == 12
    assert last["steps_per_epoch"] == (36 + 24) // 8  # the images added since train
    os.remove(os.path.join(data, "train", held_out[0]))
    capsys.readouterr()
    assert evaluate_best() == 2 and "1 of the 12 images held out for this run's validation are missing" in capsys.readouterr().err
    code, err = cli(capsys, *argv, "--epochs", "3")
    assert code == 2 and f"(the first: {held_out[0]}): put them back, or start a new run" in err and err.count("\n") == 1


def test_a_validation_split_without_one_readable_image_is_an_error_not_a_best(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", train_per_class=8, val_per_class=2)
    for image in (tmp_path / "data/val").rglob("*.JPEG"):
        image.write_bytes(b"not a jpeg")
    code, err = cli(capsys, *tiny_train_args(data, tmp_path, "--epochs", "2"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "none of the 6 validation images could be read" in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "ckpt/best.pth").exists()
    last = torch.load(tmp_path / "ckpt/last.pth", weights_only=True)
    assert last["epoch"] == 1 and last["validation_pending"] and last["best_top1"] == -1.0  # the epoch's work kept


def test_a_malicious_pickle_is_refused_and_runs_nothing(tiny_data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": CreatesAFile(str(marker))}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    proc = run_script("evaluate.py", tmp_path / "evil.pth")
    assert_clean_error(proc, "refused by the safe loader")
    assert proc.returncode == 2
    code, err = cli(capsys, *tiny_train_args(tiny_data, tmp_path / "o", "--resume", tmp_path / "evil.pth"))
    assert code == 2 and "refused by the safe loader" in err, err
    assert not marker.exists()


def test_bad_inputs_from_the_real_command_line_have_no_traceback(tmp_path, capsys):
    proc = run_script("train.py", "--data-path", tmp_path / "nope")
    assert_clean_error(proc, "does not exist")
    proc = run_script("evaluate.py", tmp_path / "nope.pth")
    assert_clean_error(proc, "checkpoint not found")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own one-line error for an unknown choice
        flags.get_args_parser().parse_args(["--arch", "huge"])
    assert exit_info.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


def run_torchrun(argv, timeout=120):
    """train.py under torchrun with 2 Gloo processes: (CompletedProcess, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(REPO, "train.py"), *map(str, argv)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc, time.time() - start


def assert_no_traceback_of_ours(proc):
    """torchrun prints its own summary of a failed worker; no traceback may run through this repository's files."""
    assert f'File "{REPO}' not in proc.stderr, proc.stderr[-4000:]


def test_one_failing_rank_ends_every_rank_with_its_one_line_message(tmp_path):
    data = make_class_folders(tmp_path / "data", train_per_class=16, val_per_class=2)
    # rank 0 cannot write its checkpoints: rank 1 must not wait for it
    proc, seconds = run_torchrun(tiny_train_args(data, tmp_path / "a", "-b", "4", "--epochs", "1",
                                                 "--output-dir", "/proc/no-such-dir"))
    assert proc.returncode != 0 and seconds < 60
    assert "error: cannot write checkpoints to --output-dir /proc/no-such-dir" in proc.stderr
    assert_no_traceback_of_ours(proc)
    # a broken image read by one rank's loader under --strict-data, in the middle of the first epoch
    bad = os.path.join(data, "train", "n00000002", "n00000002_5.JPEG")
    with open(bad, "r+b") as f:
        f.truncate(100)
    proc, seconds = run_torchrun(tiny_train_args(data, tmp_path / "b", "-b", "4", "--epochs", "1",
                                                 "--strict-data", "--workers", "1"))
    assert proc.returncode != 0 and seconds < 60
    assert f"error: cannot read image {bad}" in proc.stderr
    assert_no_traceback_of_ours(proc)


class Crash(BaseException):
    """A kill at one precise line: nothing in the code catches it."""


def test_a_crash_between_last_and_best_never_leaves_a_worse_best(tiny_data, tmp_path, monkeypatch):
    """last.pth is written first and records best_top1; a crash before best.pth is written leaves a best.pth that
    the next start rewrites from last.pth, which holds that very state."""
    real_save = checkpoint.save_checkpoint

    def crash_before_best(state, path):
        if str(path).endswith("best.pth"):
            raise Crash()
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_before_best)
    argv = tiny_train_args(tiny_data, tmp_path, "--epochs", "1", "--resume", "auto")
    with pytest.raises(Crash):
        train.main(flags.get_args_parser().parse_args(argv))
    assert not os.path.exists(tmp_path / "ckpt/best.pth")
    last = torch.load(tmp_path / "ckpt/last.pth", weights_only=True)
    assert last["best_top1"] == max(last["metrics"]["val_top1"], last["metrics"]["val_ema_top1"])
    assert last["best_epoch"] == last["epoch"] == 1
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert train.main(flags.get_args_parser().parse_args(argv)) == 0  # the run is complete: it only repairs
    best = torch.load(tmp_path / "ckpt/best.pth", weights_only=True)
    assert best["best_top1"] == last["best_top1"] and best["best_weights"] == last["best_weights"]
    small = torch.load(tmp_path / "ckpt/best_weights.pth", weights_only=True)
    assert small["best_top1"] == last["best_top1"] and small["weights"] == last["best_weights"]
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_a_stop_during_validation_saves_at_once_and_validates_after_the_resume(tiny_data, tmp_path, monkeypatch):
    """SIGTERM while the validation runs: last.pth is written within a batch (the validation is not finished
    first) and marked validation_pending; the resumed run validates that epoch, then goes on exactly."""
    common = ["--epochs", "2", "--deterministic", "--ema-decay", "0.9", "-b", "2"]  # 9 validation batches
    assert train.main(flags.get_args_parser().parse_args(tiny_train_args(tiny_data, tmp_path / "a", *common))) == 0
    real_evaluate, calls = train.evaluate, {"n": 0}

    def signal_during_the_first_validation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by train.py's StopRequest, as from a scheduler
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", signal_during_the_first_validation)
    argv = tiny_train_args(tiny_data, tmp_path / "b", *common, "--resume", "auto")
    assert train.main(flags.get_args_parser().parse_args(argv)) == 0
    stopped = torch.load(tmp_path / "b/ckpt/last.pth", weights_only=True)
    assert stopped["epoch"] == 1 and stopped["validation_pending"] and stopped["metrics"] == {}
    assert calls["n"] == 1  # the EMA's pass never started
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    assert train.main(flags.get_args_parser().parse_args(argv)) == 0
    a, b = (torch.load(tmp_path / run / "ckpt/last.pth", weights_only=True) for run in ("a", "b"))
    assert not b["validation_pending"] and a["step"] == b["step"] == 2 * 24
    assert a["metrics"] == b["metrics"] and a["best_top1"] == b["best_top1"]
    for key in ("model", "ema_model"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


def test_an_impossible_log_dir_or_device_is_one_line(tiny_data, tmp_path, capsys):
    for extra, message in ((["--log-dir", "/proc/runs"], "cannot write TensorBoard logs to /proc/runs/t"),
                           (["--device", "mps"], "--device mps was asked for, but this machine has no usable MPS"),
                           (["--resume", tmp_path], "is a folder: give the checkpoint file in it")):
        argv = [a for a in tiny_train_args(tiny_data, tmp_path / "o") if a not in ("--device", "cpu")] + extra
        code, err = cli(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
