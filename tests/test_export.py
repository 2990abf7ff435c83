"""export.py: ONNX fp32 and int8 files that score what the checkpoint scores, their metadata, pt2, bad inputs."""
import contextlib
import io
import json
import os

import onnx
import pytest
import torch

import dataset
import evaluate
import export
import layouts
import utils
from conftest import assert_clean_error, run_script


def run_export(*argv):
    """export.main in this process; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert export.main(export.get_args_parser().parse_args([str(a) for a in argv])) == 0
    return out.getvalue()


def run_eval_json(path, data, tmp_path, *extra):
    result = tmp_path / (os.path.basename(str(path)) + ".json")
    args = evaluate.get_args_parser().parse_args([str(path), "--data-path", str(data), "--workers", "0",
                                                  "--json", str(result), *extra])
    assert evaluate.main(args) == 0
    return json.loads(result.read_text())


def val_images(data, info, count=18):
    index, _ = layouts.find_val_split(data, info["classes"])
    return export.load_images(index, count, info["val_resize_size"] or 37, info["val_crop_size"], info["norm"]), index


@pytest.fixture(scope="module")
def exported(trained, tiny_data, tmp_path_factory):
    """The tiny checkpoint exported to fp32 and int8 ONNX (calibrated on 24 training images); the printed reports."""
    out = tmp_path_factory.mktemp("exported")
    fp32, int8 = out / "model.onnx", out / "model.int8.onnx"
    checkpoint = trained / "ckpt/best.pth"
    fp32_report = run_export(checkpoint, "--output", fp32, "--calib-data", tiny_data)
    int8_report = run_export(checkpoint, "--output", int8, "--int8", "--calib-data", tiny_data, "--calib-images", 24)
    return {"checkpoint": checkpoint, "fp32": fp32, "int8": int8, "fp32_report": fp32_report,
            "int8_report": int8_report, "folder": out}


def test_fp32_onnx_gives_pytorchs_logits_and_scores_like_the_checkpoint(exported, tiny_data, tmp_path):
    net, info = evaluate.load_model_for_eval(str(exported["checkpoint"]))
    onnx_net, onnx_info = evaluate.load_model_for_eval(str(exported["fp32"]))  # evaluate.py's own dispatch
    images, _ = val_images(tiny_data, info)
    with torch.no_grad():
        reference = net.eval()(images)
        difference = (onnx_net(images) - reference).abs().max().item()
        difference_channels_last = (onnx_net(images.contiguous(memory_format=torch.channels_last)) - reference).abs().max().item()
    assert difference < 1e-4 and difference_channels_last < 1e-4, (difference, difference_channels_last)
    assert reference.abs().max() > 1  # a trained model: a zero-logit export could not pass
    # the check export.py printed is the same comparison
    assert "onnxruntime fp32 vs PyTorch fp32" in exported["fp32_report"] and "top-1 agreement 100.0%" in exported["fp32_report"]
    # evaluate.py on the .onnx: the same images, classes and metrics as on the checkpoint (both in fp32)
    from_checkpoint = run_eval_json(exported["checkpoint"], tiny_data, tmp_path, "--no-amp")
    from_onnx = run_eval_json(exported["fp32"], tiny_data, tmp_path)
    assert from_onnx["images"] == from_checkpoint["images"] == 18
    assert from_onnx["top1"] == from_checkpoint["top1"] and from_onnx["top5"] == from_checkpoint["top5"]
    assert from_onnx["loss"] == pytest.approx(from_checkpoint["loss"], abs=1e-4)


def test_metadata_round_trip_and_what_a_consumer_reads(exported, trained):
    _, info = evaluate.load_model_for_eval(str(exported["checkpoint"]))
    _, onnx_info = evaluate.load_onnx_for_eval(str(exported["fp32"]))
    assert sorted(onnx_info) == sorted(info)
    for key in info:
        if key != "amp":  # the file runs in fp32 whatever the training precision was
            assert onnx_info[key] == info[key], key
    assert onnx_info["amp"] is False
    props = {p.key: json.loads(p.value) for p in onnx.load(str(exported["fp32"])).metadata_props}
    mean, std = dataset.NORMS[info["norm"]]
    assert props["mean"] == list(mean) and props["std"] == list(std)
    assert props["class_names"] == info["class_names"] and props["precision"] == "fp32"
    assert props["input"]["shape"] == ["batch", 3, 32, 32] and props["val_crop_size"] == 32
    assert "centre crop 32x32" in props["preprocessing"]
    graph = onnx.load(str(exported["fp32"]))
    assert {op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")} == {export.DEFAULT_OPSET}
    assert "HardSwish" in {node.op_type for node in graph.graph.node}  # native, not decomposed


def test_int8_is_quantized_smaller_and_scores_close_to_fp32(exported, tiny_data, tmp_path):
    graph = onnx.load(str(exported["int8"]))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "no int8 convolution weights"
    scales = {t.name: t for t in graph.graph.initializer}
    per_channel = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
                   {t.name for t in int8_weights} and len(scales[n.input[1]].dims) == 1]
    assert per_channel, "weights are not quantized per channel"
    assert os.path.getsize(exported["int8"]) < 0.5 * os.path.getsize(exported["fp32"])
    assert "calibrating on 24 training images" in exported["int8_report"]
    assert "onnxruntime int8 vs PyTorch fp32" in exported["int8_report"]
    _, info = evaluate.load_onnx_for_eval(str(exported["int8"]))
    fp32 = run_eval_json(exported["fp32"], tiny_data, tmp_path)
    int8 = run_eval_json(exported["int8"], tiny_data, tmp_path)
    assert int8["images"] == 18 and abs(int8["top1"] - fp32["top1"]) <= 100 * 3 / 18, (int8, fp32)


def test_fixed_batch_and_opset_14(exported, tiny_data, tmp_path):
    path = tmp_path / "b4.onnx"
    report = run_export(exported["checkpoint"], "--output", path, "--opset", 14, "--batch-size", 4,
                        "--calib-data", tiny_data, "--check-images", 10)
    graph = onnx.load(str(path))
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 32, 32]
    assert {op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")} == {14}
    assert "check on 10 real images" in report
    # 18 validation images in batches of 4: the last one padded, the scores those of the dynamic file
    assert run_eval_json(path, tiny_data, tmp_path, "-b", "7")["top1"] == run_eval_json(exported["fp32"], tiny_data, tmp_path)["top1"]


def test_pt2_program_gives_the_same_logits(exported, tiny_data, tmp_path):
    path = tmp_path / "model.pt2"
    run_export(exported["checkpoint"], "--format", "pt2", "--output", path, "--calib-data", tiny_data)
    net, info = evaluate.load_model_for_eval(str(exported["checkpoint"]))
    extra = {"metadata.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    images, _ = val_images(tiny_data, info, 5)
    with torch.no_grad():
        assert (program.module()(images) - net.eval()(images)).abs().max().item() < 1e-5
    assert json.loads(extra["metadata.json"])["class_names"] == info["class_names"]


def test_without_real_images_the_check_is_skipped_with_a_note(trained, tmp_path):
    checkpoint = torch.load(trained / "ckpt/best.pth", weights_only=True)
    checkpoint["args"]["data_path"] = str(tmp_path / "gone")  # the data folder was moved since training
    if "data_path" in checkpoint:
        checkpoint["data_path"] = str(tmp_path / "gone")
    torch.save(checkpoint, tmp_path / "moved.pth")
    report = run_export(tmp_path / "moved.pth")
    assert "check skipped" in report and os.path.isfile(tmp_path / "moved.onnx")


def test_bad_inputs_are_one_line_and_leave_nothing(exported, trained, tiny_data, tmp_path, capsys, monkeypatch):
    checkpoint = str(exported["checkpoint"])
    (tmp_path / "noise.pth").write_bytes(b"not a checkpoint, not a model\n" * 60)
    (tmp_path / "noise.onnx").write_bytes(b"not a checkpoint, not a model\n" * 60)
    no_images = tmp_path / "no_images"
    (no_images / "train" / "n00000001").mkdir(parents=True)
    (no_images / "train" / "n00000001" / "readme.txt").write_text("not an image")
    foreign = onnx.load(str(exported["fp32"]))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    cases = [([tmp_path / "noise.pth"], "not a readable PyTorch checkpoint"),
             ([checkpoint, "--output", tmp_path / "missing" / "m.onnx"], "cannot write"),
             ([checkpoint, "--int8", "--calib-data", no_images, "--output", tmp_path / "q.onnx"], "no image"),
             ([checkpoint, "--int8", "--output", tmp_path / "q.onnx"], "--int8 needs --calib-data"),
             ([checkpoint, "--opset", "13", "--output", tmp_path / "o.onnx"], "HardSwish"),
             ([checkpoint, "--opset", "25", "--output", tmp_path / "o.onnx"], "opsets 14-20"),
             ([exported["fp32"]], "already an ONNX file"),
             # the output folder is checked before any checkpoint is read (which can take a while)
             ([checkpoint, checkpoint, "--format", "average", "--output", tmp_path / "missing" / "m.pth"],
              "cannot write"),
             ([tmp_path / "typo" / "a.pth", checkpoint, "--format", "average"], "checkpoint not found")]
    for argv, message in cases:
        code = utils.run_cli(export.main, export.get_args_parser().parse_args([str(a) for a in argv]))
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    held = evaluate.load_onnx_for_eval(str(exported["fp32"]))[1]
    other = "raw" if held["weights"] == "ema" else "ema"
    for argv, message in (([tmp_path / "noise.onnx"], "not a readable ONNX model"),
                          ([tmp_path / "foreign.onnx"], "not one written by export.py"),
                          ([exported["fp32"], "--arch", "small" if held["config"]["arch"] == "large" else "large"],
                           "--arch"),
                          ([exported["fp32"], "--num-classes", held["config"]["num_classes"] + 1], "--num-classes"),
                          ([exported["fp32"], "--width-mult", held["config"]["width_mult"] * 2], "--width-mult"),
                          ([exported["fp32"], "--weights", other], f"holds only the {held['weights']} weights")):
        code = utils.run_cli(evaluate.main, evaluate.get_args_parser().parse_args(
            [str(a) for a in argv] + ["--data-path", str(tiny_data)]))
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)

    # from the real command line too: one line, no traceback
    proc = run_script("export.py", tmp_path / "noise.pth", "--output", tmp_path / "n.onnx")
    assert_clean_error(proc, "not a readable PyTorch checkpoint")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr

    # a file that fails its check is never left at --output, and what was there survives
    target = tmp_path / "kept.onnx"
    target.write_bytes(b"the previous export")
    def failing_check(*args):
        raise utils.UserError("the exported file disagrees with PyTorch")
    monkeypatch.setattr(export, "check", failing_check)
    code = utils.run_cli(export.main, export.get_args_parser().parse_args(
        [checkpoint, "--output", str(target), "--calib-data", tiny_data]))
    assert code == 2 and "disagrees" in capsys.readouterr().err
    assert target.read_bytes() == b"the previous export"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
    assert not any(os.path.exists(tmp_path / name) for name in ("q.onnx", "o.onnx", "n.onnx"))


def test_keep_checkpoints_then_average_them(tiny_data, tmp_path):
    import flags
    import train
    from conftest import tiny_train_args
    args = flags.get_args_parser().parse_args(tiny_train_args(tiny_data, tmp_path, "--epochs", "3",
                                                              "--keep-checkpoints", "2"))
    assert train.main(args) == 0
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("epoch_*.pth"))
    assert kept == ["epoch_0002.pth", "epoch_0003.pth"]
    files = [str(tmp_path / "ckpt" / name) for name in kept]
    out = tmp_path / "avg.pth"
    assert export.main(export.get_args_parser().parse_args([*files, "--format", "average", "--output", str(out)])) == 0
    average = torch.load(out, weights_only=True)
    a, b = (torch.load(path, weights_only=True)["model"] for path in files)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(average["model"][key], (a[key] + b[key]) / 2)
    metrics = tmp_path / "m.json"
    run = evaluate.get_args_parser().parse_args([str(out), "--data-path", tiny_data, "--workers", "0",
                                                 "--json", str(metrics)])
    assert evaluate.main(run) == 0 and json.load(open(metrics))["images"] == 18
