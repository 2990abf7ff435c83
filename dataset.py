"""ImageNet data for training MobileNetV3: find the image files, decode them, augment them, batch them.

find_dataset reads four layouts (Kaggle's ILSVRC download, class folders, a flat val/ folder with a label file,
the ILSVRC2012 tar files) and caches the listing. ImageFiles, ValidationImageFiles and EncodedImageFiles (JPEGs
decoded on the training device) give uint8 images; normalize_batch makes the floats on the device. EpochSampler
and build_loader order and batch them. Training and validation see the stored pixels, never turned by EXIF.

How the layouts are read, the decoders, scaled decoding, bad files and the measurements: docs/data-pipeline.md.
Commands: python -m tools.show_data PATH (what is found there), tools.resize_copy, tools.demo_data.
"""
import atexit
import contextlib
import csv
import functools
import hashlib
import io
import multiprocessing
import os
import re
import signal
import sys
import warnings
import weakref
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from utils import UserError, ignore_stop_signals

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision has announced it will move its decoders to TorchCodec
    decode_jpeg = None
try:  # TorchCodec's JPEG decoder (libjpeg-turbo, bundled): the maintained successor of torchvision's
    from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg
except Exception:  # missing, or built for another torch version (each torchcodec release matches one torch)
    torchcodec_decode_jpeg = None

NORMS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # mean and std of the 2021 predecessor of this repository, for models trained with it
    "legacy": ((0.4547857, 0.4349471, 0.40525291), (0.12003352, 0.12323549, 0.1392444)),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_NAMES = ("val_labels.csv", "val_labels.txt", "val.csv", "val.txt", "labels.csv", "labels.txt",
                    "LOC_val_solution.csv")
ILSVRC_TARS = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar",
               "devkit": "ILSVRC2012_devkit_t12.tar.gz"}
KAGGLE_IMAGES = os.path.join("ILSVRC", "Data", "CLS-LOC")
INDEX_CACHE_VERSION = 2  # change it whenever what a cache file holds changes, so old files are not read
# What a broken image file raises: PIL (OSError, SyntaxError, EOFError, DecompressionBombError), the JPEG
# decoders (RuntimeError), odd headers (ValueError).
DECODE_ERRORS = (OSError, RuntimeError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Not the file's fault when decoding on a GPU, so never reported as a bad image (AcceleratorError: torch >= 2.8)
DEVICE_FAILURES = tuple(getattr(torch, name) for name in ("OutOfMemoryError", "AcceleratorError")
                        if hasattr(torch, name))
MAX_BAD_IN_A_ROW = 50  # then the data is broken, not a file
SKIP_COUNTER_SLOTS = 256  # one per DataLoader worker process, plus the main process


class DataError(UserError):
    """A problem with the data that the user has to fix; the message is one line."""


def warn(message, every_rank=True):
    """One 'warning: ...' line on stderr; every_rank=False: on rank 0 only (what every rank finds alike). The main
    process writes through tqdm.write, which redraws a progress bar below it; a loader worker clears the line."""
    if not every_rank and os.environ.get("RANK", "0") != "0":
        return
    if torch.utils.data.get_worker_info() is None:
        tqdm.write(f"warning: {message}", file=sys.stderr)
    else:
        clear_line = "\r\x1b[K" if sys.stderr.isatty() else ""
        print(f"{clear_line}warning: {message}", file=sys.stderr, flush=True)


def plural(count, word):
    """'1 class', '2 classes', '3 images'."""
    if count == 1:
        return f"1 {word}"
    return f"{count} {word}es" if word.endswith(("s", "x", "ch", "sh")) else f"{count} {word}s"


# ----------------------------------------------------------------------------------------------------------
# Finding the files


class FileIndex:
    """The image files of one split: paths relative to root, and their integer labels, as two numpy arrays. A
    forked loader worker reading millions of Python objects would copy their memory pages (reference counts);
    an array is one object, so its pages stay shared."""

    def __init__(self, root, paths, labels):
        self.root = str(root)
        self.paths = np.asarray(paths, dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self):
        return len(self.labels)

    def path(self, i):
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    def __repr__(self):
        return f"FileIndex({self.root!r}, {plural(len(self), 'image')})"


@dataclass
class DataSplits:
    layout: str  # what find_dataset detected, for the user
    classes: list  # class ids: the sorted training class-folder names
    class_names: list  # human-readable names, same order
    train: FileIndex
    val: FileIndex | None


def find_dataset(data_path, cache_dir=None):
    """Detect the layout of data_path (docs/data-pipeline.md, "Layouts") and index its train and val images."""
    root = existing_folder(data_path, "data folder")
    kaggle = kaggle_root(root)
    if kaggle:
        train_dir = os.path.join(kaggle, KAGGLE_IMAGES, "train")
        val_dir = os.path.join(kaggle, KAGGLE_IMAGES, "val")
        train_layout = "Kaggle ILSVRC: ILSVRC/Data/CLS-LOC/train/<synset>/"
    else:
        train_dir = os.path.join(root, "train")
        val_dir = os.path.join(root, "val")
        train_layout = "class folders: train/<class>/"
        if not os.path.isdir(train_dir) and has_ilsvrc_tars(root, "train"):
            extract_ilsvrc_tars(root, [s for s in ("train", "val") if has_ilsvrc_tars(root, s)])
            train_layout = "ILSVRC2012 tar files, extracted by torchvision into train/<synset>/"
        if not os.path.isdir(train_dir):
            raise DataError(f"no train/ folder in {root}: expected train/<class>/<image>, Kaggle's ILSVRC/ "
                            f"folder or the ILSVRC2012 tar files (layouts: docs/data-pipeline.md)")
    classes, train = class_folder_index(train_dir, cache_dir)
    if len(classes) == 1:
        warn(f"{train_dir} holds a single class ({classes[0]}): every prediction is that class, so accuracy "
             f"is 100% whatever the model learns", every_rank=False)

    val, val_layout = find_val_split(root, classes, cache_dir) if os.path.isdir(val_dir) else (None, "no val/ folder")
    synset_names = read_synset_mapping(kaggle or root)  # Kaggle's names, else torchvision's for ILSVRC-2012
    class_names = [synset_names.get(name, name) for name in classes] if synset_names else imagenet_class_names(classes)
    return DataSplits(f"{train_layout}; {val_layout}", classes, class_names, train, val)


def split_validation(index, fraction, seed=0):
    """(train, val) FileIndex of a split with no validation folder: `fraction` of each class's images held out (at
    least one, and one kept, for a class of two or more), drawn with `seed` alone, so train.py and evaluate.py
    hold out the same images."""
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(index), dtype=bool)
    for label in np.unique(index.labels):
        members = np.flatnonzero(index.labels == label)
        count = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        held_out[rng.permutation(members)[:count]] = True
    keep = lambda mask: FileIndex(index.root, index.paths[mask], index.labels[mask])  # noqa: E731
    return keep(~held_out), keep(held_out)


def find_val_split(data_path, classes, cache_dir=None):
    """(FileIndex, layout description) of the validation images under data_path (the dataset root or the
    validation folder itself, in any layout), labelled by name with the given class list."""
    root = existing_folder(data_path, "validation folder")
    kaggle = kaggle_root(root)
    if kaggle:
        val_dir = os.path.join(kaggle, KAGGLE_IMAGES, "val")
        label_dirs = [val_dir, kaggle]
    elif os.path.isdir(os.path.join(root, "val")):
        val_dir = os.path.join(root, "val")
        label_dirs = [val_dir, root]
    elif has_ilsvrc_tars(root, "val"):
        extract_ilsvrc_tars(root, ["val"])
        val_dir = os.path.join(root, "val")
        label_dirs = [val_dir]
    elif os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"no val/ folder in {root}")
    else:  # the validation folder itself
        val_dir = root
        label_dirs = [root, os.path.dirname(root)]

    visible = [entry for entry in folder_entries(val_dir) if not entry.name.startswith(".")]
    loose_images = any(is_image_name(entry.name) and entry.is_file() for entry in visible)
    label_file = find_label_file(label_dirs) if loose_images else None
    if label_file:
        index = flat_folder_index(val_dir, label_file, classes)
        return index, f"flat val/ labelled by {os.path.basename(label_file)}"
    if any(entry.is_dir() for entry in visible):
        _, index = class_folder_index(val_dir, cache_dir, classes)
        return index, "val/<class>/"
    if loose_images:
        raise DataError(f"{val_dir} holds images directly but no label file was found "
                        f"(looked for {', '.join(LABEL_FILE_NAMES)} in {' and '.join(label_dirs)})")
    raise DataError(f"no images in {val_dir}")


def existing_folder(path, what):
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise DataError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"{what} {path} is not a folder")
    if not any(not entry.name.startswith(".") for entry in folder_entries(path)):
        raise DataError(f"{what} {path} is empty")
    return path


def kaggle_root(folder):
    """The top folder of Kaggle's download if folder is it or lies inside its ILSVRC/ tree, else None."""
    folder = os.path.abspath(folder)
    candidate = folder
    for _ in range(5):
        inside = folder == candidate or (folder + os.sep).startswith(os.path.join(candidate, "ILSVRC") + os.sep)
        if inside and os.path.isdir(os.path.join(candidate, KAGGLE_IMAGES)):
            return candidate
        candidate = os.path.dirname(candidate)
    return None


def folder_entries(folder):
    try:
        return list(os.scandir(folder))
    except OSError as error:  # missing, not a folder, no permission
        raise DataError(f"cannot list folder {folder}: {error.strerror}") from None


def is_image_name(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder, prefix="", folder_times=None):
    """Paths of the image files under folder and its subfolders, relative to it, sorted. A symlinked folder is
    followed only into folder's own tree and only once, so a loop ends and `up -> ..` takes no other class's
    images (skipped with a warning). folder_times, a list, receives (path, mtime_ns) of every folder listed."""
    top = os.path.realpath(folder)
    listed = set()  # real paths of the folders listed so far
    links = []  # symlinked folders met, followed once the plain folders are all listed
    found = []

    def walk(path, real_path, prefix):
        listed.add(real_path)
        if folder_times is not None:  # taken before the listing, so that a change during it is seen next time
            folder_times.append((path, folder_mtime(path)))
        for entry in folder_entries(path):
            if entry.name.startswith("."):  # .DS_Store, macOS's ._name.jpg, .ipynb_checkpoints
                continue
            try:
                is_folder = entry.is_dir()
                is_file = not is_folder and entry.is_file()
            except OSError as error:  # links that lead to each other (a -> b -> a), no permission
                warn(f"skipping {entry.path}: {error.strerror or error}")
                continue
            if is_folder and entry.is_symlink():
                links.append((entry.path, prefix + entry.name + "/"))
            elif is_folder:  # the real path of a plain subfolder is its parent's plus its name
                walk(entry.path, os.path.join(real_path, entry.name), prefix + entry.name + "/")
            elif is_file and is_image_name(entry.name):
                found.append(prefix + entry.name)

    walk(folder, top, prefix)
    while links:  # the plain tree first, so that a link to one of its folders is the one skipped
        path, link_prefix = links.pop(0)
        real_path = os.path.realpath(path)
        if real_path in listed:
            warn(f"skipping the link {path}: it leads to a folder already listed ({real_path})")
        elif real_path != top and not real_path.startswith(top + os.sep):
            warn(f"skipping the link {path}: it leads out of {folder} (to {real_path})")
        else:
            walk(path, real_path, link_prefix)
    return sorted(found, key=lambda path: path.split("/"))  # the order of a walk with sorted folder entries


def folder_mtime(path):
    """Modification time of a folder in ns, -1 when it is gone: adding, removing or renaming a file changes it."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def class_folder_names(split_dir):
    entries = folder_entries(split_dir)
    archives = [entry.name for entry in entries if entry.name.endswith(".tar")]
    if archives:  # torchvision extracts train/<synset>.tar files one by one: an interrupted extraction
        raise DataError(f"{split_dir} still holds .tar archives ({archives[0]}...): finish extracting them into "
                        f"class folders, or delete the folder and extract again")
    return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))


def scan_class_folders(split_dir, classes):
    """(paths, labels, (folders, mtimes)) of the images in split_dir/<class>/ for each class, as numpy arrays;
    paths and folders relative to split_dir, the folders being every folder listed."""
    paths, labels, folder_times = [], [], []
    for label, name in enumerate(classes):
        found = list_images(os.path.join(split_dir, name), name + "/", folder_times)
        paths += [os.fsencode(path) for path in found]
        labels += [label] * len(found)
    folders = [os.fsencode(os.path.relpath(path, split_dir)) for path, _ in folder_times]
    times = [mtime for _, mtime in folder_times]
    return (np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64),
            (np.array(folders, dtype=np.bytes_), np.array(times, dtype=np.int64)))


def class_folder_index(split_dir, cache_dir=None, classes=None):
    """(folder classes, FileIndex) of split_dir/<class>/<image>. With classes given (a validation split), labels
    follow that list by name, and a class folder without images is a warning; without, it is an error."""
    folder_classes, paths, labels = cached_class_folder_scan(split_dir, cache_dir)
    if not folder_classes:
        raise DataError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image>")
    if len(paths) == 0:
        raise DataError(f"no image files in the class folders of {split_dir} "
                        f"(looked for {' '.join(IMAGE_EXTENSIONS)})")
    counts = np.bincount(labels, minlength=len(folder_classes))
    empty = [name for name, count in zip(folder_classes, counts) if count == 0]
    if empty:
        more = f" (and {plural(len(empty) - 1, 'other')})" if len(empty) > 1 else ""
        where = os.path.join(split_dir, empty[0])
        if classes is None:
            raise DataError(f"class folder {where}{more} holds no images: a class without training images "
                            f"cannot be learnt; add images or remove the folder")
        warn(f"class folder {where}{more} holds no images", every_rank=False)
    if classes is not None:
        class_ids = {name: i for i, name in enumerate(classes)}
        unknown = [name for name in folder_classes if name not in class_ids]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise DataError(f"class '{unknown[0]}'{more} in {split_dir} is not one of the "
                            f"{plural(len(classes), 'training class')}")
        labels = np.array([class_ids[name] for name in folder_classes], dtype=np.int64)[labels]
    return folder_classes, FileIndex(split_dir, paths, labels)


def find_label_file(folders):
    paths = (os.path.join(folder, name) for folder in folders for name in LABEL_FILE_NAMES)
    return next((path for path in paths if os.path.isfile(path)), None)


def read_label_file(label_file):
    """(image name, class name) pairs from lines "name,class,..." or "name class ..."."""
    pairs = []
    with open(label_file, newline="", encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = next(csv.reader([line])) if "," in line else line.split()
            if len(fields) < 2 or not fields[1].split():
                raise DataError(f"line {line_number} of {label_file} is not 'image,class' or 'image class': "
                                f"{line[:80]!r}")
            pairs.append((fields[0].strip(), fields[1].split()[0]))
    return pairs


def flat_folder_index(val_dir, label_file, classes):
    """FileIndex of the images directly in val_dir, labelled by label_file."""
    names = sorted(entry.name for entry in folder_entries(val_dir) if is_image_name(entry.name) and entry.is_file())
    file_of = {}  # file name, and file name without extension -> file name
    for name in names:
        file_of[name] = name
        file_of.setdefault(os.path.splitext(name)[0], name)
    class_ids = {name: i for i, name in enumerate(classes)}

    label_of = {}
    for number, (image, class_name) in enumerate(read_label_file(label_file)):
        image = os.path.basename(image)
        name = file_of.get(image) or file_of.get(os.path.splitext(image)[0])
        if class_name not in class_ids:
            if number == 0 and name is None:  # a header such as "ImageId,PredictionString"
                continue
            raise DataError(f"class '{class_name}' of {image} in {label_file} is not one of the "
                            f"{plural(len(classes), 'training class')}")
        if name is not None:  # a line for an image that is not there is fine: a subset of the split
            label_of[name] = class_ids[class_name]

    unlabelled = [name for name in names if name not in label_of]
    if unlabelled:
        raise DataError(f"{plural(len(unlabelled), 'image')} in {val_dir} without a line in {label_file} "
                        f"(the first: {unlabelled[0]})")
    return FileIndex(val_dir, [os.fsencode(name) for name in names], [label_of[name] for name in names])


# ----------------------------------------------------------------------------------------------------------
# The listing cache (docs/data-pipeline.md, "The listing cache")


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mobilenetv3-torch")


def cached_class_folder_scan(split_dir, cache_dir=None):
    """(classes, paths, labels) of split_dir, from the cache while none of the folders it listed has changed."""
    split_dir = os.path.abspath(split_dir)
    classes = class_folder_names(split_dir)
    # the split folder's time covers added or removed class folders; the cache file holds every other folder's
    stamps = [f"{INDEX_CACHE_VERSION} {split_dir} {os.stat(split_dir).st_mtime_ns}", *classes]
    fingerprint = hashlib.sha256("\n".join(stamps).encode("utf-8", "surrogateescape")).hexdigest()
    folder_key = hashlib.sha256(split_dir.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    cache_file = os.path.join(cache_dir or default_cache_dir(), f"index-{folder_key}.npz")
    try:
        with np.load(cache_file, allow_pickle=False) as saved:
            if str(saved["fingerprint"]) == fingerprint and all(
                    folder_mtime(os.path.join(split_dir, os.fsdecode(folder))) == mtime
                    for folder, mtime in zip(saved["folders"], saved["folder_times"])):
                return [str(name) for name in saved["classes"]], saved["paths"], saved["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # missing, unreadable or corrupt: list the folders again
    paths, labels, (folders, times) = scan_class_folders(split_dir, classes)
    partial = f"{cache_file}.{os.getpid()}.partial"
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        with open(partial, "wb") as f:
            np.savez(f, fingerprint=np.array(fingerprint), classes=np.array(classes, dtype=np.str_),
                     paths=paths, labels=labels, folders=folders, folder_times=times)
        os.replace(partial, cache_file)  # atomic, so parallel ranks never read half a file
    except OSError:  # no cache: the next run lists the folders again
        with contextlib.suppress(OSError):
            os.remove(partial)
    return classes, paths, labels


# ----------------------------------------------------------------------------------------------------------
# Class names and the ILSVRC2012 tar files


def read_synset_mapping(folder):
    """{synset: names} from Kaggle's LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca"), or {}."""
    path = os.path.join(folder, "LOC_synset_mapping.txt")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        pairs = [line.strip().split(maxsplit=1) for line in f if line.strip()]
    return {pair[0]: pair[1] if len(pair) > 1 else pair[0] for pair in pairs}


def imagenet_class_names(classes):
    """torchvision's ImageNet category names for exactly the 1000 sorted ILSVRC-2012 synsets (torchvision lists
    them in that order but does not ship the synsets); any other class list keeps its ids as names."""
    classes = list(classes)
    is_ilsvrc = (len(classes) == 1000 and all(re.fullmatch(r"n\d{8}", name) for name in classes)
                 and classes == sorted(classes) and classes[0] == "n01440764" and classes[-1] == "n15075141")
    if not is_ilsvrc:
        return classes
    from torchvision.models import MobileNet_V3_Large_Weights
    return list(MobileNet_V3_Large_Weights.IMAGENET1K_V1.meta["categories"])


def has_ilsvrc_tars(root, split):
    return all(os.path.isfile(os.path.join(root, ILSVRC_TARS[name])) for name in (split, "devkit"))


def extract_ilsvrc_tars(root, splits):
    """Extract the official tar files into root/<split>/<synset>/ with torchvision.datasets.ImageNet."""
    try:
        import scipy.io  # noqa: F401  torchvision reads the devkit's meta.mat with it
    except ImportError:
        raise DataError(f"{root} holds the ILSVRC2012 tar files: pip install scipy so that "
                        f"torchvision.datasets.ImageNet can extract them, or extract them yourself into "
                        f"train/<synset>/ and val/<synset>/") from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DataError(f"{root} holds the ILSVRC2012 tar files: extract them with one process first: "
                        f"python -m tools.show_data {root}")
    from torchvision.datasets import ImageNet
    for split in splits:
        print(f"extracting {ILSVRC_TARS[split]} into {os.path.join(root, split)} (once; this takes a while)",
              file=sys.stderr, flush=True)
        try:
            ImageNet(root, split=split)
        except RuntimeError as error:  # a missing or corrupt archive
            raise DataError(" ".join(str(error).split())) from None


# ----------------------------------------------------------------------------------------------------------
# Decoding (docs/data-pipeline.md, "Decoding and EXIF orientation")


@contextlib.contextmanager
def torchvision_decoding():
    """Silences torchvision 0.29's notice that its decoders are deprecated, around our calls of them only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


def decode_jpeg_cpu(data, exif_orientation=False):
    """JPEG bytes (a 1-D uint8 tensor) -> uint8 RGB (3, H, W), laid out height-width-channel in memory (the
    fastest layout for v2's uint8 resize): the stored pixels, or with exif_orientation turned upright by the EXIF
    tag. TorchCodec's decoder where it imports, else torchvision's (the same libjpeg-turbo and pixels)."""
    if torchcodec_decode_jpeg is None:
        with torchvision_decoding():
            image = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=exif_orientation)
    else:
        image = torchcodec_decode_jpeg(data if exif_orientation else with_stored_orientation(data), mode="RGB")
    if not image.permute(1, 2, 0).is_contiguous():  # turned: height-width-channel in memory again
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return image


def read_image_file(path, jpeg_modes=("RGB", "L", "CMYK"), exif_orientation=False):
    """(data, size): a JPEG in one of jpeg_modes as its bytes (a 1-D uint8 tensor) and its stored (height,
    width); any other image decoded by PIL (turned by its EXIF tag with exif_orientation) as uint8 RGB (3, H, W),
    and None. Image.open reads only the header: the real format, and PIL's decompression-bomb check for all."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:  # its message names our BytesIO object, not the file
        raise Image.UnidentifiedImageError("not an image format Pillow can read") from None
    with image:
        has_decoder = torchcodec_decode_jpeg is not None or decode_jpeg is not None
        if has_decoder and image.format == "JPEG" and image.mode in jpeg_modes:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), (image.height, image.width)
        if exif_orientation:
            image = ImageOps.exif_transpose(image)
        pixels = np.array(image.convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1), None


def decode_image_file(path, exif_orientation=False):
    """The image at path as uint8 RGB (3, H, W): JPEGs by decode_jpeg_cpu, other files by PIL. The stored pixels,
    as torchvision's ImageFolder gives them, or with exif_orientation turned as a viewer shows them (--predict)."""
    data, size = read_image_file(path, exif_orientation=exif_orientation)
    if size is None:
        return data
    return decode_jpeg_cpu(data, exif_orientation)


def bad_file_reason(error):
    """What a decoding error says about the file, in one line."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", reason)  # the decoder's C++ source location says nothing here


# --decode-on device: a batch of JPEGs (1-D uint8 CPU tensors) decoded in one call on the device (nvjpeg on
# CUDA) to their stored pixels, uint8 RGB (3, H, W) each; RuntimeError when one of them can't be.

def decode_with_torchcodec(device, jpegs):
    """TorchCodec decodes on the current CUDA stream and returns when it is done."""
    return torchcodec_decode_jpeg([with_stored_orientation(data) for data in jpegs], mode="RGB", device=device)


def decode_with_torchvision(device, jpegs):
    """torchvision's nvjpeg writes from a stream of its own without waiting for ours (pytorch/vision#9606): the
    current stream is synchronized first, so it cannot overwrite memory that queued kernels are about to read."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    with torchvision_decoding():
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)


DEVICE_DECODERS = {"TorchCodec": decode_with_torchcodec, "torchvision": decode_with_torchvision}


def decode_jpegs_on(device, jpegs):
    """The batch decoded by the decoder that works on device (device_jpeg_decoder)."""
    return DEVICE_DECODERS[device_jpeg_decoder(device)](device, jpegs)


def device_jpeg_decoder(device):
    """'TorchCodec' or 'torchvision': TorchCodec where it imports and decodes on device, else torchvision."""
    if device.type == "cpu":
        return "TorchCodec" if torchcodec_decode_jpeg is not None else "torchvision"
    return first_decoder_that_works_on(device)


@functools.lru_cache(maxsize=None)
def first_decoder_that_works_on(device):
    """Tried once per device on a small JPEG: a CPU-only torchcodec wheel imports but has no nvjpeg, and
    torchvision decodes on the CPU for a device it has no decoder for. DataError naming each reason if none works."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    probe = [torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)]
    reasons = []
    for name, available in (("TorchCodec", torchcodec_decode_jpeg), ("torchvision", decode_jpeg)):
        if available is None:
            reasons.append(f"{name}: not installed")
            continue
        try:
            if DEVICE_DECODERS[name](device, probe)[0].device.type == device.type:
                return name
            reasons.append(f"{name}: decodes on the CPU instead")
        except (RuntimeError, NotImplementedError, ValueError) as error:
            if is_device_failure(error):  # the device's fault, not the decoder's: never cached as a choice
                raise
            reasons.append(f"{name}: {bad_file_reason(error).split('. ')[0]}")
    raise DataError(f"--decode-on device: no JPEG decoder here works on {device} ({'; '.join(reasons)}); "
                    "use --decode-on workers")


def is_device_failure(error):
    """Out of GPU memory, a broken CUDA context: not the file's fault. The decoders raise these as plain
    RuntimeError too (TorchCodec passes every C++ error through torch's stable ABI as one)."""
    return isinstance(error, DEVICE_FAILURES) or any(text in str(error) for text in (
        "out of memory", "CUDA error", "Failed to synchronize CUDA stream"))


# ----------------------------------------------------------------------------------------------------------
# EXIF orientation for TorchCodec: its decode_jpeg always turns a JPEG by the EXIF orientation tag (0.17 has no
# option not to), so the tags are set to 1 in a copy of the bytes. Remove this section, and its two calls above,
# once TorchCodec can leave the orientation alone. Why not Pillow's reading of the tag: docs/data-pipeline.md.


def with_stored_orientation(data):
    """JPEG bytes (a 1-D uint8 tensor) that TorchCodec decodes to the stored pixels: data, or a copy whose EXIF
    orientation tags all say 1 (its CPU and CUDA decoders read the tag from different segments)."""
    places = [place for place in exif_orientation_places(data) if place[2] != 1]
    if not places:
        return data
    data = data.clone()
    for offset, order, _ in places:
        data[offset:offset + 2] = torch.tensor(list((1).to_bytes(2, order)), dtype=torch.uint8)
    return data


def exif_orientation_places(data):
    """[(offset, byte order, value)] of the orientation tag in the first directory of every APP1 segment before
    the image data, from the segment headers alone. Walks the markers as libjpeg does (stray bytes skipped,
    markers without a length) and reads the directory as TorchCodec does (big-endian unless "II")."""
    header = memoryview(data.numpy())  # indexing gives plain ints: fast
    places, position = [], 2  # after the start-of-image marker
    while position + 4 <= len(header):
        if header[position] != 0xFF or header[position + 1] == 0xFF:  # stray byte, or fill byte before a marker
            position += 1
            continue
        marker = header[position + 1]
        if marker in (0xDA, 0xD9):  # start of scan (the image data), end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length field
            position += 2
            continue
        length = header[position + 2] << 8 | header[position + 3]
        if marker == 0xE1:
            start = position + 10  # the TIFF header, after "Exif\0\0"
            tiff = header[start:position + 2 + length].tobytes()
            order = "little" if tiff[:2] == b"II" else "big"
            if len(tiff) >= 8 and int.from_bytes(tiff[2:4], order) == 0x2A:  # else XMP, say
                directory = int.from_bytes(tiff[4:8], order)
                count = int.from_bytes(tiff[directory:directory + 2], order)
                for entry in range(directory + 2, min(directory + 2 + 12 * count, len(tiff) - 9), 12):
                    if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:  # orientation, a 2-byte value
                        places.append((start + entry + 8, order, int.from_bytes(tiff[entry + 8:entry + 10], order)))
        position += 2 + max(length, 2)
    return places


# ----------------------------------------------------------------------------------------------------------
# Scaled decoding: a RandomResizedCrop box at least twice the output decoded at 1/2, 1/4 or 1/8 size


def draw_crop_box(crop, image_size):
    """RandomResizedCrop's box (top, left, height, width) for an image of image_size (height, width), drawn with
    the same random calls as crop(image) makes: it depends on the image's size only."""
    box = crop.make_params([torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, *image_size)])
    return box["top"], box["left"], box["height"], box["width"]


def dct_scale(box_height, box_width, out_height, out_width):
    """The denominator of the smallest JPEG DCT scale (1/8, 1/4, 1/2 or 1) at which the box still holds at least
    out_height x out_width pixels, so that the crop is still shrunk, never enlarged."""
    for scale in (8, 4, 2):
        if box_height >= scale * out_height and box_width >= scale * out_width:
            return scale
    return 1


def decode_jpeg_crop_reduced(data, scale, box, out_size):
    """The box (top, left, height, width, in full-size pixels) of JPEG bytes decoded at 1/scale size by DCT
    scaling (PIL's draft) and resized to out_size (height, width): uint8 RGB (3, *out_size); None if the decoder
    did not reduce by exactly scale. The box's edges divided by scale go to PIL's resize as fractions, so the
    geometry is exactly the full-size crop's (rounded edges would shift it by up to half an output pixel)."""
    top, left, height, width = box
    with Image.open(io.BytesIO(data.numpy())) as image:
        full_width, full_height = image.size
        image.draft("RGB", (full_width // scale, full_height // scale))
        if image.size != (-(-full_width // scale), -(-full_height // scale)):
            return None
        if image.mode != "RGB":
            image = image.convert("RGB")
        edges = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        image = image.resize(out_size[::-1], Image.Resampling.BILINEAR, box=edges)  # antialiased, like v2's
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # height-width-channel in memory, like decode_jpeg's


# ----------------------------------------------------------------------------------------------------------
# Datasets: decoded and augmented samples


@contextlib.contextmanager
def sample_rng(seed):
    """torch's CPU generator seeded with a sample's seed inside the block, put back as it was after (with workers=0
    this runs in the training process); seed None leaves it alone."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def worker_slot():
    """Which entry of a per-process counter this process may write: 0 in the main process, then one per worker."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + info.id % (SKIP_COUNTER_SLOTS - 1)


class ImageFiles(torch.utils.data.Dataset):
    """The images of a FileIndex, decoded and transformed: (uint8 tensor (3, H, W), label).

    An item is an index, or (index, sample seed) from EpochSampler: the transform then runs seeded with it, so
    augmentation does not depend on the worker, and a resumed epoch sees the same images. A file that can't be
    decoded raises DataError when strict; else it is warned about, counted in `skipped` (each time it is read)
    and replaced by the next readable file, so the batch keeps its size.

    scaled_decoding, when the transform starts with a bilinear RandomResizedCrop (train_transform's does): the
    crop box is drawn first, with the transform's own random calls, and a JPEG whose box is at least twice the
    output is decoded at a DCT scale (decode_jpeg_crop_reduced). Same box, flip and later steps as a full decode.
    """

    def __init__(self, index, transform, strict=False, scaled_decoding=True):
        self.index = index
        self.transform = transform
        self.strict = strict
        steps = getattr(transform, "transforms", [])
        self.crop = None  # the RandomResizedCrop that scaled decoding does itself, then the steps after it
        if (scaled_decoding and steps and isinstance(steps[0], v2.RandomResizedCrop) and steps[0].antialias
                and getattr(steps[0].interpolation, "value", steps[0].interpolation) == "bilinear"
                and (torchcodec_decode_jpeg is not None or decode_jpeg is not None)):
            self.crop, self.after_crop = steps[0], v2.Compose(steps[1:])
        # shared memory, so the main process sees the workers' counts; one slot per process, never written by two
        self.skip_counts = torch.zeros(SKIP_COUNTER_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.index)

    @property
    def skipped(self):
        return int(self.skip_counts.sum())

    def __getitem__(self, item):
        position, seed = item if isinstance(item, tuple) else (item, None)
        if self.crop is not None:
            with sample_rng(seed):
                start = torch.random.get_rng_state()

                def read(path):  # each file tried starts from the sample's random state, as transform(image) does
                    torch.random.set_rng_state(start)
                    return self.read_cropped(path)

                image, label, _ = self.load(position, read=read)
                return self.after_crop(image), label
        image, label, _ = self.load(position)
        if self.transform is not None:
            with sample_rng(seed):
                image = self.transform(image)
        return image, label

    def read_cropped(self, path):
        """The file at path, decoded and put through RandomResizedCrop, with scaled decoding where it applies."""
        data, size = read_image_file(path)
        if size is None:  # decoded by PIL already
            return self.crop(data)
        box = draw_crop_box(self.crop, size)
        scale = dct_scale(box[2], box[3], *self.crop.size)
        if scale > 1:
            image = decode_jpeg_crop_reduced(data, scale, box, self.crop.size)
            if image is not None:
                return image
        return v2.functional.resized_crop(decode_jpeg_cpu(data), *box, self.crop.size, antialias=True)

    def load(self, position, read=decode_image_file):
        """(read(path), label, position read) for the file at position, or for the next readable one after it."""
        for offset in range(min(MAX_BAD_IN_A_ROW, len(self.index))):
            i = (position + offset) % len(self.index)
            try:
                return read(self.index.path(i)), int(self.index.labels[i]), i
            except DECODE_ERRORS as error:
                self.report_bad_file(self.index.path(i), error)
        raise DataError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row, from {self.index.path(position)}")

    def report_bad_file(self, path, error):
        if self.strict:
            raise DataError(f"cannot read image {path}: {bad_file_reason(error)}") from None
        warn(f"skipping unreadable image {path}: {bad_file_reason(error)}")
        self.skip_counts[worker_slot()] += 1

    def batch_to(self, device, images, labels):
        """A batch from the loader, on the training device: (uint8 images (N, 3, H, W), labels)."""
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


class ValidationImageFiles(ImageFiles):
    """Validation images: an unreadable file is left out of its batch, never replaced, so every image is scored
    once with its own label (a batch may come out smaller, or empty; build_loader takes the collate). It is warned
    about once however many passes read it, and marked in `unreadable` (shared memory) for unreadable_files()."""

    def __init__(self, index, transform, strict=False):
        super().__init__(index, transform, strict)
        self.unreadable = torch.zeros(len(index), dtype=torch.uint8).share_memory_()

    @property
    def skipped(self):
        return int(self.unreadable.sum())

    def unreadable_files(self):
        """Paths of the files found unreadable so far, in index order."""
        return [self.index.path(i) for i in self.unreadable.nonzero().flatten().tolist()]

    def __getitem__(self, item):
        """(uint8 image, label), or None for an unreadable file (left out by collate)."""
        position = item[0] if isinstance(item, tuple) else item
        path = self.index.path(position)
        try:
            image = decode_image_file(path)
        except DECODE_ERRORS as error:
            if self.strict:
                raise DataError(f"cannot read image {path}: {bad_file_reason(error)}") from None
            if not self.unreadable[position]:
                warn(f"leaving out unreadable validation image {path}: {bad_file_reason(error)}")
            self.unreadable[position] = 1
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.index.labels[position])

    @staticmethod
    def collate(samples):
        kept = [sample for sample in samples if sample is not None]
        if not kept:
            return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return torch.utils.data.default_collate(kept)


@dataclass
class EncodedBatch:
    """A batch of EncodedImageFiles in few tensors (each tensor a worker sends costs a file descriptor): the JPEGs'
    bytes end to end, their lengths (0 for an image the worker finished), the finished images, and each sample's
    plan [position, top, left, height, width, flip]."""
    jpeg_bytes: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    plans: torch.Tensor


class EncodedImageFiles(ImageFiles):
    """Training samples decoded on the training device (train.py --decode-on device), for machines with few CPU
    cores per GPU. The workers only read each file and draw its crop box and flip with train_transform's random
    calls; batch_to decodes the batch's JPEGs in one call on the device and crops, resizes and flips them there.
    At full size, so on the CPU the images equal ImageFiles' with train_transform and scaled_decoding=False. Files
    nvjpeg can't take (not JPEG, CMYK) are decoded and cropped in the worker."""

    DEVICE_JPEG_MODES = ("RGB", "L")  # nvjpeg, through torchvision at least, does not take CMYK

    def __init__(self, index, img_size, min_scale=0.08, strict=False):
        super().__init__(index, transform=None, strict=strict)
        if torchcodec_decode_jpeg is None and decode_jpeg is None:
            raise DataError("decoding on the device needs torchcodec or torchvision.io.decode_jpeg; neither imports")
        self.img_size = img_size
        # train_transform's own steps, so that the crop and flip are drawn exactly as there
        self.crop, self.flip = train_transform(img_size, min_scale=min_scale).transforms

    def __getitem__(self, item):
        """(file bytes, 1-D, or the finished image (3, S, S); plan; label)."""
        position, seed = item if isinstance(item, tuple) else (item, None)
        read = functools.partial(read_image_file, jpeg_modes=self.DEVICE_JPEG_MODES)
        (data, size), label, position = self.load(position, read=read)
        image_size = size or tuple(data.shape[-2:])
        with sample_rng(seed):  # train_transform's random calls, in its order: the crop box, then the flip
            box = draw_crop_box(self.crop, image_size)
            flip = bool(torch.rand(1) < self.flip.p)
        plan = torch.tensor([position, *box, flip])
        if size is None:  # already decoded by PIL: finish it here
            data = self.crop_resize_flip(data, plan)
        return data, plan, label

    def crop_resize_flip(self, image, plan):
        top, left, height, width, flip = plan[1:].tolist()
        image = v2.functional.resized_crop(image, top, left, height, width, [self.img_size, self.img_size],
                                           antialias=True)
        return v2.functional.horizontal_flip(image) if flip else image

    def collate(self, samples):
        data, plans, labels = zip(*samples)
        jpegs = [d for d in data if d.dim() == 1]
        finished = [d for d in data if d.dim() == 3]
        return EncodedBatch(
            jpeg_bytes=torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8),
            lengths=torch.tensor([len(d) if d.dim() == 1 else 0 for d in data]),
            finished=torch.stack(finished) if finished else torch.empty(0, 3, self.img_size, self.img_size,
                                                                         dtype=torch.uint8),
            plans=torch.stack(plans)), torch.tensor(labels)

    def batch_to(self, device, batch, labels):
        """Decode the batch's JPEGs on the device, then crop, resize and flip each: (uint8 (N, 3, S, S), labels).
        An image that fails to decode is reported like a bad file and replaced by the batch's previous good one."""
        rows = batch.lengths.nonzero().flatten().tolist()
        jpegs = torch.split(batch.jpeg_bytes, batch.lengths[rows].tolist())
        decoded = dict(zip(rows, self.decode_jpegs(list(jpegs), batch.plans[rows, 0].tolist(), device)))
        images = torch.empty(len(labels), 3, self.img_size, self.img_size, dtype=torch.uint8, device=device)
        finished = iter(batch.finished.to(device, non_blocking=True))
        good = []
        for i, plan in enumerate(batch.plans):
            if i not in decoded:
                images[i] = next(finished)
            elif decoded[i] is not None:
                images[i] = self.crop_resize_flip(decoded[i], plan)
            else:
                continue
            good.append(i)
        labels = labels.clone()
        if not good:  # (a batch of 1, say) the next readable file of the index, decoded here and squashed to size
            image, labels[0], _ = self.load(int(batch.plans[0, 0]) + 1)
            images[0] = v2.functional.resize(image, [self.img_size, self.img_size], antialias=True).to(device)
            good.append(0)
        for i in sorted(set(range(len(labels))) - set(good)):
            source = max((j for j in good if j < i), default=good[0])  # the previous good image, else the first
            images[i], labels[i] = images[source], labels[source]
        return images, labels.to(device, non_blocking=True)

    def decode_jpegs(self, jpegs, positions, device):
        """Decoded images on device (None for a file that can't be decoded): the whole list in one call, and one
        by one only when that call fails (a batched decode stops at its first broken file)."""
        if not jpegs:
            return []
        try:
            return decode_jpegs_on(device, jpegs)
        except RuntimeError as error:
            if is_device_failure(error):
                raise
        images = []
        for data, position in zip(jpegs, positions):
            try:
                images.append(decode_jpegs_on(device, [data])[0])
                continue
            except RuntimeError as error:
                if is_device_failure(error):
                    raise
                reason = error
            try:  # libjpeg-turbo reads some files nvjpeg refuses
                image = decode_jpeg_cpu(data)
            except RuntimeError:
                images.append(None)
                self.report_bad_file(self.index.path(position), reason)
                continue
            images.append(image.to(device))
        return images

    @staticmethod
    def check_device(device):
        """Raise DataError unless JPEGs can be decoded on device here (nvjpeg on CUDA)."""
        device_jpeg_decoder(device)


# ----------------------------------------------------------------------------------------------------------
# Transforms: they run in the DataLoader workers on uint8 tensors; normalize_batch makes floats on the device.


def train_transform(img_size, auto_augment=None, random_erase=0.0, norm="imagenet", min_scale=0.08):
    """Inception-style random crop and flip, then optionally RandAugment ("ra"), TrivialAugmentWide ("ta_wide")
    or AutoAugment's ImageNet policy ("imagenet"), then optionally random erasing with probability random_erase.
    """
    steps = [v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if auto_augment == "ra":
        steps.append(v2.RandAugment())
    elif auto_augment == "ta_wide":
        steps.append(v2.TrivialAugmentWide())
    elif auto_augment == "imagenet":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    elif auto_augment:
        raise ValueError(f"unknown auto_augment {auto_augment!r}: use 'ra', 'ta_wide' or 'imagenet'")
    if random_erase > 0:  # with the mean colour, which normalize_batch turns into (almost exactly) zero
        mean_colour = [round(255 * value) for value in NORMS[norm][0]]
        steps.append(v2.RandomErasing(p=random_erase, value=mean_colour))
    return v2.Compose(steps)


def val_transform(resize_size, crop_size):
    """Resize the shorter side to resize_size, then take the centre crop (usually resize = crop / 0.875)."""
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)])


@functools.lru_cache(maxsize=8)
def normalization_constants(mean, std, device):
    """255 * mean and 1 / (255 * std), made once per device (a new GPU tensor per batch is a copy that waits)."""
    mean_255 = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
    scale = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)
    return mean_255, scale


def normalize_batch(images, mean, std, channels_last=False):
    """uint8 (N, 3, H, W) batch -> float, scaled to [0, 1] and normalized, on the batch's device."""
    # (x / 255 - mean) / std, written as (x - 255 mean) * 1 / (255 std): two in-place passes over one new tensor
    mean_255, scale = normalization_constants(tuple(mean), tuple(std), images.device)
    if channels_last:  # reordered as uint8, a quarter of the bytes; float() and the in-place ops keep the order
        images = images.contiguous(memory_format=torch.channels_last)
    return images.float().sub_(mean_255).mul_(scale)


def make_mixup_cutmix(mixup_alpha, cutmix_alpha, num_classes):
    """A callable (normalized float images, int labels) -> (images, soft labels), or None when both alphas are 0.
    With both, each batch gets MixUp or CutMix, chosen at random."""
    choices = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


# ----------------------------------------------------------------------------------------------------------
# Sampling and loading


class EpochSampler(torch.utils.data.Sampler):
    """The order of one rank's samples in an epoch, a function of (seed, epoch) only.

    shuffle=True (training): a permutation seeded with seed + epoch, rank r taking positions r, r + num_replicas,
    ..., padded by wrapping around (or cut, with drop_last) so every rank gets as many, as DistributedSampler does;
    items are (index, sample seed), the seed for the sample's augmentation. shuffle=False (validation): rank r
    takes indices r, r + num_replicas, ... unpadded, so every image counts once; items are plain indices.
    set_epoch(epoch, skip_batches, batch_size) skips the rank's first batches unloaded, to resume mid-epoch.
    """

    def __init__(self, num_samples, shuffle, seed=0, num_replicas=1, rank=0, drop_last=False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = self.skip = 0

    def set_epoch(self, epoch, skip_batches=0, batch_size=1):
        self.epoch = epoch
        self.skip = skip_batches * batch_size

    def rank_length(self):
        if not self.shuffle:
            return len(range(self.rank, self.num_samples, self.num_replicas))
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return -(-self.num_samples // self.num_replicas)  # ceiling division

    def __len__(self):
        return max(0, self.rank_length() - self.skip)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.rank + self.skip * self.num_replicas, self.num_samples, self.num_replicas))
        total = self.rank_length() * self.num_replicas
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        seeds = torch.randint(0, 2**62, (total,), generator=generator)
        if total > self.num_samples:  # pad by wrapping around
            order = order.repeat(-(-total // self.num_samples))
        mine = slice(self.rank + self.skip * self.num_replicas, total, self.num_replicas)
        return zip(order[:total][mine].tolist(), seeds[mine].tolist())


# This module's loader worker processes, for end_loader_workers; weak, so a worker is forgotten with its loader.
loader_workers = weakref.WeakSet()
ending_loader_workers_at_exit = False  # end_loader_workers is registered with atexit (once, by build_loader)


class Loader(DataLoader):
    """A DataLoader that records its worker processes in `loader_workers`."""

    def __iter__(self):
        iterator = super().__iter__()
        # torch's multi-process iterator has started all its workers by now; the single-process one has none
        loader_workers.update(getattr(iterator, "_workers", ()))
        return iterator


def end_loader_workers():
    """At exit, kill the loader workers still alive (only them): they ignore SIGTERM (start_worker), with which
    multiprocessing's exit handler ends daemon children before it waits for them, forever."""
    workers = [child for child in multiprocessing.active_children() if child in loader_workers]
    if workers and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the DataLoader's handler would call their end an error
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join()


def build_loader(dataset, sampler, batch_size, workers, train, pin_memory=False, worker_nice=0):
    """The DataLoader for training (train=True: incomplete last batch dropped) or validation. worker_nice > 0
    lowers the workers' priority; train.py and evaluate.py keep 0 (docs/data-pipeline.md, run E)."""
    global ending_loader_workers_at_exit
    worker_options = {}
    if workers > 0:
        # Workers stay alive across epochs; 4 batches in flight each is cheap with uint8 images.
        worker_options = {"persistent_workers": True, "prefetch_factor": 4}
        if not ending_loader_workers_at_exit:
            # atexit runs the last registered first: this runs before multiprocessing's handler (registered
            # when torch imported multiprocessing.util)
            atexit.register(end_loader_workers)
            ending_loader_workers_at_exit = True
    return Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                  pin_memory=pin_memory, collate_fn=getattr(dataset, "collate", None),
                  worker_init_fn=functools.partial(start_worker, worker_nice),
                  # seeds torch, random and numpy in each worker the same way every run
                  generator=torch.Generator().manual_seed(getattr(sampler, "seed", 0)),
                  **worker_options)


def start_worker(nice, worker_id):
    """DataLoader worker start: Ctrl-C and SIGTERM reach the whole process group, and only the training process
    acts on them (it saves, then ends the workers); then the worker's priority."""
    ignore_stop_signals()
    if nice and hasattr(os, "nice"):
        with contextlib.suppress(OSError):  # a sandbox may forbid it: then the workers keep the default
            os.nice(nice)
