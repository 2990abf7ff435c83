"""evaluate.py: exact metrics, class matching by name, torchvision interop, torchrun equality, report files."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import evaluate
import utils
from conftest import REPO, free_port, run_script


def run_eval(*argv):
    args = evaluate.get_args_parser().parse_args([str(a) for a in argv])
    assert evaluate.main(args) == 0


def test_topk_counts_on_a_hand_checked_case():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],    # target 1: top-1 hit
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],    # target 4: 5th best -> top-5 hit only
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],    # target 5: worst -> miss
                           [0.0, 0.0, 0.0, 0.0, 0.2, 0.1]])   # target 5: 2nd best -> top-5 hit
    target = torch.tensor([1, 4, 5, 5])
    assert utils.correct_topk(logits, target, (1, 5)).tolist() == [1.0, 3.0]
    soft = torch.nn.functional.one_hot(target, 6).float() * 0.8 + 0.02  # mixup-style labels score by argmax
    assert utils.correct_topk(logits, soft, (1, 5)).tolist() == [1.0, 3.0]


def test_agrees_with_the_numbers_train_logged(trained, tiny_data, tmp_path):
    best = torch.load(trained / "ckpt/best.pth", weights_only=True)
    run_eval(trained / "ckpt/best.pth", "--data-path", tiny_data, "--workers", "0", "--json", tmp_path / "m.json")
    metrics = json.load(open(tmp_path / "m.json"))
    prefix = "val_ema_" if best["best_weights"] == "ema" else "val_"
    assert metrics["weights"] == best["best_weights"]
    if best["epoch"] == best["metrics"]["epoch"]:
        assert metrics["top1"] == pytest.approx(best["metrics"][prefix + "top1"], abs=1e-9)
        assert metrics["top5"] == pytest.approx(best["metrics"][prefix + "top5"], abs=1e-9)
        assert metrics["loss"] == pytest.approx(best["metrics"][prefix + "loss"], rel=1e-4)
    assert metrics["top1"] == pytest.approx(best["best_top1"], abs=1e-9)
    assert metrics["images"] == 18


def test_subset_and_reordered_classes_are_scored_by_name(trained, tiny_data, tmp_path, capsys):
    full_csv, subset_csv = tmp_path / "full.csv", tmp_path / "subset.csv"
    run_eval(trained / "ckpt/best.pth", "--data-path", tiny_data, "--workers", "0", "--per-class", full_csv)
    # a validation folder with only the 2nd and 3rd classes: folder index 0 is checkpoint class 1
    subset = tmp_path / "subset"
    for name in ("n00000002", "n00000003"):
        shutil.copytree(os.path.join(tiny_data, "val", name), subset / "val" / name)
    run_eval(trained / "ckpt/best.pth", "--data-path", subset, "--workers", "0", "--per-class", subset_csv)
    full = {r["class"]: r for r in csv.DictReader(open(full_csv))}
    part = {r["class"]: r for r in csv.DictReader(open(subset_csv))}
    assert sorted(part) == ["n00000002", "n00000003"]
    for name in part:
        assert part[name]["correct"] == full[name]["correct"] and part[name]["images"] == full[name]["images"]
    # a class the checkpoint does not know is one clear error
    os.makedirs(subset / "val" / "n09999999")
    shutil.copy(next(iter((subset / "val" / "n00000002").iterdir())), subset / "val" / "n09999999" / "x.JPEG")
    code = utils.run_cli(evaluate.main, evaluate.get_args_parser().parse_args(
        [str(trained / "ckpt/best.pth"), "--data-path", str(subset), "--workers", "0"]))
    assert code == 2 and "n09999999" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["large", "small"])
def test_torchvision_state_dict_gives_torchvisions_logits(tmp_path, arch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"mobilenet_v3_{arch}")(weights=None).eval()
    for module in reference.modules():  # random BN statistics, so a wrong mapping cannot pass
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    net, info = evaluate.load_model_for_eval(str(tmp_path / "tv.pth"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (net.eval()(x) - reference(x)).abs().max().item() < 1e-5
    assert info["config"]["arch"] == arch and info["val_resize_size"] == 256 and info["val_crop_size"] == 224


def test_two_process_evaluation_equals_one_process(trained, tmp_path):
    from conftest import make_class_folders
    data = make_class_folders(tmp_path / "uneven", train_per_class=1, val_per_class=7)  # 21 images: 11 + 10
    # two unreadable files, read by different ranks: left out, not scored as a neighbour, named by both runs
    open(os.path.join(data, "val", "n00000001", "n00000001_zz_empty.JPEG"), "wb").close()
    with open(os.path.join(data, "val", "n00000002", "n00000002_zz_cut.JPEG"), "wb") as f:
        f.write(open(os.path.join(data, "val", "n00000002", "n00000002_0.JPEG"), "rb").read()[:300])
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run_eval(trained / "ckpt/best.pth", "--data-path", data, "--workers", "0", "-b", "4", "--json", one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(REPO, "evaluate.py"), str(trained / "ckpt/best.pth"), "--data-path", data,
           "--workers", "0", "-b", "4", "--device", "cpu", "--json", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.load(open(one)), json.load(open(two))
    assert a["images"] == b["images"] == 21 and b["processes"] == 2
    assert a["skipped_images"] == b["skipped_images"] == 2
    assert sorted(map(os.path.basename, b["skipped_files"])) == ["n00000001_zz_empty.JPEG", "n00000002_zz_cut.JPEG"]
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_report_files_and_predictions(trained, tiny_data, tmp_path):
    out = {k: tmp_path / k for k in ("m.json", "c.csv", "cm.png")}
    run_eval(trained / "ckpt/best.pth", "--data-path", tiny_data, "--workers", "0", "--json", out["m.json"],
             "--per-class", out["c.csv"], "--confusion", out["cm.png"], "--log-dir", tmp_path / "tb")
    metrics = json.load(open(out["m.json"]))
    for key in ("top1", "top5", "loss", "images", "classes", "images_per_sec", "batch_latency_ms", "weights"):
        assert key in metrics, key
    rows = list(csv.DictReader(open(out["c.csv"])))
    assert len(rows) == metrics["classes"] == 3
    assert sum(int(r["images"]) for r in rows) == metrics["images"]
    assert 100 * sum(int(r["correct"]) for r in rows) / metrics["images"] == pytest.approx(metrics["top1"])
    picture = Image.open(out["cm.png"])
    assert picture.size[0] >= 300 and picture.size[1] >= 200
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "eval/confusion" in events.Tags()["images"] and "eval/top1" in events.Tags()["scalars"]
    logged = events.Images("eval/confusion")[0]
    assert (logged.width, logged.height) == picture.size  # the PNG written by --confusion

    image = os.path.join(tiny_data, "val", "n00000003", "n00000003_0.JPEG")
    proc = run_script("evaluate.py", trained / "ckpt/best.pth", "--predict", image, tmp_path / "missing.jpg")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index(image + ":")
    top = [line.split() for line in lines[at + 1:at + 4]]
    assert len(top) == 3 and top[0][1] in ("n00000001", "n00000002", "n00000003")
    assert sum(float(p.rstrip("%")) for p, _ in top) == pytest.approx(100, abs=0.1)
    assert "missing.jpg: cannot read image" in proc.stdout


def test_refuses_the_2021_checkpoint_and_conflicting_flags(trained, tmp_path, capsys):
    original = {"model_state_dict": {"bottleneck_0_0.conv.weight": torch.zeros(1)},
                "optimizer_state_dict": {}, "epoch": 203, "loss": 1.0}
    torch.save(original, tmp_path / "original.pth")
    for argv, message in (([tmp_path / "original.pth"], "not the paper's MobileNetV3"),
                          ([trained / "ckpt/best.pth", "--arch", "large"], "--arch large conflicts"),
                          ([trained / "ckpt/best.pth", "--width-mult", "1.0"], "--width-mult 1.0 conflicts"),
                          ([trained / "ckpt/best.pth", "--json", tmp_path / "no" / "m.json"], "cannot write"),
                          ([trained / "ckpt/best.pth", "--log-dir", tmp_path / "original.pth" / "runs"],
                           "cannot write TensorBoard logs"),
                          ([trained / "ckpt/best.pth", "--predict", tmp_path / "a.jpg", "--confusion", tmp_path / "c.png",
                            "--log-dir", tmp_path / "runs"], "--confusion, --log-dir write a validation run's results"),
                          ([trained / "ckpt/best.pth", "--val-resize-size", "-5"], "--val-resize-size must be at least 1"),
                          ([trained / "ckpt/best.pth", "--val-crop-size", "0"], "--val-crop-size must be at least 1"),
                          ([trained / "ckpt/best.pth", "--val-crop-size", "64", "--val-resize-size", "32"],
                           "--val-resize-size 32 is smaller than the crop 64")):
        code = utils.run_cli(evaluate.main, evaluate.get_args_parser().parse_args([str(a) for a in argv]))
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def checkpoint_with_more_outputs(trained, tmp_path, num_outputs=8):
    """best.pth rebuilt with num_outputs outputs (as if trained with --num-classes 8): 3 named, 5 unnamed."""
    import model as model_lib
    ckpt = torch.load(trained / "ckpt/best.pth", weights_only=True)
    ckpt["model_config"] = dict(ckpt["model_config"], num_classes=num_outputs)
    torch.manual_seed(0)
    ckpt["model"] = model_lib.build_model(**ckpt["model_config"]).state_dict()
    ckpt["ema_model"], ckpt["best_weights"] = None, "raw"
    torch.save(ckpt, tmp_path / "wide.pth")
    return tmp_path / "wide.pth"


def test_predict_names_the_outputs_beyond_the_checkpoints_classes(trained, tiny_data, tmp_path, capsys):
    wide = checkpoint_with_more_outputs(trained, tmp_path)
    run_eval(wide, "--predict", os.path.join(tiny_data, "val", "n00000001", "n00000001_0.JPEG"))
    assert "<output " in capsys.readouterr().out  # 5 of the 8 outputs are unnamed: 2 or more are in a top-5


def test_predict_turns_a_phone_photo_upright_and_lists_unreadable_files(trained, tiny_data, tmp_path, capsys):
    # a photo stored sideways with an EXIF tag, and the same pixels already turned upright (PNG: lossless)
    sideways, upright = tmp_path / "phone.jpg", tmp_path / "upright.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show
    Image.open(os.path.join(tiny_data, "val", "n00000001", "n00000001_0.JPEG")).crop((0, 0, 40, 24)).save(
        sideways, exif=exif, quality=95)
    Image.open(sideways).transpose(Image.Transpose.ROTATE_270).save(upright)
    (tmp_path / "empty.jpg").write_bytes(b"")
    run_eval(trained / "ckpt/best.pth", "--predict", sideways, upright, tmp_path / "empty.jpg")
    lines = capsys.readouterr().out.splitlines()
    at = [lines.index(f"{path}:") for path in (sideways, upright)]
    assert lines[at[0] + 1:at[0] + 4] == lines[at[1] + 1:at[1] + 4]  # the same top-3 and probabilities
    run_eval(trained / "ckpt/best.pth", "--predict", sideways, upright, tmp_path / "empty.jpg",
             "--json", tmp_path / "p.json")
    out = capsys.readouterr().out
    predictions = json.load(open(tmp_path / "p.json"))
    assert predictions["predictions"][str(sideways)] == predictions["predictions"][str(upright)]
    assert predictions["images"] == 2 and predictions["skipped_images"] == 1
    assert predictions["skipped_files"] == [str(tmp_path / "empty.jpg")]
    assert "empty.jpg: cannot read image: empty file (0 bytes)" in out and "BytesIO" not in out


def test_predict_with_only_unreadable_files_is_an_error(trained, tmp_path, capsys):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    code = utils.run_cli(evaluate.main, evaluate.get_args_parser().parse_args(
        [str(trained / "ckpt/best.pth"), "--predict", str(tmp_path / "empty.jpg"), str(tmp_path / "text.jpg")]))
    captured = capsys.readouterr()
    assert code == 2 and "error: none of the 2 files given to --predict could be read" in captured.err
    assert "BytesIO" not in captured.out + captured.err and "text.jpg: cannot read image: not an image" in captured.out


def test_a_class_name_that_is_not_utf8_is_written_everywhere(trained, tiny_data, tmp_path):
    odd = os.fsdecode(b"caf\xe9")  # a Latin-1 folder name on a UTF-8 system
    ckpt = torch.load(trained / "ckpt/best.pth", weights_only=True)
    ckpt["classes"][2] = ckpt["class_names"][2] = odd
    torch.save(ckpt, tmp_path / "odd.pth")
    shutil.copytree(os.path.join(tiny_data, "val", "n00000001"), tmp_path / "data" / "val" / "n00000001")
    shutil.copytree(os.path.join(tiny_data, "val", "n00000003"), os.path.join(tmp_path / "data" / "val", odd))
    files = [tmp_path / "m.json", tmp_path / "c.csv", tmp_path / "cm.png"]
    proc = run_script("evaluate.py", tmp_path / "odd.pth", "--data-path", tmp_path / "data", "--workers", "0",
                      "--json", files[0], "--per-class", files[1], "--confusion", files[2],
                      "--log-dir", tmp_path / "tb")
    assert proc.returncode == 0, proc.stderr
    assert "caf\\xe9" in proc.stdout  # in the worst classes line
    assert {row["class"] for row in csv.DictReader(open(files[1], encoding="utf-8"))} == {"n00000001", "caf\\xe9"}
    assert json.load(open(files[0]))["classes"] == 2
    for path in files + [tmp_path / "tb"]:
        assert "wrote " in proc.stdout and str(path) in proc.stdout, path
    assert "top-5 trivial (3 outputs)" in proc.stdout and "2 classes" in proc.stdout


def test_confusion_summary_reads_back_a_known_prediction_set():
    # 5 outputs: class 3 only ever predicted, class 4 neither a label nor a prediction (left out)
    truth = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    predicted = torch.tensor([0, 0, 0, 3, 1, 0, 0, 2, 2, 2, 2, 1])
    confusion = torch.bincount(truth * 5 + predicted, minlength=25).view(5, 5)
    summary = evaluate.summarise_confusion(confusion)
    assert summary.classes == [0, 1, 2, 3]
    assert summary.counts.tolist() == [[3, 0, 0, 1],   # rows: true class, columns: predicted class
                                       [2, 1, 0, 0],
                                       [0, 1, 4, 0],
                                       [0, 0, 0, 0]]
    assert summary.shares[0].tolist() == [0.75, 0, 0, 0.25] and summary.shares[3].tolist() == [0, 0, 0, 0]
    assert summary.shares[1] == pytest.approx([2 / 3, 1 / 3, 0, 0])
    # most images first, then the larger share of the row; the diagonal is never a pair
    assert summary.pairs == [(1, 0, 2, pytest.approx(2 / 3)), (0, 3, 1, 0.25), (2, 1, 1, 0.2)]
    assert evaluate.summarise_confusion(confusion, pairs=1).pairs == [(1, 0, 2, pytest.approx(2 / 3))]
    lines = evaluate.confusion_pair_list(summary, ["cat", "dog", "fox", "owl", "yak"]).splitlines()
    assert lines[1:] == ["dog -> cat: 2 (67%)", "cat -> owl: 1 (25%)", "fox -> dog: 1 (20%)"]
    right = torch.diag(torch.tensor([3, 0, 2]))
    assert evaluate.confusion_pair_list(evaluate.summarise_confusion(right), ["a", "b", "c"]).endswith(
        "none: every image got its own class")


@pytest.mark.parametrize("num_classes", [10, 100, 1000])
def test_confusion_png_is_written_from_10_to_1000_classes(tmp_path, num_classes):
    truth = torch.arange(num_classes).repeat_interleave(4)
    predicted = truth.clone()
    predicted[truth == 7] = 2  # class 7 always taken for class 2: the top confused pair
    confusion = torch.bincount(truth * num_classes + predicted, minlength=num_classes ** 2).view(num_classes, -1)
    summary = evaluate.summarise_confusion(confusion)
    assert summary.classes == list(range(num_classes)) and summary.pairs == [(7, 2, 4, 1.0)]
    assert summary.counts.trace() == 4 * (num_classes - 1) and summary.counts[7, 2] == 4
    names = [f"class {i} $" + "long name " * (i % 3) for i in range(num_classes)]  # "$" is text, not TeX
    evaluate.draw_confusion(confusion, names, tmp_path / "cm.png")
    with Image.open(tmp_path / "cm.png") as picture:
        assert picture.format == "PNG" and 600 <= max(picture.size) <= 2200  # one screen, whatever the class count
        colours = {tuple(row) for row in np.asarray(picture.convert("RGB")).reshape(-1, 3)}
    assert len(colours) > 50  # cells, text and the colour scale, not a blank page


def test_imports_neither_export_nor_matplotlib():
    # one import direction (export.py imports evaluate.py's ONNX runner), and matplotlib only when a picture is drawn
    code = "import sys, evaluate; print(sorted({'export', 'matplotlib'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_a_validation_split_of_only_unreadable_files_is_an_error(trained, tmp_path, capsys):
    (tmp_path / "val" / "n00000001").mkdir(parents=True)
    (tmp_path / "val" / "n00000001" / "a.JPEG").write_bytes(b"")
    code = utils.run_cli(evaluate.main, evaluate.get_args_parser().parse_args(
        [str(trained / "ckpt/best.pth"), "--data-path", str(tmp_path), "--workers", "0"]))
    err = capsys.readouterr().err
    assert code == 2 and "error: the only validation image in" in err and "could not be read" in err
    assert "Traceback" not in err


def test_predict_names_the_class_of_images_whose_class_is_known(trained, tiny_data, tmp_path):
    """The trained model separates the tiny data's colours: --predict's top-1 name is the folder's class for the
    images validation scored right (best_top1 of 18), and the probabilities are its softmax, most likely first."""
    images = sorted(os.path.join(tiny_data, "val", c, f) for c in os.listdir(os.path.join(tiny_data, "val"))
                    for f in os.listdir(os.path.join(tiny_data, "val", c)))
    run_eval(trained / "ckpt/best.pth", "--predict", *images, "--json", tmp_path / "p.json")
    predictions = json.load(open(tmp_path / "p.json"))["predictions"]
    assert sorted(predictions) == images
    right = [path for path in images if predictions[path][0][0] == os.path.basename(os.path.dirname(path))]
    best = torch.load(trained / "ckpt/best.pth", weights_only=True)
    assert 100 * len(right) / len(images) == pytest.approx(best["best_top1"]) and len(right) >= 12, right
    for top in predictions.values():
        assert sorted(name for name, _ in top) == ["n00000001", "n00000002", "n00000003"]
        probabilities = [p for _, p in top]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1)


@pytest.mark.parametrize("num_classes", [3, 400])  # the matrix as an image, and as one square per cell
def test_the_confusion_picture_shows_each_share_in_its_row_and_column(tmp_path, monkeypatch, num_classes):
    """The drawn matrix has rows for true classes and columns for predicted ones: each cell's colour is its share
    of the row on the colour scale, off-diagonal cells included, and cells without images are left white."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure
    a, b, c = (0, 1, 2) if num_classes == 3 else (10, 11, 12)  # of 400, cells away from the axes' frame
    truth = torch.arange(num_classes).repeat_interleave(4)
    predicted = truth.clone()
    predicted[truth == a] = c                      # class a always taken for class c
    predicted[(truth == b).nonzero()[:2]] = a      # class b half right, half taken for class a
    confusion = torch.bincount(truth * num_classes + predicted, minlength=num_classes ** 2).view(num_classes, -1)
    cells = {(a, c): 1.0, (b, b): 0.5, (b, a): 0.5, (c, c): 1.0,     # (true, predicted): share of the row
             (a, a): 0, (c, a): 0, (a, b): 0, (c, b): 0, (b, c): 0}  # the transposed cells and the other empty ones
    drawn, real_savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), real_savefig(self, *a, **k))[1])
    evaluate.draw_confusion(confusion, [f"c{i}" for i in range(num_classes)], tmp_path / "cm.png")
    figure = drawn[0]
    figure.set_dpi(evaluate.CONFUSION_DPI)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)
    axes = figure.axes[0]
    colour_of = matplotlib.colormaps["magma_r"]
    scale = PowerNorm(0.5, vmin=0, vmax=1)
    inside = 0.3 if num_classes <= 30 else 0  # away from the count written in the middle of a cell
    for (true, guess), share in cells.items():
        x, y = axes.transData.transform((guess + inside, true + inside))
        seen = pixels[len(pixels) - 1 - int(round(y)), int(round(x))]
        expected = np.array(colour_of(scale(share))[:3]) * 255 if share else np.array([255, 255, 255])
        assert np.abs(seen - expected).max() <= 8, ((true, guess), share, seen, expected)
