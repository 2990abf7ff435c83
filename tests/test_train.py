"""train.py: it learns, logs, checkpoints, resumes exactly, and runs under torchrun."""
import argparse
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoint
import flags
import layouts
import train
import utils
from conftest import REPO, free_port, make_class_folders, tiny_train_args


def run_train(*argv):
    args = flags.get_args_parser().parse_args(list(argv))
    assert train.main(args) == 0
    return args


def scalars(log_dir):
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_end_to_end_learns_writes_checkpoints_and_tensorboard(tiny_data, tmp_path):
    run_train(*tiny_train_args(tiny_data, tmp_path, "--epochs", "4", "--ema-decay", "0.9"))
    best, last = load(tmp_path / "ckpt/best.pth"), load(tmp_path / "ckpt/last.pth")
    assert last["epoch"] == 4 and last["step"] == 4 * 6  # 48 images / batch 8 = 6 steps an epoch
    assert best["best_top1"] > 70, best["metrics"]       # 3 classes: chance is 33%
    assert best["best_weights"] in ("raw", "ema")
    assert best["classes"] == ["n00000001", "n00000002", "n00000003"]
    assert best["model_config"]["arch"] == "small"
    import model as model_lib
    net = model_lib.build_model("small", 0.5, 3)
    assert set(best["model"]) == set(best["ema_model"]) == set(net.state_dict())
    assert best["ema"]["decay"] == 0.9 and best["ema"]["num_updates"] == best["step"]  # one EMA update a step
    optimizer_state = best["optimizer"]["state"]  # every parameter stepped at every step
    assert len(optimizer_state) == len(list(net.parameters()))
    assert {float(s["step"]) for s in optimizer_state.values()} == {best["step"]}
    assert len(best["rng"]) == 1 and set(best["rng"][0]) == {"python", "numpy", "torch"}  # one process's states
    assert best["args"]["lr"] == 2e-3 and best["args"]["epochs"] == 4
    assert best["class_names"] == best["classes"]  # no file of names: the folder names
    tags = scalars(str(tmp_path / "runs/t"))
    for tag in ("train/loss", "train/top1", "train/lr", "train/images_per_sec", "train/data_wait_fraction",
                "epoch/train_loss", "epoch/train_top1", "epoch/time_sec", "val/loss", "val/top1", "val/top5",
                "val_ema/top1", "val_ema/loss"):
        assert tag in tags, (tag, sorted(tags))
    steps = [s for s, _ in tags["train/loss"]]
    assert steps == list(range(1, 25))
    epoch_losses = [v for _, v in tags["epoch/train_loss"]]
    assert epoch_losses[-1] < epoch_losses[0]  # the loss falls
    events = EventAccumulator(str(tmp_path / "runs/t"))
    events.Reload()
    assert "train/augmented_batch" in events.Tags()["images"]


def test_decoding_on_the_device_trains_exactly_as_decoding_on_the_workers(tiny_data, tmp_path):
    for where in ("workers", "device"):
        run_train(*tiny_train_args(tiny_data, tmp_path / where, "--max-steps", "3", "--decode-on", where))
    on_workers, on_device = load(tmp_path / "workers/ckpt/last.pth"), load(tmp_path / "device/ckpt/last.pth")
    assert on_device["step"] == 3
    for key, value in on_workers["model"].items():
        assert torch.equal(value, on_device["model"][key]), key


def test_compile_reports_the_time_of_the_compiling_step(tiny_data, tmp_path, monkeypatch, capsys):
    compile_model = torch.compile  # inductor takes minutes on a small CPU: the same graph capture, run eagerly
    monkeypatch.setattr(torch, "compile", lambda model, **options: compile_model(model, backend="eager"))
    run_train(*tiny_train_args(tiny_data, tmp_path, "--compile", "--max-steps", "2"))
    assert re.search(r"torch\.compile: the first step took \d+\.\ds \(compiling\)", capsys.readouterr().out)
    assert "perf/compile_first_step_sec" in scalars(str(tmp_path / "runs/t"))


def test_resume_mid_epoch_gives_the_same_weights_and_steps(tiny_data, tmp_path):
    common = ["--epochs", "2", "--deterministic", "--ema-decay", "0.99", "--dropout", "0.5"]
    run_train(*tiny_train_args(tiny_data, tmp_path / "straight", *common))
    # stop at step 4 (in the middle of epoch 1 of 6 steps), then resume and finish
    run_train(*tiny_train_args(tiny_data, tmp_path / "split", *common, "--max-steps", "4"))
    stopped = load(tmp_path / "split/ckpt/last.pth")
    assert stopped["step"] == 4 and stopped["epoch"] == 0 and stopped["batch_in_epoch"] == 4
    run_train(*tiny_train_args(tiny_data, tmp_path / "split", *common, "--resume", "auto"))

    a, b = load(tmp_path / "straight/ckpt/last.pth"), load(tmp_path / "split/ckpt/last.pth")
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema_model"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    tags_a, tags_b = scalars(str(tmp_path / "straight/runs/t")), scalars(str(tmp_path / "split/runs/t"))
    for tag in ("train/loss", "val/top1", "epoch/train_loss"):
        assert [s for s, _ in tags_a[tag]] == [s for s, _ in tags_b[tag]], tag
    torch.testing.assert_close([v for _, v in tags_a["train/loss"]], [v for _, v in tags_b["train/loss"]])


def test_torchrun_two_processes_with_gloo(tmp_path):
    data = make_class_folders(tmp_path / "data", train_per_class=16, val_per_class=5)  # 15 val images: uneven
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(REPO, "train.py"), *tiny_train_args(data, out, "--epochs", "2", "-b", "4")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device cpu x2 (torchrun, DDP, process group cpu:gloo)" in proc.stdout
    ckpt = load(out / "ckpt/last.pth")
    assert ckpt["metrics"]["val_images"] == 15          # every validation image counted once, none padded
    assert ckpt["step"] == 2 * 6                         # 48 images / (4 x 2 processes)
    assert proc.stdout.count("epoch 2/2: train loss") == 1  # only rank 0 prints
    assert os.listdir(out / "runs") == ["t"]
    steps = [s for s, _ in scalars(str(out / "runs/t"))["train/loss"]]
    assert steps == list(range(1, 13))                   # one writer: no step logged twice


def test_bf16_autocast_ema_and_best_weights(tiny_data, tmp_path, monkeypatch):
    """Best.pth keeps whichever weights scored best and says which; EMA weights really differ from raw."""
    scores = iter([{"raw": 40.0, "ema": 60.0}, {"raw": 90.0, "ema": 70.0}, {"raw": 50.0, "ema": 55.0}])
    real_evaluate = train.evaluate
    current = {}

    def fake_evaluate(model, loader, *args, desc="val", **kwargs):
        result = real_evaluate(model, loader, *args, desc=desc, **kwargs)
        if desc == "val":
            current.update(next(scores))
        result["top1"] = current["ema" if "ema" in desc else "raw"]
        return result

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    best_saved_at = []  # epochs after which best.pth was written
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda run, state, also_best=False: (
        also_best and best_saved_at.append(state.epoch), real_save(run, state, also_best))[1])
    args = run_train(*tiny_train_args(tiny_data, tmp_path, "--epochs", "3", "--amp", "--ema-decay", "0.9"))
    assert utils.precision_for(torch.device("cpu"), args.amp, args.amp_dtype)[0]().fast_dtype == torch.bfloat16
    assert best_saved_at == [1, 2]
    best = load(tmp_path / "ckpt/best.pth")
    assert best["best_weights"] == "raw" and best["best_top1"] == 90.0 and best["epoch"] == 2
    diff = max((best["ema_model"][k].float() - best["model"][k].float()).abs().max().item()
               for k in best["model"] if best["model"][k].is_floating_point())
    assert diff > 1e-4


def test_lr_schedule_warmup_cosine_and_legacy():
    args = argparse.Namespace(warmup_epochs=1, epochs=10, lr_scheduler="cosine", lr_step_size=3, lr_gamma=0.1)
    factors = [train.lr_factor(step / 100, args, 100) for step in range(1000)]
    assert factors[0] == pytest.approx(0.01) and factors[99] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(factors[100:], factors[101:]))  # cosine decays monotonically
    assert factors[100 + 450] == pytest.approx(0.5, abs=1e-2)
    args.lr_scheduler, args.warmup_epochs = "legacy", 0
    assert train.lr_factor(2.99, args, 100) == 1.0 and train.lr_factor(3.0, args, 100) == pytest.approx(0.99)
    assert train.lr_factor(9.0, args, 100) == pytest.approx(0.99 ** 3)
    args.lr_scheduler = "step"
    assert train.lr_factor(3.5, args, 100) == pytest.approx(0.1)
    # a warm-up that is not a whole number of steps is rounded to one, as it always was: 0.5 x 7 -> 4 steps
    args.lr_scheduler, args.warmup_epochs, args.lr_step_size = "cosine", 0.5, 1
    assert [train.lr_factor(k / 7, args, 7) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    args.lr_scheduler, args.warmup_epochs, args.epochs = "step", 5, 5  # the last warm-up update is at full lr
    assert train.lr_factor(5 - 1 / 7, args, 7) == 1.0


def test_bn_momentum_warm_up_covers_recent_steps_then_the_paper_value():
    import model as model_lib
    net = model_lib.build_model("small", 0.5, 10)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for step, expected in ((0, 1.0), (10, 0.5), (90, 0.1), (990, 0.01), (5000, 0.01)):
        train.warm_up_bn_momentum(net, step, 0.01)
        assert all(bn.momentum == pytest.approx(expected) for bn in bns), step


def test_weight_decay_skips_norm_and_bias():
    import model as model_lib
    net = model_lib.build_model("small", 0.5, 10)
    args = flags.get_args_parser().parse_args(["--wd", "1e-4"])
    groups = train.make_optimizer(net, args, torch.device("cpu")).param_groups
    assert groups[0]["weight_decay"] == 1e-4 and all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))


def test_fp16_with_a_grad_scaler_on_the_cpu_trains_and_saves_the_scaler(tiny_data, tmp_path, capsys):
    """The code path of a CUDA fp16 run (autocast float16 + GradScaler), run on the CPU."""
    run_train(*tiny_train_args(tiny_data, tmp_path, "--amp", "--amp-dtype", "float16", "--max-steps", "3"))
    assert "precision fp16 + GradScaler" in capsys.readouterr().out
    last = load(tmp_path / "ckpt/last.pth")
    # the default initial scale, halved at each overflow, not yet grown (that takes 2000 steps)
    assert last["step"] == 3 and last["scaler"]["scale"] == 2.0 ** 16 * 0.5 ** last["scaler_skips"]
    assert last["nonfinite_steps"] == 0


def test_grad_scaler_overflow_skips_are_not_divergence(tiny_data, tmp_path, monkeypatch, capsys):
    """A scale far too high makes every fp16 backward overflow: the scaler skips and halves, as it does while it
    calibrates. Those skips are counted apart, and best.pth and last.pth are still written; a NaN loss among
    them still counts as non-finite."""
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real_scaler(device, init_scale=2.0 ** 100))
    real_step, calls = train.train_step, {"n": 0}

    def one_nan_loss(model, params, micro_batches, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            micro_batches = [(images * float("nan"), targets) for images, targets in micro_batches]
        return real_step(model, params, micro_batches, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", one_nan_loss)
    run_train(*tiny_train_args(tiny_data, tmp_path, "--amp", "--amp-dtype", "float16", "--epochs", "1"))
    out = capsys.readouterr().out
    last, best = load(tmp_path / "ckpt/last.pth"), load(tmp_path / "ckpt/best.pth")
    assert last["step"] == 6 and last["scaler_skips"] == 5 and last["nonfinite_steps"] == 1
    assert last["scaler"]["scale"] == 2.0 ** 94  # halved at each of the 6 skipped updates
    metrics = last["metrics"]
    assert best["best_top1"] == last["best_top1"] == max(metrics["val_top1"], metrics["val_ema_top1"])
    assert "1 non-finite steps skipped, 5 fp16 overflow steps skipped by the GradScaler" in out
    tags = scalars(str(tmp_path / "runs/t"))
    assert tags["train/scaler_skips"][-1] == (6, 5.0) and tags["train/nonfinite_steps"][-1] == (6, 1.0)


def test_resume_with_half_the_batch_continues_the_lr_schedule_at_the_same_epoch(tiny_data, tmp_path, capsys):
    common = ["--epochs", "3", "--warmup-epochs", "0", "--ema-decay", "0"]
    run_train(*tiny_train_args(tiny_data, tmp_path / "straight", *common))
    run_train(*tiny_train_args(tiny_data, tmp_path / "split", *common, "--epochs", "1"))
    run_train(*tiny_train_args(tiny_data, tmp_path / "split", *common, "--resume", "auto", "-b", "4"))
    assert "flags changed since the checkpoint, applied from now on: --batch-size 8 -> 4, --epochs 1 -> 3" \
        in capsys.readouterr().out

    def lr_by_epoch(run):
        tags = scalars(str(tmp_path / run / "runs/t"))
        epochs = dict(tags["train/epoch"])
        return {round(epochs[step], 6): lr for step, lr in tags["train/lr"]}, [s for s, _ in tags["train/lr"]]

    straight, _ = lr_by_epoch("straight")
    split, steps = lr_by_epoch("split")
    assert steps == list(range(1, 6 + 2 * 12 + 1))  # 6 steps of batch 8, then 12 an epoch: monotonic
    assert split[1.0] == pytest.approx(straight[1.0]) == pytest.approx(2e-3 * 0.75)  # cosine at epoch 1 of 3
    shared = [epoch for epoch in straight if epoch >= 1]
    assert len(shared) == 12 and all(split[e] == pytest.approx(straight[e], rel=1e-6) for e in shared)


def test_a_checkpoint_inside_an_epoch_resumes_with_another_batch_size(tiny_data, tmp_path, capsys):
    """--save-every-minutes makes last.pth nearly always a checkpoint inside an epoch: a resume with another batch
    size (or process count) goes on in the epoch's order after the images already trained."""
    run_train(*tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "--max-steps", "3"))  # 24 of 48 images
    capsys.readouterr()
    run_train(*tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "-b", "4", "--resume", "auto"))
    out = capsys.readouterr().out
    assert "epoch 1 goes on after image 24 of its order with another batch or process count, from step 6 of 12" in out
    last = load(tmp_path / "ckpt/last.pth")
    assert last["epoch"] == 2 and last["step"] == 3 + 6 + 12 and last["batch_in_epoch"] == 0
    steps = [s for s, _ in scalars(str(tmp_path / "runs/t"))["train/loss"]]
    assert steps == list(range(1, 22))  # one TensorBoard step per optimizer step, none twice


def test_resume_applies_changed_flags_or_refuses_them(tiny_data, tmp_path, capsys):
    run_train(*tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "--max-steps", "3"))
    code = utils.run_cli(train.main, flags.get_args_parser().parse_args(
        tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "--resume", "auto", "--seed", "1")))
    err = capsys.readouterr().err
    assert code == 2 and "stopped inside an epoch" in err and err.count("\n") == 1, err
    code = utils.run_cli(train.main, flags.get_args_parser().parse_args(
        tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "--resume", "auto", "--opt", "sgd")))
    err = capsys.readouterr().err
    assert code == 2 and "was trained with --opt adam" in err and err.count("\n") == 1, err
    run_train(*tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "--resume", "auto", "--max-steps", "3"))
    assert load(tmp_path / "ckpt/last.pth")["step"] == 3  # --max-steps already reached: not one step more
    run_train(*tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "--resume", "auto", "--wd", "1e-4"))
    assert "applied from now on: --weight-decay 0.0 -> 0.0001" in capsys.readouterr().out
    last = load(tmp_path / "ckpt/last.pth")
    assert last["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4  # not the checkpoint's 0
    assert last["optimizer"]["param_groups"][1]["weight_decay"] == 0.0   # BN and biases: still none
    assert last["ema"]["collected_params"] is None  # no second copy of the weights in the EMA's state
    run_train(*tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "--resume", "auto", "--wd", "1e-4"))
    assert "already complete (2 of 2 epochs" in capsys.readouterr().out


def test_torchrun_with_one_process_runs_the_distributed_code(tiny_data, tmp_path, monkeypatch, capsys):
    """As `torchrun --nproc_per_node=1 train.py` sets the environment: process group, DDP wrapper, collectives."""
    from test_utils import torchrun_environment
    torchrun_environment(monkeypatch)
    args = flags.get_args_parser().parse_args(tiny_train_args(tiny_data, tmp_path, "--max-steps", "3"))
    assert utils.run_cli(train.main, args) == 0
    assert "device cpu x1 (torchrun, DDP, process group cpu:gloo)" in capsys.readouterr().out
    last = load(tmp_path / "ckpt/last.pth")
    assert last["step"] == 3 and not any(key.startswith("module.") for key in last["model"])
    assert not utils.is_distributed()  # run_cli ended the process group


def test_a_second_run_never_destroys_the_first(tiny_data, tmp_path, monkeypatch, capsys):
    """With the default folders each run gets checkpoints/<run-name>/ and runs/<run-name>/, and checkpoints/latest
    points to the newest; --resume auto continues that one. The same explicit folder twice is refused unless
    --resume or --overwrite is given."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data-path", str(tiny_data), "--arch", "small", "--width-mult", "0.5", "--img-size", "32", "-b", "8",
            "--workers", "0", "--device", "cpu", "--print-freq", "1", "--epochs", "1"]
    run_train(*argv)
    run_train(*argv, "--lr", "1e-3")
    first, second = sorted(name for name in os.listdir("checkpoints") if name != "latest")  # by start time
    assert os.path.realpath("checkpoints/latest") == str(tmp_path / "checkpoints" / second)
    for name in (first, second):
        assert load(f"checkpoints/{name}/last.pth")["step"] == 6
        assert [s for s, _ in scalars(f"runs/{name}")["train/loss"]] == list(range(1, 7))  # nothing purged
    assert load(f"checkpoints/{first}/last.pth")["args"]["lr"] == 5e-3
    code = utils.run_cli(train.main, flags.get_args_parser().parse_args([*argv, "--resume", "auto"]))
    err = capsys.readouterr().err  # the first run's command: the latest run is the second, with another --lr
    assert code == 2 and "would continue the latest run" in err and "--lr 0.001 -> 0.005" in err, err
    run_train(*argv, "--lr", "1e-3", "--epochs", "2", "--resume", "auto")
    assert load(f"checkpoints/{second}/last.pth")["step"] == 12 and load(f"checkpoints/{first}/last.pth")["step"] == 6
    assert f"python evaluate.py {tmp_path}/checkpoints/{second}/best.pth" in capsys.readouterr().out
    run_train(*argv, "--lr", "1e-3", "--epochs", "3", "--resume", "checkpoints/latest/last.pth")  # through the link
    assert load(f"checkpoints/{second}/last.pth")["step"] == 18
    assert os.path.realpath("checkpoints/latest") == str(tmp_path / "checkpoints" / second)

    explicit = argv + ["--output-dir", "mine", "--run-name", "mine"]
    run_train(*explicit)
    before = open("mine/last.pth", "rb").read()
    code = utils.run_cli(train.main, flags.get_args_parser().parse_args(explicit))
    err = capsys.readouterr().err
    assert code == 2 and "belongs to an earlier run: add --resume auto" in err and err.count("\n") == 1, err
    assert open("mine/last.pth", "rb").read() == before  # untouched
    run_train(*explicit, "--overwrite", "--seed", "3")
    assert load("mine/last.pth")["args"]["seed"] == 3
    assert [s for s, _ in scalars("runs/mine")["train/loss"]] == list(range(1, 7))  # one run's events only


def test_best_weights_file_is_small_evaluates_like_best_and_fine_tunes(trained, tiny_data, tmp_path):
    import json
    import evaluate
    best, small = trained / "ckpt/best.pth", trained / "ckpt/best_weights.pth"
    assert os.path.getsize(small) < os.path.getsize(best) / 2.5  # best.pth also holds EMA and optimizer state
    scores = {}
    for path in (best, small):
        out = tmp_path / f"{path.name}.json"
        args = evaluate.get_args_parser().parse_args([str(path), "--workers", "0", "--json", str(out)])
        assert evaluate.main(args) == 0  # no --data-path: the checkpoint knows where its data was
        scores[path.name] = json.load(open(out))
    assert scores["best.pth"]["top1"] == scores["best_weights.pth"]["top1"]
    assert scores["best.pth"]["loss"] == pytest.approx(scores["best_weights.pth"]["loss"], rel=1e-6)
    # --pretrained takes this project's files; a classifier of another class count is skipped (fine-tuning)
    two_classes = make_class_folders(tmp_path / "two", train_per_class=8, val_per_class=2,
                                     classes=["n00000001", "n00000002"])
    for source in (best, small):
        run_train(*tiny_train_args(two_classes, tmp_path / source.name, "--pretrained", str(source), "--max-steps", "1"))
        tuned = load(tmp_path / source.name / "ckpt/last.pth")["model"]
        assert tuned["classifier.3.weight"].shape[0] == 2


def test_resume_turning_rmsprop_momentum_on(tiny_data, tmp_path):
    """RMSprop keeps no momentum buffers when trained without momentum: a resume that turns it on must go on."""
    run_train(*tiny_train_args(tiny_data, tmp_path, "--opt", "rmsprop", "--momentum", "0", "--max-steps", "2"))
    run_train(*tiny_train_args(tiny_data, tmp_path, "--opt", "rmsprop", "--momentum", "0.9", "--max-steps", "4",
                               "--resume", "auto"))
    last = load(tmp_path / "ckpt/last.pth")
    assert last["step"] == 4 and last["optimizer"]["param_groups"][0]["momentum"] == 0.9


def test_distillation_loss_is_the_weighted_sum_of_cross_entropy_and_kl():
    torch.manual_seed(0)
    logits, teacher, targets = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    ce = torch.nn.CrossEntropyLoss()
    loss, kd = train.distillation_loss(ce(logits, targets), logits, logits.clone(), 0.5, 4.0)
    assert kd.item() == pytest.approx(0, abs=1e-6) and loss.item() == pytest.approx(0.5 * ce(logits, targets).item())
    loss, kd = train.distillation_loss(ce(logits, targets), logits, teacher, 0.3, 2.0)
    p, q = torch.softmax(teacher / 2, 1), torch.log_softmax(logits / 2, 1)
    expected_kd = 4 * (p * (p.log() - q)).sum(1).mean()
    assert kd.item() == pytest.approx(expected_kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * ce(logits, targets).item() + 0.3 * expected_kd.item(), rel=1e-5)


def test_a_teacher_distils_into_the_student(trained, tiny_data, tmp_path):
    teacher = str(trained / "ckpt/best_weights.pth")
    common = ["--max-steps", "3", "--deterministic", "--ema-decay", "0"]
    run_train(*tiny_train_args(tiny_data, tmp_path / "alone", *common))
    run_train(*tiny_train_args(tiny_data, tmp_path / "alpha0", *common, "--teacher", teacher, "--kd-alpha", "0"))
    run_train(*tiny_train_args(tiny_data, tmp_path / "kd", *common, "--teacher", teacher, "--kd-alpha", "0.7",
                               "--kd-temperature", "2"))
    alone, alpha0, kd = (load(tmp_path / run / "ckpt/last.pth")["model"] for run in ("alone", "alpha0", "kd"))
    assert all(torch.equal(alone[k], alpha0[k]) for k in alone)  # the teacher adds nothing but its loss term
    assert any(not torch.allclose(alone[k], kd[k]) for k in alone if alone[k].is_floating_point())
    kd_losses = [v for _, v in scalars(str(tmp_path / "kd/runs/t"))["train/kd_loss"]]
    assert len(kd_losses) == 3 and all(v > 0 for v in kd_losses)


def test_a_dataset_without_validation_holds_out_part_of_training(tmp_path, capsys):
    """--val-split-fraction: a deterministic, stratified share of each class, scored by train.py and found again
    by evaluate.py."""
    import json
    import shutil
    import evaluate
    data = make_class_folders(tmp_path / "data", train_per_class=16, val_per_class=1)
    shutil.rmtree(os.path.join(data, "val"))
    code = utils.run_cli(train.main, flags.get_args_parser().parse_args(tiny_train_args(data, tmp_path / "no")))
    assert code == 2 and "--val-split-fraction" in capsys.readouterr().err
    run_train(*tiny_train_args(data, tmp_path, "--epochs", "1", "--val-split-fraction", "0.25"))
    best = load(tmp_path / "ckpt/best.pth")
    assert best["metrics"]["val_images"] == 12  # 4 of each class's 16
    train_split, val_split = layouts.split_validation(layouts.find_dataset(data).train, 0.25, 0)
    assert len(train_split) == 36 and sorted(val_split.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert not set(train_split.paths.tolist()) & set(val_split.paths.tolist())
    assert best["steps_per_epoch"] == 36 // 8
    out = tmp_path / "m.json"
    assert evaluate.main(evaluate.get_args_parser().parse_args([str(tmp_path / "ckpt/best.pth"), "--workers", "0",
                                                                "--json", str(out)])) == 0
    metrics = json.load(open(out))
    assert metrics["images"] == 12 and metrics["top1"] == pytest.approx(best["best_top1"])


def test_openmp_threads_sleep_instead_of_spinning_unless_told_otherwise():
    """train.py sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP (spinning threads stall on a shared CPU)."""
    probe = "import os, train; print(os.environ.get('OMP_WAIT_POLICY'))"
    for preset, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if preset:
            env["OMP_WAIT_POLICY"] = preset
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env)
        assert out.stdout.strip() == expected, out.stderr[-2000:]


def test_resolve_config_leaves_the_parsed_flags_as_they_were():
    args = flags.get_args_parser().parse_args(["--epochs", "3"])
    parsed = dict(vars(args))
    config = flags.resolve_config(args, torch.device("cpu"), "/tmp/run-folder", "run")
    assert vars(args) == parsed  # args is never written
    assert (config.img_size, config.epochs, config.val_crop_size, config.val_resize_size) == (64, 3, 64, 73)
    assert (config.amp, config.channels_last, config.output_dir, config.run_name) == (False, True, "/tmp/run-folder",
                                                                                    "run")


def test_an_update_with_too_few_micro_batches_is_refused_before_the_step():
    import model as model_lib
    config = flags.resolve_config(flags.get_args_parser().parse_args(["--accum-steps", "2", "--img-size", "32"]),
                                  torch.device("cpu"))
    net = model_lib.build_model("small", 0.5, 3)
    run = train.build_trainer(config, net, torch.device("cpu"), steps_per_epoch=4, show_progress=False)
    skips = train.SkippedSteps(net, train.TrainState(), run.scaler)
    before = [p.detach().clone() for p in net.parameters()]
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))

    def step(micro_batches):
        return train.train_step(run.model, list(net.parameters()), micro_batches, 1e-3, run.optimizer, run.scaler,
                                run.autocast, run.criterion, skips, config.accum_steps, run.ema)
    with pytest.raises(ValueError, match="1 micro-batches for --accum-steps 2"):
        step([batch])
    assert run.ema.num_updates == 0  # no step, no EMA update
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    step([batch, batch])  # the full step goes through
    assert run.ema.num_updates == 1 and not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_the_foreach_ema_update_is_torch_ema_s_own_and_its_state_loads_into_torch_ema():
    from torch_ema import ExponentialMovingAverage
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 3))
    ours = train.make_ema(net, 0.99)
    tensors = list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]
    reference = ExponentialMovingAverage(tensors, decay=0.99)
    assert isinstance(ours, train.ForeachEMA) and len(ours.shadow_params) == len(tensors)
    for _ in range(30):  # through the (1 + n) / (10 + n) warm-up and past it
        with torch.no_grad():
            for t in tensors:
                t.add_(torch.randn_like(t))
        ours.update()
        reference.update()
    assert ours.num_updates == reference.num_updates == 30
    for mine, theirs in zip(ours.shadow_params, reference.shadow_params):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert max((m - t).abs().max().item() for m, t in zip(ours.shadow_params, tensors)) > 0.1  # an average, not a copy
    plain = ExponentialMovingAverage(tensors, decay=0.99)
    plain.load_state_dict(ours.state_dict())  # checkpoints stay torch-ema's
    assert all(torch.equal(a, b) for a, b in zip(plain.shadow_params, ours.shadow_params))


def test_training_puts_the_signal_handlers_back(tiny_data, tmp_path):
    """While train.main runs, SIGTERM/SIGINT finish the step and save; afterwards the process has its own
    handlers again (a leftover handler that only sets a flag is passed to every process the caller forks)."""
    import signal
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run_train(*tiny_train_args(tiny_data, tmp_path, "--epochs", "1", "--max-steps", "1"))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_resumed_optimizer_keeps_its_implementation_and_its_parameters_memory_layout():
    """A checkpoint of a foreach optimizer over contiguous weights (a CPU run), resumed by a fused one over
    channels_last weights (a CUDA run; fused Adam runs on the CPU too): load_state_dict alone would make the
    optimizer foreach again, which fp16's GradScaler refuses at the first step, and keep the moments contiguous,
    which the fused CPU kernel silently misreads."""
    import copy
    import types
    import model as model_lib
    config = flags.resolve_config(flags.get_args_parser().parse_args([]), torch.device("cpu"))
    torch.manual_seed(0)
    saved_net = model_lib.build_model("small", 0.5, 3)
    saved = train.make_optimizer(saved_net, config, torch.device("cpu"))
    assert saved.defaults["foreach"] and not saved.defaults.get("fused")
    saved_net(torch.randn(2, 3, 32, 32)).sum().backward()
    saved.step()
    ckpt = {"optimizer": saved.state_dict()}
    resumed = {}
    for name, option in (("fused", {"fused": True}), ("for-loop", {"foreach": False})):
        net = copy.deepcopy(saved_net).to(memory_format=torch.channels_last)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in train.make_optimizer(net, config, torch.device("cpu")).param_groups]
        run = types.SimpleNamespace(optimizer=torch.optim.Adam(groups, lr=1e-2, **option), config=config)
        checkpoint.load_optimizer_state(run, copy.deepcopy(ckpt), "last.pth")  # else both would share its tensors
        resumed[name] = net, run.optimizer
    net, fused = resumed["fused"]
    assert fused.param_groups[0]["fused"] and not fused.param_groups[0]["foreach"]
    four_d = [p for p in net.parameters() if p.ndim == 4 and p.shape[1] > 1]
    assert four_d and all(fused.state[p]["exp_avg"].stride() == p.stride() for p in four_d)
    grads = [torch.randn_like(p) for p in net.parameters()]
    for net, optimizer in resumed.values():
        for param, grad in zip(net.parameters(), grads):
            param.grad = grad.clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # fp16's scaler hands its scale to a fused step,
    scaler.scale(torch.ones(()))                             # which a foreach one refuses
    scaler.step(fused)
    resumed["for-loop"][1].step()
    for a, b in zip(resumed["fused"][0].parameters(), resumed["for-loop"][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_resume_that_switches_channels_last_lays_the_ema_out_like_the_weights(tiny_data, tmp_path, monkeypatch):
    common = tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "--ema-decay", "0.9")
    run_train(*common, "--no-channels-last", "--max-steps", "1")
    seen = {}
    original = train.train_epochs

    def look_at_the_resumed_run(run, state):
        tensors = run.ema._get_parameters(None)
        seen["matching"] = [s.stride() == t.stride() for s, t in zip(run.ema.shadow_params, tensors) if t.ndim == 4]
        seen["channels_last"] = run.config.channels_last
        return original(run, state)
    monkeypatch.setattr(train, "train_epochs", look_at_the_resumed_run)
    run_train(*common, "--channels-last", "--max-steps", "2", "--resume", "auto")
    assert seen["channels_last"] and seen["matching"] and all(seen["matching"])


def layer_output_dtypes_while_training(monkeypatch):
    """A list that fills, during training forwards only (train mode, gradients on), with the output dtype of
    every convolution and linear layer of the networks train.py builds."""
    import model as model_lib
    seen, real_build = [], model_lib.build_model

    def record(module, inputs, output):
        if module.training and torch.is_grad_enabled():
            seen.append(output.dtype)

    def build_with_hooks(*args, **kwargs):
        net = real_build(*args, **kwargs)
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.register_forward_hook(record)
        return net
    monkeypatch.setattr(model_lib, "build_model", build_with_hooks)
    return seen


@pytest.mark.parametrize("precision, dtype", [((), torch.float32),
                                              (("--amp", "--amp-dtype", "bfloat16"), torch.bfloat16),
                                              (("--amp", "--amp-dtype", "float16"), torch.float16)],
                         ids=["fp32", "bf16", "fp16"])
def test_the_training_forward_computes_in_the_precision_asked_for(tiny_data, tmp_path, monkeypatch, precision, dtype):
    """--amp runs the training step's forward under autocast: every convolution and linear layer computes in the
    low-precision dtype (the 2021 original never entered autocast, so its "AMP" trained in fp32)."""
    import model as model_lib
    seen = layer_output_dtypes_while_training(monkeypatch)
    run_train(*tiny_train_args(tiny_data, tmp_path, *precision, "--max-steps", "2"))
    net = model_lib.MobileNetV3("small", 0.5)
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in net.modules())
    assert seen == [dtype] * (2 * layers)  # two steps, each layer once per forward


def test_every_training_step_moves_the_ema_as_its_decay_says(tiny_data, tmp_path, monkeypatch):
    """The EMA in last.pth is the decay-weighted average of the weights after each step, from the initial
    weights, with torch-ema's warm-up: shadow_n = shadow_(n-1) + (1 - d_n) (weights_n - shadow_(n-1)),
    d_n = min(decay, (1 + n) / (10 + n))."""
    decay, steps = 0.5, 4
    after_step, real_step = [], train.train_step

    def tensors(net):  # what the EMA averages: the parameters and the floating-point buffers, by name
        return {k: v.detach().double().clone() for k, v in [*net.named_parameters(), *net.named_buffers()]
                if v.is_floating_point()}

    def recording_step(model, *args, **kwargs):
        if not after_step:
            after_step.append(tensors(model))  # the weights the EMA starts from
        figures = real_step(model, *args, **kwargs)
        after_step.append(tensors(model))
        return figures
    monkeypatch.setattr(train, "train_step", recording_step)
    run_train(*tiny_train_args(tiny_data, tmp_path, "--max-steps", str(steps), "--ema-decay", str(decay)))
    assert len(after_step) == steps + 1
    expected = dict(after_step[0])
    for n in range(1, steps + 1):
        d = min(decay, (1 + n) / (10 + n))
        expected = {k: s + (1 - d) * (after_step[n][k] - s) for k, s in expected.items()}
    saved = load(tmp_path / "ckpt/last.pth")["ema_model"]
    for k, value in expected.items():
        torch.testing.assert_close(saved[k].double(), value, rtol=0, atol=1e-6, msg=k)
    # the expectation tells an EMA from the initial weights (never updated) and from a copy of the final ones
    farthest = {name: max((expected[k] - w[k]).abs().max().item() for k in expected)
                for name, w in (("initial", after_step[0]), ("final", after_step[-1]))}
    assert min(farthest.values()) > 1e-3, farthest


def test_mixup_and_cutmix_reach_the_loss_as_soft_targets_and_are_logged(tiny_data, tmp_path, monkeypatch):
    """With --mixup-alpha and --cutmix-alpha, each training batch is mixed: the loss gets soft targets, each row
    a pair of classes weighted lam and 1 - lam, and what it returns is the loss TensorBoard logs."""
    seen, real_build = [], train.build_trainer

    def build_watching_the_loss(*args, **kwargs):
        run = real_build(*args, **kwargs)
        run.criterion.register_forward_hook(lambda module, inputs, loss: seen.append((inputs[1].detach().clone(),
                                                                                      loss.item())))
        return run
    monkeypatch.setattr(train, "build_trainer", build_watching_the_loss)
    run_train(*tiny_train_args(tiny_data, tmp_path, "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
                               "--max-steps", "4"))
    assert len(seen) == 4
    for targets, loss in seen:
        assert targets.shape == (8, 3) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
        assert ((targets > 0).sum(dim=1) <= 2).all()                 # at most two classes in each row
        mixed = targets[(targets > 0).sum(dim=1) == 2]
        assert len(mixed), targets                                   # some rows really mix two classes
        lam = mixed.max().item()                                     # one lam (or 1 - lam) for the whole batch
        pairs = mixed.sort(dim=1).values[:, 1:]
        torch.testing.assert_close(pairs, torch.tensor([[1 - lam, lam]]).expand(len(mixed), 2))
        assert math.isfinite(loss)
    logged = scalars(str(tmp_path / "runs/t"))["train/loss"]
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in logged] == pytest.approx([loss for _, loss in seen], rel=1e-5)


def test_a_trained_teacher_distils_better_than_an_untrained_one(trained, tiny_data, tmp_path):
    """Pure distillation (--kd-alpha 1: the labels reach the student only through the teacher): a student of the
    trained teacher scores well on the labels, a student of an untrained one of the same file format does not."""
    import model as model_lib
    trained_teacher = trained / "ckpt/best_weights.pth"
    weights = load(trained_teacher)
    torch.manual_seed(0)
    torch.save(dict(weights, model=model_lib.build_model(**weights["model_config"]).state_dict()),
               tmp_path / "untrained.pth")
    scores = {}
    for name, teacher in (("trained", trained_teacher), ("untrained", tmp_path / "untrained.pth")):
        run_train(*tiny_train_args(tiny_data, tmp_path / name, "--epochs", "2", "--deterministic", "--ema-decay", "0",
                                   "--teacher", str(teacher), "--kd-alpha", "1.0"))
        scores[name] = load(tmp_path / name / "ckpt/last.pth")["metrics"]
    assert scores["trained"]["val_top1"] >= scores["untrained"]["val_top1"] + 20, scores  # 3 classes: chance 33%
    assert scores["trained"]["val_loss"] < scores["untrained"]["val_loss"] - 0.3, scores
