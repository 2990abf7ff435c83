"""Evaluate a checkpoint: top-1/top-5, loss, per-class accuracy, confusion matrix, and predictions for images.

    python evaluate.py checkpoints/best.pth                       # the demo validation split
    python evaluate.py checkpoints/best.pth --data-path /data/imagenet --json metrics.json --per-class classes.csv
    python evaluate.py checkpoints/best.pth --confusion confusion.png --log-dir runs/eval
    python evaluate.py checkpoints/best.pth --predict cat.jpg dog.jpg
    python evaluate.py mobilenet_v3_large-8738ca79.pth --data-path /data/imagenet   # a torchvision state dict
    torchrun --nproc_per_node=4 evaluate.py checkpoints/best.pth --data-path /data/imagenet  # same numbers, faster

The model is rebuilt from the checkpoint alone; classes are matched by name, so a validation folder holding a
subset of the classes, or ordered differently, is scored correctly.
"""
import argparse
import csv
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import dataset
import model as model_lib
import utils
from utils import CheckpointError, UserError


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
    """Loss, top-1, top-5 over the whole loader, summed over ranks so each image counts exactly once.

    With num_classes, also the confusion matrix (rows: true class, columns: predicted class).
    """
    model.eval()
    mean, std = dataset.NORMS[norm]
    totals = torch.zeros(4, dtype=utils.sum_dtype(device), device=device)  # loss sum, top-1 hits, top-5 hits, images
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if num_classes else None
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not show_progress, dynamic_ncols=True):
        images = dataset.normalize_batch(images.to(device, non_blocking=True), mean, std, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        totals[0] += criterion(logits, targets)
        totals[1:3] += utils.correct_topk(logits, targets, (1, 5)).to(totals.dtype)
        totals[3] += targets.numel()
        if confusion is not None:
            pred = logits.argmax(dim=1)
            confusion += torch.bincount(targets * num_classes + pred, minlength=num_classes ** 2).view_as(confusion)
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
    """Rebuild the model from a checkpoint alone. Returns (model, info) with classes, names and settings."""
    if str(path).lower().endswith(".onnx"):  # an exported model, run by onnxruntime (export.py)
        import export
        return export.load_onnx_for_eval(path)
    ckpt = utils.load_checkpoint(path)
    if utils.is_original_checkpoint(ckpt):
        raise CheckpointError(f"{path} was saved by ipcvl2021-mobilenetv3-torch-v2, whose network is not the paper's "
                              "MobileNetV3 (different blocks and layer names); it cannot be loaded into this model")
    if model_lib.is_torchvision_state_dict(ckpt):
        return _load_torchvision(path, ckpt, arch, width_mult, num_classes)
    if ckpt.get("format") != utils.CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is neither a checkpoint of this project nor a torchvision mobilenet_v3 state dict")
    config = ckpt["model_config"]
    for flag, key, value in (("--arch", "arch", arch), ("--width-mult", "width_mult", width_mult),
                             ("--num-classes", "num_classes", num_classes)):
        if value is not None and value != config[key]:
            raise CheckpointError(f"{flag} {value} conflicts with the checkpoint, which holds {key}={config[key]!r}")
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
            "data_path": args.get("data_path"), "epoch": ckpt.get("epoch"), "config": config}
    return net, info


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
            "epoch": None,
            "config": model_lib.model_config(net)}
    return net, info


def classes_for_torchvision(data_path, num_outputs):
    """A torchvision state dict carries no class list: its outputs follow the sorted class folders of ImageNet."""
    splits = dataset.find_dataset(data_path)
    if len(splits.classes) != num_outputs:
        raise UserError(f"a torchvision state dict needs the full {num_outputs}-class dataset to name its outputs "
                        f"(found {len(splits.classes)} classes under {data_path})")
    return splits.classes, splits.class_names


def per_class_rows(confusion, classes, class_names):
    """(class, name, images, correct, accuracy %) for every class that has validation images."""
    totals = confusion.sum(dim=1)
    correct = confusion.diagonal()
    rows = []
    for i in torch.nonzero(totals).flatten().tolist():
        rows.append((classes[i], class_names[i], int(totals[i]), int(correct[i]), 100.0 * int(correct[i]) / int(totals[i])))
    return rows


def draw_confusion(confusion, class_names, path, max_size=1000):
    """Row-normalised confusion matrix as a PNG with Pillow (dark = many). Names are drawn when they fit."""
    from PIL import Image, ImageDraw
    present = torch.nonzero(confusion.sum(dim=1) + confusion.sum(dim=0)).flatten()
    matrix = confusion[present][:, present].double()
    matrix = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(present)
    cell = max(1, min(40, max_size // max(n, 1)))
    margin = 160 if n <= 40 else 0
    pixels = (255 * (1 - matrix)).round().to(torch.uint8)
    grid = pixels.repeat_interleave(cell, 0).repeat_interleave(cell, 1).numpy()
    image = Image.new("L", (margin + grid.shape[1], margin + grid.shape[0]), 255)
    image.paste(Image.fromarray(grid, mode="L"), (margin, margin))
    if margin:
        draw = ImageDraw.Draw(image)
        for j, i in enumerate(present.tolist()):
            name = str(class_names[i])[:24]
            draw.text((2, margin + j * cell + cell // 2 - 5), name, fill=0)
            draw.text((margin + j * cell + 2, margin - 12 - (j % 8) * 18), name[:12], fill=0)
    image.convert("RGB").save(path)
    return image


@torch.no_grad()
def predict(net, paths, crop, resize, norm, device, class_names, topk=5):
    """Top-k (name, probability) for each image file, with the validation transform."""
    transform = dataset.val_transform(resize, crop)
    mean, std = dataset.NORMS[norm]
    net.eval()
    results = []
    for path in paths:
        try:
            image = transform(dataset.decode_image_file(path))
        except Exception as e:  # an unreadable image is reported, the others still get predictions
            results.append((path, None, f"cannot read image ({type(e).__name__}: {e})"))
            continue
        logits = net(dataset.normalize_batch(image[None].to(device), mean, std)).float()
        probs = F.softmax(logits, dim=1)[0]
        top = probs.topk(min(topk, probs.numel()))
        results.append((path, [(class_names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())], None))
    return results


def main(args):
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise UserError("--batch-size must be at least 1 and --workers 0 or more")
    for path in (args.json, args.per_class, args.confusion):  # fail now, not after a long evaluation
        if path and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            raise UserError(f"cannot write {path}: its folder does not exist or is not writable")
    rank, world_size, device = utils.setup_distributed(args.device)
    if args.workers is None:
        args.workers = utils.default_workers(device)
    say = print if rank == 0 else (lambda *a, **k: None)
    net, info = load_model_for_eval(args.checkpoint, args.weights, args.arch, args.width_mult, args.num_classes)
    data_path = args.data_path or info["data_path"]
    if info["classes"] is None:  # torchvision state dict
        if data_path is None:
            raise UserError("a torchvision state dict holds no class list: pass --data-path (the ImageNet root)")
        info["classes"], info["class_names"] = classes_for_torchvision(data_path, info["config"]["num_classes"])
    net.to(device).eval()
    norm = args.norm or info["norm"]
    crop = args.val_crop_size or info["val_crop_size"] or 224
    resize = args.val_resize_size or info["val_resize_size"] or round(crop / 0.875)
    use_amp = info["amp"] if args.amp is None else args.amp
    if args.amp is None and device.type == "cpu" and not utils.cpu_has_native_bf16():
        use_amp = False  # emulated bf16 is ~10x slower here, as train.py decides too
    amp_dtype = args.amp_dtype or info["amp_dtype"]
    autocast, _, precision = utils.precision_for(device, use_amp, amp_dtype)
    config = info["config"]
    say(f"model: MobileNetV3-{config['arch'].capitalize()} {config['width_mult']:g}, {config['num_classes']} classes, "
        f"{info['weights']} weights | device {device} x{world_size} | {precision} | "
        f"resize {resize}, crop {crop}, norm {norm}")

    if args.predict:
        if rank == 0:
            for path, top, error in predict(net, args.predict, crop, resize, norm, device, info["class_names"]):
                print(path + ":" + (f" {error}" if error else ""))
                for name, prob in top or []:
                    print(f"  {prob:7.2%}  {name}")
        return 0

    if data_path is None:
        raise UserError("no --data-path given and the checkpoint does not say where its data was")
    if not os.path.isdir(data_path):
        raise UserError(f"--data-path {data_path} is not a folder")
    index, layout = dataset.find_val_split(data_path, info["classes"])
    val_set = dataset.ImageFiles(index, dataset.val_transform(resize, crop))
    sampler = dataset.EpochSampler(len(val_set), shuffle=False, num_replicas=world_size, rank=rank)
    loader = dataset.build_loader(val_set, sampler, args.batch_size, args.workers, train=False,
                                  pin_memory=device.type == "cuda", worker_nice=utils.worker_nice(device))
    num_classes = config["num_classes"]  # the model's outputs: may be more than the named classes
    names = list(info["class_names"]) + [f"<output {i}>" for i in range(len(info["class_names"]), num_classes)]
    classes = list(info["classes"]) + names[len(info["classes"]):]
    say(f"data: {data_path} ({layout}), {len(val_set)} images")
    start = time.perf_counter()
    result = evaluate(net, loader, device, autocast, norm, num_classes=num_classes, show_progress=rank == 0)
    elapsed = time.perf_counter() - start
    skipped = int(utils.all_reduce_sum(torch.tensor([val_set.skipped]))[0])  # every rank's unreadable files
    if rank != 0:
        return 0

    confusion = result.pop("confusion")
    rows = per_class_rows(confusion, classes, names)
    batches = -(-len(val_set) // (args.batch_size * world_size))
    result.update({"classes": len(rows), "images_per_sec": result["images"] / elapsed,
                   "batch_latency_ms": 1000 * elapsed / max(batches, 1), "weights": info["weights"],
                   "checkpoint": args.checkpoint, "data_path": data_path, "resize": resize, "crop": crop,
                   "norm": norm, "amp": bool(use_amp), "processes": world_size, "skipped_images": skipped})
    print(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
          f"({result['images']} images, {result['classes']} classes, {result['images_per_sec']:.0f} img/s, "
          f"{result['batch_latency_ms']:.1f} ms/batch)")
    worst = sorted(rows, key=lambda r: (r[4], r[0]))[:10]
    print("worst classes: " + ", ".join(f"{name} {acc:.1f}%" for _, name, _, _, acc in worst))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.per_class:
        with open(args.per_class, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "name", "images", "correct", "top1"])
            writer.writerows((c, n, t, k, f"{a:.4f}") for c, n, t, k, a in rows)
    picture = None
    if args.confusion:
        picture = draw_confusion(confusion, names, args.confusion)
    if args.log_dir:
        from torch.utils.tensorboard import SummaryWriter
        import numpy as np
        with SummaryWriter(args.log_dir) as writer:
            for key in ("top1", "top5", "loss", "images_per_sec"):
                writer.add_scalar(f"eval/{key}", result[key], 0)
            if picture is None:
                picture = draw_confusion(confusion, names, os.path.join(args.log_dir, "confusion.png"))
            writer.add_image("eval/confusion", np.asarray(picture.convert("RGB")), 0, dataformats="HWC")
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, get_args_parser().parse_args()))
