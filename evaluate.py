"""Score a checkpoint, a torchvision state dict or an .onnx file of export.py: top-1/top-5, loss, per-class
accuracy and a confusion matrix on a validation split, or the top-5 classes of single images.

    python evaluate.py checkpoints/latest/best.pth                       # the split it was validated on
    python evaluate.py checkpoints/latest/best.pth --data-path /data/imagenet --json m.json --per-class c.csv
    python evaluate.py checkpoints/latest/best.onnx --confusion confusion.png --log-dir runs/eval
    python evaluate.py checkpoints/latest/best.pth --predict cat.jpg dog.jpg
    torchrun --nproc_per_node=4 evaluate.py checkpoints/latest/best.pth --data-path /data/imagenet  # same numbers

Inside: evaluate() (train.py validates with it), load_model_for_eval, the onnxruntime runner export.py checks its
files with, the confusion summary and its picture, --predict, and main. README "Evaluating" has the rest.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: sleeping, not spinning, OpenMP threads

import argparse
import csv
import hashlib
import json
import sys
import time
import typing

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import dataset
import decode
import layouts
import model as model_lib
import utils
from utils import CheckpointError, UserError

EXPORT_FORMAT = "mobilenetv3-torch-onnx/1"  # metadata "format" of export.py's files: tells them from other ONNX models


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate a MobileNetV3 checkpoint.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint of train.py, or a torchvision mobilenet_v3 state-dict file")
    parser.add_argument("--data-path", default=None, help="dataset root or validation folder (default: the one in the checkpoint)")
    parser.add_argument("--weights", default=None, choices=["ema", "raw"], help="default: the ones marked best in the checkpoint")
    parser.add_argument("--arch", default=None, choices=model_lib.ARCHS, help="must match the checkpoint if given")
    parser.add_argument("--width-mult", type=float, default=None, help="must match the checkpoint if given")
    parser.add_argument("--num-classes", type=int, default=None, help="must match the checkpoint if given")
    parser.add_argument("--val-resize-size", type=int, default=None, help="default: as in training (crop/0.875)")
    parser.add_argument("--val-crop-size", type=int, default=None, help="default: as in training")
    parser.add_argument("--norm", default=None, choices=sorted(dataset.NORMS), help="default: as in training")
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("-j", "--workers", type=int, default=None, help="data loader processes (default: CPU cores, at most 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: as in training)")
    parser.add_argument("--amp-dtype", default=None, choices=["auto", "float16", "bfloat16"],
                        help="default: as in training")
    parser.add_argument("--json", default=None, metavar="FILE", help="write all metrics as JSON")
    parser.add_argument("--per-class", default=None, metavar="FILE", help="write per-class accuracy as CSV")
    parser.add_argument("--confusion", default=None, metavar="FILE.png", help="draw the confusion matrix")
    parser.add_argument("--log-dir", default=None, help="add metrics and the confusion matrix to TensorBoard here")
    parser.add_argument("--predict", nargs="+", default=None, metavar="IMG", help="print top-5 classes for these images")
    return parser


@torch.no_grad()
def evaluate(model, loader, device, autocast, norm, channels_last=False, num_classes=None, desc="val",
             show_progress=True):
    """Loss, top-1, top-5 over the whole loader, summed over ranks so each image counts exactly once; with
    num_classes, also the confusion matrix (rows: true class, columns: predicted class)."""
    model.eval()
    mean, std = dataset.NORMS[norm]
    totals = torch.zeros(4, dtype=utils.sum_dtype(device), device=device)  # loss sum, top-1 hits, top-5 hits, images
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if num_classes else None
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not show_progress, dynamic_ncols=True):
        if targets.numel() == 0:  # every file of the batch was unreadable (dataset.ValidationImageFiles)
            continue
        images = dataset.normalize_batch(images.to(device, non_blocking=True), mean, std, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        totals[0] += criterion(logits, targets)
        totals[1:3] += utils.correct_topk(logits, targets, (1, 5)).to(totals.dtype)
        totals[3] += targets.numel()
        if confusion is not None:
            cells = targets * num_classes + logits.argmax(dim=1)
            confusion += torch.bincount(cells, minlength=num_classes ** 2).view_as(confusion)
    utils.all_reduce_sum(totals)
    if confusion is not None:
        utils.all_reduce_sum(confusion)
    loss_sum, top1, top5, count = totals.tolist()
    count = max(count, 1)
    result = {"loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "images": int(totals[3])}
    if confusion is not None:
        result["confusion"] = confusion.cpu()
    return result


def load_model_for_eval(path, weights=None, arch=None, width_mult=None, num_classes=None):
    """(model, info) from the file alone: a checkpoint or weights file of train.py, a torchvision state dict, or an
    .onnx file of export.py; info holds the classes, their names and the validation settings."""
    if str(path).lower().endswith(".onnx"):  # an exported model, run by onnxruntime (export.py)
        net, info = load_onnx_for_eval(path)
        check_model_flags(info["config"], arch, width_mult, num_classes)
        check_weights_held(path, info["weights"], weights)
        return net, info
    ckpt = checkpoint.load_checkpoint(path)
    if checkpoint.is_original_checkpoint(ckpt):
        raise CheckpointError(f"{path} was saved by ipcvl2021-mobilenetv3-torch-v2, whose network is not the paper's "
                              "MobileNetV3 (different blocks and layer names); it cannot be loaded into this model")
    if model_lib.is_torchvision_state_dict(ckpt):
        return _load_torchvision(path, ckpt, arch, width_mult, num_classes)
    if ckpt.get("format") not in (checkpoint.CHECKPOINT_FORMAT, checkpoint.WEIGHTS_FORMAT):
        raise CheckpointError(f"{path} is neither a checkpoint of this project nor a torchvision mobilenet_v3 state dict")
    config = ckpt["model_config"]
    check_model_flags(config, arch, width_mult, num_classes)
    if ckpt["format"] == checkpoint.WEIGHTS_FORMAT:  # best_weights.pth holds one set of weights, the best
        check_weights_held(path, ckpt["weights"], weights)
        weights, state = ckpt["weights"], ckpt["model"]
    else:
        weights = weights or ckpt.get("best_weights") or ("ema" if ckpt.get("ema_model") else "raw")
        state = ckpt["ema_model"] if weights == "ema" else ckpt["model"]
    if state is None:
        raise CheckpointError(f"{path} holds no EMA weights (trained with --ema-decay 0); use --weights raw")
    net = model_lib.build_model(**config)
    net.load_state_dict(state)
    args = ckpt.get("args", {})
    info = {"classes": list(ckpt["classes"]), "class_names": list(ckpt["class_names"]), "weights": weights,
            "norm": ckpt.get("norm", "imagenet"), "val_resize_size": ckpt.get("val_resize_size"),
            "val_crop_size": ckpt.get("val_crop_size"), "amp": args.get("amp", False),
            "amp_dtype": args.get("amp_dtype", "auto"),
            "data_path": ckpt.get("data_path") or args.get("data_path"), "epoch": ckpt.get("epoch"), "config": config,
            "val_split": (args.get("val_split_fraction") or 0, args.get("seed", 0)),
            "val_split_files": ckpt.get("val_split_files"),
            "val_split_sha256": split_fingerprint(ckpt.get("val_split_files"))}
    return net, info


# ---------------------------------------------------------------- ONNX files of export.py, run like a model

def read_metadata(path, props):
    """The metadata of one of our files back as Python values; CheckpointError when it is not one."""
    if json.loads(props.get("format", "null")) != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is an ONNX model but not one written by export.py (no {EXPORT_FORMAT} "
                              "metadata: classes and preprocessing unknown)")
    try:
        return {key: json.loads(value) for key, value in props.items()}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has unreadable metadata ({e})") from None


def onnx_session(path, threads=None):
    """An onnxruntime CPU session; threads default to torch's (the tests and benchmark set them)."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only: its warnings about unused initializers say nothing to a user
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """An ONNX file as a module: forward(normalized float NCHW batch) -> float logits, by onnxruntime on the CPU.
    A file exported with a fixed batch size gets its batches in chunks of that size, the last one padded."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        batch = session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None

    def forward(self, images):
        array = images.detach().float().cpu().contiguous().numpy()  # channels_last arrives as a strided view
        if self.fixed_batch is None:
            return torch.from_numpy(self.session.run(None, {self.input_name: array})[0]).to(images.device)
        chunks = []
        for start in range(0, len(array), self.fixed_batch):
            chunk = array[start:start + self.fixed_batch]
            padded = np.pad(chunk, [(0, self.fixed_batch - len(chunk)), (0, 0), (0, 0), (0, 0)])
            chunks.append(self.session.run(None, {self.input_name: padded})[0][:len(chunk)])
        return torch.from_numpy(np.concatenate(chunks)).to(images.device)


def load_onnx_for_eval(path):
    """An ONNX file of export.py as (module, info), info as load_model_for_eval gives for a checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"ONNX file not found: {path}")
    try:
        session = onnx_session(path)
    except Exception as e:  # onnxruntime's errors have no common base class beyond Exception
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable ONNX model ({reason})") from None
    meta = read_metadata(path, session.get_modelmeta().custom_metadata_map)
    keys = ("classes", "class_names", "weights", "norm", "val_resize_size", "val_crop_size", "data_path", "epoch",
            "config")
    info = {**{key: meta[key] for key in keys}, "amp": False, "amp_dtype": "auto",
            "val_split": tuple(meta.get("val_split", (0, 0))), "val_split_files": None,  # redrawn, then checked
            "val_split_sha256": meta.get("val_split_sha256")}
    return OnnxModel(session), info


def check_model_flags(config, arch, width_mult, num_classes):
    """--arch, --width-mult and --num-classes, where given, must be what the file holds."""
    for flag, key, value in (("--arch", "arch", arch), ("--width-mult", "width_mult", width_mult),
                             ("--num-classes", "num_classes", num_classes)):
        if value is not None and value != config[key]:
            raise CheckpointError(f"{flag} {value} conflicts with the checkpoint, which holds {key}={config[key]!r}")


def check_weights_held(path, held, weights):
    """A file with one set of weights (best_weights.pth, an .onnx) can't give the other: --weights must match."""
    if weights not in (None, held):
        raise CheckpointError(f"{path} holds only the {held} weights; drop --weights {weights}")


def _load_torchvision(path, state, arch, width_mult, num_classes):
    arch = arch or model_lib.guess_torchvision_arch(state)
    if arch is None:
        raise CheckpointError(f"cannot tell whether {path} is mobilenet_v3_large or _small; pass --arch")
    if width_mult not in (None, 1.0):
        raise CheckpointError("torchvision's mobilenet_v3 state dicts are width 1.0; drop --width-mult")
    classes_in_file = state["classifier.3.weight"].shape[0]
    if num_classes not in (None, classes_in_file):
        raise CheckpointError(f"--num-classes {num_classes} conflicts with the state dict's {classes_in_file} outputs")
    net = model_lib.build_model(arch, 1.0, classes_in_file)
    try:
        model_lib.load_torchvision_state_dict(net, state)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    # torchvision's output i is the i-th class in sorted folder order; the classes come from the data folder.
    info = {"classes": None, "class_names": None, "weights": "torchvision state dict", "norm": "imagenet",
            "val_resize_size": 256, "val_crop_size": 224, "amp": False, "amp_dtype": "auto", "data_path": None,
            "epoch": None, "config": net.config.as_dict()}
    return net, info


def classes_for_torchvision(data_path, num_outputs):
    """A torchvision state dict carries no class list: its outputs follow the sorted class folders of ImageNet."""
    if data_path is None:
        raise UserError("a torchvision state dict holds no class list: pass --data-path (the ImageNet root)")
    splits = layouts.find_dataset(data_path)
    if len(splits.classes) != num_outputs:
        raise UserError(f"a torchvision state dict needs the full {num_outputs}-class dataset to name its outputs "
                        f"(found {utils.plural(len(splits.classes), 'class')} under {data_path})")
    return splits.classes, splits.class_names


def printable(name):
    """A name the filesystem gave us, safe to print and to write as UTF-8: bytes that are not UTF-8 (kept by
    os.fsdecode as lone surrogates, which a UTF-8 writer refuses) are written as \\xNN."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def output_names(info, num_outputs):
    """(classes, names) for every output of the model: the checkpoint's, then "<output i>" for outputs beyond
    them (a model trained with --num-classes above the data's class count)."""
    names = list(info["class_names"]) + [f"<output {i}>" for i in range(len(info["class_names"]), num_outputs)]
    classes = list(info["classes"]) + names[len(info["classes"]):]
    return [printable(c) for c in classes], [printable(n) for n in names]


def per_class_rows(confusion, classes, class_names):
    """(class, name, images, correct, accuracy %) for every class that has validation images."""
    totals, correct = confusion.sum(dim=1).tolist(), confusion.diagonal().tolist()
    return [(classes[i], class_names[i], totals[i], correct[i], 100.0 * correct[i] / totals[i])
            for i in range(len(totals)) if totals[i]]


class ConfusionSummary(typing.NamedTuple):
    """What the confusion picture shows, over the classes that appear as a label or as a prediction."""
    classes: list  # their output indices, in order
    counts: np.ndarray  # images: rows are true classes, columns predicted classes
    shares: np.ndarray  # each row's counts over its images
    pairs: list  # (true class, predicted class, images, share of the row): the most confused first


def summarise_confusion(confusion, pairs=25):
    """The confusion matrix without the classes that appear nowhere, row-normalised, and its most confused
    (true, predicted) pairs: most images first, then the largest share of the row."""
    classes = torch.nonzero(confusion.sum(dim=1) + confusion.sum(dim=0)).flatten().tolist()
    counts = confusion[classes][:, classes].numpy().astype(np.int64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    off_diagonal = zip(*np.nonzero(counts - np.diag(np.diag(counts))))
    worst = sorted(off_diagonal, key=lambda cell: (-counts[cell], -shares[cell], cell))[:pairs]
    return ConfusionSummary(classes, counts, shares,
                            [(classes[r], classes[c], int(counts[r, c]), float(shares[r, c])) for r, c in worst])


CONFUSION_DPI = 140
SHARE_TICKS = (0, 0.01, 0.05, 0.2, 0.5, 1)


def draw_confusion(confusion, class_names, path, pairs=25):
    """The confusion matrix as a PNG, readable from 2 to 1,000 classes (examples: docs/images/confusion_*.png).

    Each cell is its share of the true class's images (rows: true, columns: predicted), on a square-root colour
    scale so that rare confusions stay visible. Class names label the axes up to 100 classes (else every k-th
    class index), counts are written in the cells up to 30 classes, the most confused pairs are listed beside."""
    import matplotlib
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no display needed
    from matplotlib.ticker import PercentFormatter

    summary = summarise_confusion(confusion, pairs)
    n = len(summary.classes)
    side = min(max(0.4 * n, 4.0), 8.5)  # the matrix, in inches
    cell_points, cell_pixels = side * 72 / n, side * CONFUSION_DPI / n
    with matplotlib.rc_context({"text.parse_math": False}):  # a "$" in a class name is text, not TeX
        figure = Figure(figsize=(side, side))
        axes = figure.add_axes((0, 0, 1, 1))
        colours = {"cmap": "magma_r", "norm": PowerNorm(0.5, vmin=0, vmax=1)}
        if cell_pixels >= 3:
            scale = axes.imshow(np.ma.masked_equal(summary.shares, 0), interpolation="nearest", **colours)
        else:  # each cell with images as a 3-pixel square, darkest on top: a lone confusion stays visible
            rows, columns = np.nonzero(summary.counts)
            order = np.argsort(summary.shares[rows, columns], kind="stable")
            rows, columns = rows[order], columns[order]
            scale = axes.scatter(columns, rows, c=summary.shares[rows, columns], marker="s", linewidths=0,
                                 s=(3 * 72 / CONFUSION_DPI) ** 2, **colours)
            axes.set(xlim=(-0.5, n - 0.5), ylim=(n - 0.5, -0.5), aspect="equal")
        label_confusion_axes(axes, summary.classes, [short_name(class_names[i]) for i in summary.classes],
                             cell_points, cell_pixels)
        if n <= 30:
            for r, c in zip(*np.nonzero(summary.counts)):
                axes.text(c, r, str(summary.counts[r, c]), ha="center", va="center",
                          fontsize=min(9, cell_points / 2.5), color="white" if summary.shares[r, c] > 0.3 else "black")
        bar = figure.add_axes((1 + 0.15 / side, 1 - min(1, 4 / side), 0.2 / side, min(1, 4 / side)))
        figure.colorbar(scale, cax=bar, ticks=SHARE_TICKS, format=PercentFormatter(1, decimals=None))
        bar.set_ylabel("share of the row")
        figure.text(1 + 1.2 / side, 1, confusion_pair_list(summary, class_names), va="top", fontsize=8)
        figure.savefig(path, format="png", dpi=CONFUSION_DPI, bbox_inches="tight", pad_inches=0.2,
                       facecolor="white", pil_kwargs={"optimize": True})


def label_confusion_axes(axes, classes, names, cell_points, cell_pixels):
    """Title, axis titles, and a name per row and column, or, for many classes, the class index every k-th."""
    n = len(classes)
    axes.set_title(f"confusion matrix: {utils.plural(n, 'class')}, each row normalised to its true class's "
                   "images", loc="left", fontsize=10)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if n <= 100:
        size = min(10, max(cell_points * 0.85, 4))
        axes.set_xticks(range(n), names, rotation=90, fontsize=size)
        axes.set_yticks(range(n), names, fontsize=size)
        if cell_pixels >= 6:  # a thin grid, so neighbouring cells of one colour stay apart
            axes.set_xticks(np.arange(n + 1) - 0.5, minor=True)
            axes.set_yticks(np.arange(n + 1) - 0.5, minor=True)
            axes.grid(which="minor", color="#e4e4e4", linewidth=72 / CONFUSION_DPI, antialiased=False)  # 1 px
            axes.tick_params(which="minor", length=0)
    else:  # a round step giving at most about 10 ticks
        step = next(k for k in (2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 10**9) if n / k <= 10)
        ticks = range(0, n, step)
        axes.set_xticks(ticks, [str(classes[k]) for k in ticks], fontsize=8)
        axes.set_yticks(ticks, [str(classes[k]) for k in ticks], fontsize=8)
        axes.set_xlabel("predicted class (class indices in sorted class order, as in the per-class CSV)")


def short_name(name, limit=28):
    name = printable(name)
    return name if len(name) <= limit else name[:limit - 1] + "~"


def confusion_pair_list(summary, class_names):
    lines = [f"{short_name(class_names[t])} -> {short_name(class_names[p])}: {count} ({100 * share:.0f}%)"
             for t, p, count, share in summary.pairs]
    return "\n".join(["most confused (true -> predicted):"] + (lines or ["none: every image got its own class"]))


@torch.no_grad()
def predict(net, paths, crop, resize, norm, device, class_names, topk=5):
    """Top-k (name, probability) for each image file, with the validation transform, after turning the image
    upright by its EXIF orientation (a phone photo is stored sideways with a tag that says so).

    Returns (path, top-k or None, reason it could not be read or None) for each path."""
    transform = dataset.val_transform(resize, crop)
    mean, std = dataset.NORMS[norm]
    net.eval()
    results = []
    for path in paths:
        try:
            image = transform(decode.decode_image_file(path, exif_orientation=True))
        except decode.DECODE_ERRORS as error:  # reported; the other files still get predictions
            reason = error.strerror if isinstance(error, OSError) and error.strerror else decode.bad_file_reason(error)
            results.append((path, None, f"cannot read image: {reason}"))
            continue
        logits = net(dataset.normalize_batch(image[None].to(device), mean, std)).float()
        probs = F.softmax(logits, dim=1)[0]
        top = probs.topk(min(topk, probs.numel()))
        results.append((path, [(class_names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())], None))
    return results


def write_predictions(results, json_path):
    """Print each file's top-5 (or why it could not be read); with json_path, write them there too."""
    unreadable = [printable(path) for path, top, _ in results if top is None]
    for path, top, error in results:
        print(printable(path) + ":" + (f" {error}" if error else ""))
        for name, probability in top or []:
            print(f"  {probability:7.2%}  {name}")
    if unreadable:
        print(f"{utils.plural(len(unreadable), 'unreadable image')} not scored: {', '.join(unreadable)}")
    if json_path:
        scored = {printable(path): [[name, probability] for name, probability in top]
                  for path, top, _ in results if top is not None}
        with open(json_path, "w") as f:
            json.dump({"predictions": scored, "images": len(scored), "skipped_images": len(unreadable),
                       "skipped_files": unreadable}, f, indent=2)
        print(f"wrote {json_path}")
    if len(unreadable) == len(results):
        which = "the file" if len(results) == 1 else f"none of the {len(results)} files"
        raise UserError(f"{which} given to --predict could {'not ' if len(results) == 1 else ''}be read as an image")


def held_out_split(data_path, info):
    """(index, layout) of the training images held out by train.py --val-split-fraction, when the checkpoint was
    trained that way on data_path's training split; else None."""
    fraction, seed = info.get("val_split", (0, 0))
    if not fraction:
        return None
    splits = layouts.find_dataset(data_path)
    if splits.val is not None or list(splits.classes) != list(info["classes"]):
        return None  # a real validation split, or other data: scored as usual
    files = info.get("val_split_files")  # the run's own, whatever was added to the folder since
    if files is not None:
        _, index = layouts.hold_out(splits.train, files)
    else:  # an .onnx file records only their fingerprint: drawn again, and checked against it
        _, index = layouts.split_validation(splits.train, fraction, seed)
        recorded = info.get("val_split_sha256")
        if recorded and split_fingerprint([os.fsdecode(path) for path in index.paths]) != recorded:
            raise UserError(f"{data_path} changed since training: the images drawn for validation are not the ones "
                            "the run held out; evaluate its checkpoint instead, which records them")
    return index, f"the {fraction:g} of each training class held out by --val-split-fraction (seed {seed})"


def split_fingerprint(files):
    """sha256 of a held-out file list (None for None): what an .onnx file records of its run's split."""
    return None if files is None else hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()


def check_args(args):
    """Flag problems before any work: an unwritable output fails now, not after a long evaluation."""
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise UserError("--batch-size must be at least 1 and --workers 0 or more")
    for flag, size in (("--val-resize-size", args.val_resize_size), ("--val-crop-size", args.val_crop_size)):
        if size is not None and size < 1:
            raise UserError(f"{flag} must be at least 1 pixel (got {size})")
    if args.predict:
        unused = [flag for flag, value in (("--per-class", args.per_class), ("--confusion", args.confusion),
                                           ("--log-dir", args.log_dir)) if value]
        if unused:
            raise UserError(f"{', '.join(unused)} write a validation run's results; --predict only scores the "
                            "images given (--json takes its results)")
    for path in (args.json, args.per_class, args.confusion):
        if path:
            utils.check_writable(path)
    if args.log_dir:
        utils.prepare_log_dir(args.log_dir)  # made now: an impossible --log-dir fails before the evaluation
    if args.confusion or args.log_dir:
        try:
            import matplotlib  # noqa: F401  the confusion picture needs it: say so before the evaluation
        except ImportError:
            raise UserError("--confusion and --log-dir draw the confusion matrix with matplotlib: pip install "
                            "matplotlib (it is in requirements.txt)") from None


def resolve_settings(args, info, device):
    """A new namespace: args with the defaults that come from the checkpoint and the device filled in, as --help
    says. args itself stays as parsed."""
    crop = args.val_crop_size or info["val_crop_size"] or 224
    resize = args.val_resize_size or info["val_resize_size"] or round(crop / 0.875)
    if resize < crop:
        raise UserError(f"--val-resize-size {resize} is smaller than the crop {crop}: the crop would be padded with "
                        "black; resize to at least the crop")
    amp = info["amp"] if args.amp is None else args.amp
    if args.amp is None and device.type == "cpu":
        amp = False  # CPU bf16 autocast measured slower than fp32, as train.py decides too
    return argparse.Namespace(**{
        **vars(args),
        "workers": utils.default_workers(device) if args.workers is None else args.workers,
        "data_path": args.data_path or info["data_path"],
        "norm": args.norm or info["norm"],
        "val_crop_size": crop,
        "val_resize_size": resize,
        "amp": amp,
        "amp_dtype": args.amp_dtype or info["amp_dtype"],
    })


def build_val_loader(settings, info, device, world_size, rank):
    """(images, loader, layout) of the validation images, this rank's share of them in the loader."""
    data_path = settings.data_path
    if data_path is None:
        raise UserError("no --data-path given and the checkpoint does not say where its data was")
    if not os.path.isdir(data_path):
        raise UserError(f"--data-path {data_path} is not a folder")
    index, layout = held_out_split(data_path, info) or layouts.find_val_split(data_path, info["classes"])
    val_set = dataset.ValidationImageFiles(index, dataset.val_transform(settings.val_resize_size,
                                                                        settings.val_crop_size))
    sampler = dataset.EpochSampler(len(val_set), shuffle=False, num_replicas=world_size, rank=rank)
    loader = dataset.build_loader(val_set, sampler, settings.batch_size, settings.workers, train=False,
                                  pin_memory=device.type == "cuda")
    return val_set, loader, layout


def skipped_files_of_all_ranks(val_set, images_scored, data_path):
    """The unreadable files of every rank (each read its own share); an error when not one image could be read."""
    # through gather_objects: no device tensors
    skipped_files = [printable(path) for files in utils.gather_objects(val_set.unreadable_files()) for path in files]
    if images_scored == 0:  # the same on every rank (summed over them)
        which = "the only validation image" if len(val_set) == 1 else f"none of the {len(val_set)} validation images"
        raise UserError(f"{which} in {printable(data_path)} could {'not ' if len(val_set) == 1 else ''}be read "
                        f"(the first: {skipped_files[0] if skipped_files else '?'})")
    return skipped_files


def metrics_of_run(result, rows, elapsed, num_images, skipped_files, settings, info, world_size):
    """evaluate()'s metrics, then the speed, the settings and the files left out: all that --json writes."""
    batches = -(-num_images // (settings.batch_size * world_size))
    return {**result, "classes": len(rows), "images_per_sec": result["images"] / elapsed,
            "batch_latency_ms": 1000 * elapsed / max(batches, 1), "weights": info["weights"],
            "checkpoint": printable(settings.checkpoint), "data_path": printable(settings.data_path),
            "resize": settings.val_resize_size, "crop": settings.val_crop_size, "norm": settings.norm,
            "amp": bool(settings.amp), "processes": world_size,
            "skipped_images": len(skipped_files), "skipped_files": skipped_files}


def print_summary(metrics, rows, num_classes):
    # with 5 outputs or fewer every label is in the top 5: 100% says nothing
    top5 = f"top-5 {metrics['top5']:.2f}%" if num_classes > 5 else f"top-5 trivial ({utils.plural(num_classes, 'output')})"
    print(f"top-1 {metrics['top1']:.2f}%  {top5}  loss {metrics['loss']:.4f}  "
          f"({utils.plural(metrics['images'], 'image')}, {utils.plural(metrics['classes'], 'class')}, "
          f"{metrics['images_per_sec']:.0f} img/s, {metrics['batch_latency_ms']:.1f} ms/batch)")
    skipped_files = metrics["skipped_files"]
    if skipped_files:
        shown = ", ".join(skipped_files[:5]) + (f" and {len(skipped_files) - 5} more" if len(skipped_files) > 5 else "")
        print(f"left out {utils.plural(len(skipped_files), 'unreadable image')} (not scored): {shown}")
    worst = sorted(rows, key=lambda r: (r[4], r[0]))[:10]
    print("worst classes: " + ", ".join(f"{name} {acc:.1f}%" for _, name, _, _, acc in worst))


def write_per_class_csv(rows, path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "name", "images", "correct", "top1"])
        writer.writerows((c, n, t, k, f"{a:.4f}") for c, n, t, k, a in rows)


def write_outputs(settings, metrics, rows, confusion, names):
    """The files asked for: --json, --per-class, --confusion, and TensorBoard events in --log-dir."""
    if settings.json:
        with open(settings.json, "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"wrote metrics to {printable(settings.json)}")
    if settings.per_class:
        write_per_class_csv(rows, settings.per_class)
        print(f"wrote per-class accuracy to {printable(settings.per_class)}")
    png = settings.confusion or (os.path.join(settings.log_dir, "confusion.png") if settings.log_dir else None)
    if png:
        draw_confusion(confusion, names, png)
        print(f"wrote the confusion matrix to {printable(png)}")
    if settings.log_dir:
        from PIL import Image
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(settings.log_dir) as writer:
            for key in ("top1", "top5", "loss", "images_per_sec"):
                writer.add_scalar(f"eval/{key}", metrics[key], 0)
            with Image.open(png) as picture:
                writer.add_image("eval/confusion", np.asarray(picture.convert("RGB")), 0, dataformats="HWC")
        print(f"wrote TensorBoard events to {printable(settings.log_dir)}")


def main(args):
    check_args(args)
    rank, world_size, device = utils.setup_distributed(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    net, info = load_model_for_eval(args.checkpoint, args.weights, args.arch, args.width_mult, args.num_classes)
    settings = resolve_settings(args, info, device)
    config = info["config"]
    if info["classes"] is None:  # torchvision state dict
        info["classes"], info["class_names"] = classes_for_torchvision(settings.data_path, config["num_classes"])
    net.to(device).eval()
    crop, resize, norm = settings.val_crop_size, settings.val_resize_size, settings.norm
    autocast, _, precision = utils.precision_for(device, settings.amp, settings.amp_dtype)
    say(f"model: MobileNetV3-{config['arch'].capitalize()} {config['width_mult']:g}, "
        f"{utils.plural(config['num_classes'], 'class')}, "
        f"{info['weights']} weights | device {device} x{world_size} | {precision} | "
        f"resize {resize}, crop {crop}, norm {norm}")

    num_classes = config["num_classes"]  # the model's outputs: may be more than the named classes
    classes, names = output_names(info, num_classes)
    if settings.predict:
        if rank == 0:
            write_predictions(predict(net, settings.predict, crop, resize, norm, device, names), settings.json)
        return 0

    val_set, loader, layout = build_val_loader(settings, info, device, world_size, rank)
    say(f"data: {printable(settings.data_path)} ({layout}), {utils.plural(len(val_set), 'image')}")
    start = time.perf_counter()
    result = evaluate(net, loader, device, autocast, norm, num_classes=num_classes, show_progress=rank == 0)
    elapsed = time.perf_counter() - start
    skipped_files = skipped_files_of_all_ranks(val_set, result["images"], settings.data_path)
    if rank != 0:
        return 0

    confusion = result.pop("confusion")
    rows = per_class_rows(confusion, classes, names)
    metrics = metrics_of_run(result, rows, elapsed, len(val_set), skipped_files, settings, info, world_size)
    print_summary(metrics, rows, num_classes)
    write_outputs(settings, metrics, rows, confusion, names)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, get_args_parser().parse_args()))
