"""Where a dataset's images are: find_dataset(data_path) reads four layouts (class folders, Kaggle's ILSVRC
download, a flat val/ folder with a label file, the ILSVRC2012 tar files, extracted once) into DataSplits:
the classes (sorted training folder names), their human-readable names and a FileIndex per split. The listing
of a class-folder split is cached outside the data folder. The layouts, links and cache: docs/data-pipeline.md.
"""
import contextlib
import csv
import hashlib
import os
import re
import sys
import zipfile
from dataclasses import dataclass

import numpy as np

from utils import DataError, plural, warn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_NAMES = ("val_labels.csv", "val_labels.txt", "val.csv", "val.txt", "labels.csv", "labels.txt",
                    "LOC_val_solution.csv")
ILSVRC_TARS = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar",
               "devkit": "ILSVRC2012_devkit_t12.tar.gz"}
KAGGLE_IMAGES = os.path.join("ILSVRC", "Data", "CLS-LOC")
INDEX_CACHE_VERSION = 2  # change it whenever what a cache file holds changes, so old files are not read


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


def hold_out(index, files):
    """(train, val) FileIndex with exactly `files` (paths relative to index.root, as a run recorded them) held out;
    images added since go to training. DataError when some of them are gone: the split would not be the run's."""
    held_out = np.isin(index.paths, np.asarray([os.fsencode(path) for path in files], dtype=np.bytes_))
    if held_out.sum() < len(files):
        present = set(index.paths[held_out].tolist())
        gone = [path for path in files if os.fsencode(path) not in present]
        raise DataError(f"{len(gone)} of the {len(files)} images held out for this run's validation are missing "
                        f"from {index.root} (the first: {gone[0]}): put them back, or start a new run")
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
