"""Export a checkpoint for deployment (ONNX fp32 or int8, or torch.export's pt2), then prove that the file scores
what the checkpoint scores; or average several checkpoints' weights into one file.

    python export.py checkpoints/latest/best.pth                                     # -> best.onnx beside it
    python export.py checkpoints/latest/best.pth --int8 --calib-data /data/imagenet  # -> best.int8.onnx
    python export.py checkpoints/latest/best.pth --format pt2                        # -> best.pt2
    python export.py checkpoints/latest/epoch_*.pth --format average                 # -> averaged_weights.pth

Inside: the metadata written into each file, real images for calibration and the check, the writers, main.
evaluate.py runs the .onnx files (OnnxModel); README "Deploying" and docs/deploying.md say what was measured.
"""
import argparse
import contextlib
import inspect
import io
import json
import os
import sys
import tempfile
import warnings

import numpy as np
import torch

import checkpoint
import dataset
import evaluate
import layouts
import utils
from evaluate import EXPORT_FORMAT, OnnxModel, onnx_session
from utils import CheckpointError, UserError

MIN_OPSET = 14  # HardSwish became an ONNX operator in opset 14; HardSigmoid is older
MAX_OPSET = 20  # the TorchScript exporter's newest (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
DEFAULT_OPSET = 17  # has native HardSwish and HardSigmoid; read by TensorRT 8.6+, OpenVINO and ORT Mobile
FP32_TOLERANCE = 1e-4  # max |logit difference| between onnxruntime fp32 and PyTorch, relative to the logit scale


def get_args_parser():
    parser = argparse.ArgumentParser(description="Export a MobileNetV3 checkpoint to ONNX (fp32 or int8) or pt2.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", nargs="+", help="a checkpoint of train.py (several with --format average)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "pt2", "average"],
                        help="onnx (onnxruntime, TensorRT, OpenVINO), pt2 (torch.export, the entry to ExecuTorch), "
                             "or average: the mean of several checkpoints' weights as one best_weights-style file")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="default: beside the checkpoint, as NAME.onnx, NAME.int8.onnx or NAME.pt2")
    parser.add_argument("--weights", default=None, choices=["ema", "raw"],
                        help="default: the ones marked best (with --format average: raw)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET}")
    parser.add_argument("--img-size", type=int, default=None, help="input height and width (default: the "
                                                                   "checkpoint's validation crop)")
    parser.add_argument("--batch-size", default="dynamic", type=batch_size_type, metavar="N|dynamic",
                        help="a fixed batch size, or dynamic")
    parser.add_argument("--int8", action="store_true", help="static int8 quantization (needs --calib-data)")
    parser.add_argument("--calib-data", default=None, metavar="DIR",
                        help="dataset root (its train/ images) or a folder of images, for calibration and the check")
    parser.add_argument("--calib-images", type=int, default=300, help="calibration images for --int8")
    parser.add_argument("--check-images", type=int, default=64, help="real images the exported file is checked on")
    return parser


def batch_size_type(text):
    if text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'dynamic', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------- metadata: what a consumer needs

def make_metadata(info, img_size, batch_size, precision, source, calibration=None):
    """Everything a program needs to run the file, as {key: JSON string} (ONNX metadata values are strings)."""
    mean, std = dataset.NORMS[info["norm"]]
    resize = info["val_resize_size"]
    metadata = {
        "format": EXPORT_FORMAT,
        "classes": info["classes"],
        "class_names": info["class_names"],
        "input": {"name": "images", "shape": [batch_size or "batch", 3, img_size, img_size], "dtype": "float32",
                  "layout": "NCHW", "channels": "RGB"},
        "output": {"name": "logits", "shape": [batch_size or "batch", len(info["classes"])], "dtype": "float32"},
        "preprocessing": (f"decode to RGB; resize the shorter side to {resize} px (bilinear, antialiased); centre "
                          f"crop {info['val_crop_size']}x{info['val_crop_size']}; scale to [0, 1]; "
                          f"subtract mean, divide by std (per channel, RGB)"),
        "mean": list(mean),
        "std": list(std),
        "norm": info["norm"],
        "val_resize_size": resize,
        "val_crop_size": info["val_crop_size"],
        "img_size": img_size,
        "precision": precision,
        "weights": info["weights"],
        "epoch": info["epoch"],
        "data_path": info["data_path"],
        "val_split": list(info.get("val_split", (0, 0))),  # (fraction, seed) of train.py --val-split-fraction
        "val_split_sha256": evaluate.split_fingerprint(info.get("val_split_files")),  # its held-out files
        "config": info["config"],
        "source_checkpoint": os.path.abspath(source),
        "calibration": calibration,
        "exported_with": {"torch": torch.__version__},
    }
    return {key: json.dumps(value) for key, value in metadata.items()}


# ---------------------------------------------------------------- real images: calibration and the check

def image_index(folder, split="train"):
    """A FileIndex of a dataset's train (or val) images, or of the images in a plain folder."""
    try:
        splits = layouts.find_dataset(folder)
        index = splits.val if split == "val" and splits.val is not None and len(splits.val) else splits.train
    except utils.DataError:
        if not os.path.isdir(folder) or os.path.isdir(os.path.join(folder, "train")):
            raise
        files = layouts.list_images(folder)  # a plain folder of images (no train/): labels unknown, unused here
        index = layouts.FileIndex(folder, files, [0] * len(files))
    if len(index) == 0:
        raise UserError(f"no images in {folder}")
    return index


def load_images(index, count, resize, crop, norm):
    """`count` images spread over the whole index (it is sorted by class), as evaluate.py feeds them: the
    validation resize and centre crop, then normalize_batch. A float (count, 3, crop, crop) tensor."""
    picks = np.unique(np.linspace(0, len(index) - 1, min(count, len(index))).round().astype(int))
    subset = layouts.FileIndex(index.root, index.paths[picks], index.labels[picks])
    images = dataset.ImageFiles(subset, dataset.val_transform(resize, crop))
    batch = torch.stack([images[i][0] for i in range(len(images))])
    mean, std = dataset.NORMS[norm]
    return dataset.normalize_batch(batch, mean, std)


def in_batches(images, batch_size, fill_last=False):
    """Batches of batch_size (of 32 when None). The last one is filled up with the first images for a file with a
    fixed batch size, or with fill_last (the percentile calibrator stacks its batches: they must be equal)."""
    size = batch_size or 32
    batches = [images[i:i + size] for i in range(0, len(images), size)]
    if len(batches[-1]) < size and (batch_size or (fill_last and len(batches) > 1)):
        batches[-1] = torch.cat([batches[-1], images.repeat(-(-size // len(images)), 1, 1, 1)])[:size]
    return batches


@torch.no_grad()
def compare_with_pytorch(net, run, images, batch_size):
    """(max |logit difference|, top-1 agreement in %, logit scale) of run(batch) against net on the images."""
    ours, theirs = [], []
    for batch in in_batches(images, batch_size):
        ours.append(net(batch))
        theirs.append(run(batch))
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    difference = (ours - theirs).abs().max().item()
    agreement = 100 * (ours.argmax(1) == theirs.argmax(1)).float().mean().item()
    return difference, agreement, ours.abs().max().item()


# ---------------------------------------------------------------- writing the files

def export_onnx_graph(net, path, opset, img_size, batch_size):
    """The fp32 graph, by the TorchScript exporter: dynamo's writes opset 18 only and ReduceMean where this one
    writes GlobalAveragePool, which int8 runtimes quantize (docs/deploying.md)."""
    example = torch.zeros(batch_size or 2, 3, img_size, img_size)
    dynamic = None if batch_size else {"images": {0: "batch"}, "logits": {0: "batch"}}
    # torch < 2.5 has only this exporter and no `dynamo` argument; 2.9 and later default to dynamo
    choice = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notice that dynamo is the new default
        torch.onnx.export(net, (example,), path, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes=dynamic, do_constant_folding=True, **choice)


def quantize_onnx(fp32_path, int8_path, batches, folder):
    """Static int8 by onnxruntime, as measured best in docs/deploying.md: QDQ nodes, per-channel weights, symmetric
    int8 activations ranged at the 99.999th percentile of the calibration batches (MinMax where a tensor has one
    value throughout, as in an untrained network). Weights get 7 bits (reduce_range): on CPUs without VNNI the
    8-bit kernels saturate. quant_pre_process folds BatchNorm into the convolutions and infers shapes."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter([{"images": batch.numpy()} for batch in batches])

        def get_next(self):
            return next(self.remaining, None)

    prepared = os.path.join(folder, "prepared.onnx")
    quant_pre_process(fp32_path, prepared)
    methods = {"99.999th percentile": CalibrationMethod.Percentile, "MinMax": CalibrationMethod.MinMax}
    for name, method in methods.items():
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines say nothing a user acts on
                quantize_static(prepared, int8_path, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                                weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                                calibrate_method=method, reduce_range=True,
                                extra_options={"ActivationSymmetric": True, "CalibPercentile": 99.999})
            return name
        except ValueError as e:
            # a tensor with one value on every calibration image (an untrained network) has no histogram
            if "bins" not in str(e) or method == CalibrationMethod.MinMax:
                raise
            print(f"note: percentile calibration failed ({e}); using MinMax ranges")


def write_onnx(net, path, metadata, opset, img_size, batch_size, calibration_images=None):
    """Export net (fp32, or int8 calibrated on the given normalized images) to path, with the metadata."""
    import onnx
    with tempfile.TemporaryDirectory(prefix="mobilenetv3-export-") as work:
        graph_path = os.path.join(work, "fp32.onnx")
        export_onnx_graph(net, graph_path, opset, img_size, batch_size)
        if calibration_images is not None:
            int8_path = os.path.join(work, "int8.onnx")
            method = quantize_onnx(graph_path, int8_path, in_batches(calibration_images, batch_size, fill_last=True),
                                   work)
            metadata = {**metadata, "calibration_method": json.dumps(method)}
            graph_path = int8_path
        model = onnx.load(graph_path)
        onnx.helper.set_model_props(model, metadata)
        model.doc_string = "MobileNetV3 written by export.py: classes and preprocessing in metadata_props"
        onnx.save(model, path)


def write_pt2(net, path, metadata, img_size, batch_size):
    """torch.export's ExportedProgram with the same metadata as a JSON file inside the archive."""
    example = torch.zeros(batch_size or 2, 3, img_size, img_size)
    dynamic = None if batch_size else {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    program = torch.export.export(net, (example,), dynamic_shapes=dynamic)
    torch.export.save(program, path, extra_files={"metadata.json": json.dumps(
        {key: json.loads(value) for key, value in metadata.items()})})


def temp_file_beside(path):
    """A temp file in the target folder, so that os.replace is an atomic rename."""
    # ends with the target's name: torch.export.save wants a .pt2 suffix
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                                    suffix="-" + os.path.basename(path))
    os.close(fd)
    os.chmod(tmp_path, 0o666 & ~checkpoint.current_umask())  # mkstemp's 0600 suits a checkpoint, not a file to deploy
    return tmp_path


def default_output(source, file_format, int8):
    stem = os.path.splitext(source)[0]
    return stem + (".pt2" if file_format == "pt2" else ".int8.onnx" if int8 else ".onnx")


def check_args(args):
    """Every flag problem before any work (and an unwritable output before an export that takes seconds)."""
    if args.opset < MIN_OPSET:
        raise UserError(f"--opset {args.opset} is too old: HardSwish, which MobileNetV3 uses throughout, is an ONNX "
                        f"operator from opset {MIN_OPSET} on (use --opset {MIN_OPSET} or later)")
    if args.opset > MAX_OPSET:
        raise UserError(f"--opset {args.opset} is newer than torch's TorchScript ONNX exporter writes "
                        f"(opsets {MIN_OPSET}-{MAX_OPSET})")
    if args.int8 and args.format != "onnx":
        raise UserError("--int8 writes ONNX; drop --format pt2")
    if args.int8 and not args.calib_data:
        raise UserError("--int8 needs --calib-data DIR: training images to calibrate the activation ranges on")
    for flag in ("calib_images", "check_images", "img_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    if args.calib_data and not os.path.isdir(args.calib_data):
        raise UserError(f"--calib-data {args.calib_data} is not a folder")
    if str(args.checkpoint).lower().endswith(".onnx"):
        raise UserError(f"{args.checkpoint} is already an ONNX file; export.py takes a checkpoint of train.py")
    utils.check_writable(args.output)


def average_checkpoints(paths, weights=None):
    """The element-wise mean of several checkpoints' weights (train.py --keep-checkpoints keeps them per epoch),
    as a weights file that evaluate.py, export.py and train.py --pretrained read. The BatchNorm running statistics
    are averaged like the weights, not recomputed on data (torchvision's averaging of its MobileNetV3 V1 weights
    did the same); integer buffers (BN's batch counters) come from the last file."""
    files = [checkpoint.load_checkpoint(path) for path in paths]
    for path, ckpt in zip(paths, files):
        if ckpt.get("format") not in (checkpoint.CHECKPOINT_FORMAT, checkpoint.WEIGHTS_FORMAT):
            raise CheckpointError(f"{path} is not a checkpoint or weights file of this project")
        if ckpt["model_config"] != files[0]["model_config"]:
            raise CheckpointError(f"{path} holds another model ({ckpt['model_config']}) than {paths[0]}")
    states = []
    for path, ckpt in zip(paths, files):
        if ckpt["format"] == checkpoint.WEIGHTS_FORMAT:  # one set of weights: the kind asked for, never a mix
            if ckpt["weights"] != (weights or "raw"):
                raise CheckpointError(f"{path} holds {ckpt['weights']} weights, not {weights or 'raw'} ones: "
                                      f"average files of one kind (--weights {ckpt['weights']})")
            states.append(ckpt["model"])
        elif (weights or "raw") == "ema" and ckpt.get("ema_model") is None:
            raise CheckpointError(f"{path} holds no EMA weights")
        else:
            states.append(ckpt["ema_model"] if weights == "ema" else ckpt["model"])
    average = {key: (sum(state[key].double() for state in states) / len(states)).to(last.dtype)
               if last.is_floating_point() else last.clone() for key, last in states[-1].items()}
    keep = ("model_config", "classes", "class_names", "norm", "val_resize_size", "val_crop_size", "data_path")
    return {"format": checkpoint.WEIGHTS_FORMAT, "weights": f"average of {len(paths)}", "model": average,
            "best_top1": -1.0, "epoch": files[-1].get("epoch"), "averaged": [os.path.abspath(p) for p in paths],
            **{key: files[-1].get(key) for key in keep}, "args": files[-1].get("args", {})}


def write_average(args):
    """--format average: the mean of the checkpoints' weights, as one weights file."""
    output = args.output or os.path.join(os.path.dirname(args.checkpoint[-1]), "averaged_weights.pth")
    if len(args.checkpoint) < 2:
        raise UserError("--format average needs two checkpoints or more")
    for path in args.checkpoint:  # named before the output folder: a mistyped path is the likelier mistake
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint not found: {path}")
    utils.check_writable(output)  # before reading the checkpoints, which can take a while
    checkpoint.save_checkpoint(average_checkpoints(args.checkpoint, args.weights), output)
    print(f"wrote {output}: the mean of {len(args.checkpoint)} checkpoints' {args.weights or 'raw'} weights "
          f"(BatchNorm statistics averaged too)\nscore it: python evaluate.py {output} --data-path DIR")
    return 0


def resolve_settings(args):
    """A new namespace: args with its one checkpoint and the output path filled in. args itself stays as parsed."""
    source = args.checkpoint[0]
    return argparse.Namespace(**{
        **vars(args),
        "checkpoint": source,
        "output": args.output or default_output(source, args.format, args.int8),
    })


def load_checkpoint_to_export(path, weights):
    """The fp32 model of a checkpoint of train.py and its info (see evaluate.load_model_for_eval)."""
    net, info = evaluate.load_model_for_eval(path, weights)
    if info["classes"] is None:
        raise CheckpointError(f"{path} is a torchvision state dict, which holds no class list; export "
                              "a checkpoint of train.py (e.g. after train.py --pretrained)")
    return net.float().eval(), info


def with_input_size(info, img_size=None):
    """info with the file's input size as its crop: --img-size, else the checkpoint's validation crop."""
    crop = info["val_crop_size"] or 224
    resize = info["val_resize_size"] or round(crop / 0.875)
    img_size = img_size or crop
    if img_size != crop:  # another input size: the same resize/crop ratio at that size, so evaluate.py feeds it
        resize = round(resize * img_size / crop)
        print(f"note: the checkpoint was validated at crop {crop}; the file takes {img_size} px "
              f"(resize {resize}, crop {img_size})")
    return {**info, "val_crop_size": img_size, "val_resize_size": resize}


def calibration_images(settings, info):
    """(images, how they were chosen for the metadata) to calibrate --int8 on; (None, None) without --int8."""
    if not settings.int8:
        return None, None
    index = image_index(settings.calib_data, "train")
    images = load_images(index, settings.calib_images, info["val_resize_size"], info["val_crop_size"], info["norm"])
    note = (f"{len(images)} training images of {os.path.abspath(settings.calib_data)}; QDQ, "
            "per-channel int8 weights, symmetric int8 activations")
    print(f"calibrating on {len(images)} training images of {settings.calib_data}")
    return images, note


def real_images_to_check(settings, info):
    """Real images for the check, or None: from --calib-data, else from the data the checkpoint was trained on."""
    source = settings.calib_data or info["data_path"]
    if not source or not os.path.isdir(source):
        return None
    # validation images when there are some: the calibration never saw them
    return load_images(image_index(source, "val"), settings.check_images, info["val_resize_size"],
                       info["val_crop_size"], info["norm"])


def write_checked(net, settings, metadata, img_size, calibration, check_images, precision):
    """Write the file beside --output, check it against PyTorch, then rename it to --output: a file that does not
    match is never left there."""
    tmp_path = None
    try:
        try:
            tmp_path = temp_file_beside(settings.output)  # checked there, then renamed: never a half-written file
            if settings.format == "pt2":
                write_pt2(net, tmp_path, metadata, img_size, settings.batch_size)
            else:
                write_onnx(net, tmp_path, metadata, settings.opset, img_size, settings.batch_size, calibration)
        except OSError as e:
            raise UserError(f"cannot write {settings.output}: {e.strerror or e}") from None
        if check_images is None:
            print("check skipped: no real images (pass --calib-data DIR to check the file against PyTorch)")
        else:
            check(net, tmp_path, settings, check_images, precision)
        os.replace(tmp_path, settings.output)
        tmp_path = None
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)


def main(args):
    if args.format == "average":
        return write_average(args)
    if len(args.checkpoint) > 1:
        raise UserError(f"{len(args.checkpoint)} checkpoints given: one to export (several only with --format average)")
    settings = resolve_settings(args)
    check_args(settings)
    net, info = load_checkpoint_to_export(settings.checkpoint, settings.weights)
    info = with_input_size(info, settings.img_size)
    img_size, resize, config = info["val_crop_size"], info["val_resize_size"], info["config"]
    print(f"model: MobileNetV3-{config['arch'].capitalize()} {config['width_mult']:g}, {config['num_classes']} "
          f"classes, {info['weights']} weights, epoch {info['epoch']} | input {settings.batch_size or 'N'}x3x{img_size}"
          f"x{img_size}, resize {resize}, crop {img_size}, norm {info['norm']}")

    calibration, calibration_note = calibration_images(settings, info)
    check_images = real_images_to_check(settings, info)
    precision = "int8" if settings.int8 else "fp32"
    metadata = make_metadata(info, img_size, settings.batch_size, precision, settings.checkpoint, calibration_note)
    write_checked(net, settings, metadata, img_size, calibration, check_images, precision)
    size_mb = os.path.getsize(settings.output) / 2**20
    print(f"wrote {settings.output} ({size_mb:.2f} MB, {precision}"
          + (f", opset {settings.opset}" if settings.format == "onnx" else ", torch.export program") + ")")
    if settings.format == "onnx":
        print(f"score it: python evaluate.py {settings.output} --data-path DIR")
    return 0


def check(net, path, args, images, precision):
    """The written file against PyTorch on real images; an fp32 file that disagrees is an error (and not kept)."""
    if args.format == "pt2":
        program = torch.export.load(path).module()
        run = lambda batch: program(batch)  # noqa: E731
        runtime = "torch.export program"
    else:
        run = OnnxModel(onnx_session(path))
        runtime = "onnxruntime"
    difference, agreement, scale = compare_with_pytorch(net, run, images, args.batch_size)
    print(f"check on {len(images)} real images: {runtime} {precision} vs PyTorch fp32: max |logit difference| "
          f"{difference:.2e} (logits up to {scale:.1f}), top-1 agreement {agreement:.1f}%")
    if precision == "fp32" and difference > FP32_TOLERANCE * max(1.0, scale):
        raise UserError(f"the exported file disagrees with PyTorch (max |logit difference| {difference:.2e}); "
                        f"nothing was written to {args.output}")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, get_args_parser().parse_args()))
