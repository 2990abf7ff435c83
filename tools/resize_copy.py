"""A copy of a dataset with smaller images, which decode faster (docs/data-pipeline.md, "A pre-resized copy").

    python -m tools.resize_copy SRC DST [--short-side 320] [--workers N] [--quality 90]
    python tools/resize_copy.py SRC DST ...          # the same

Every image of every split is written as JPEG at the same relative path under DST, its shorter side at most
--short-side pixels (never enlarged); the label and mapping files come along, so DST reads as the same layout.
An interrupted copy resumes when the same command is run again.
"""
import contextlib
import io
import multiprocessing
import os
import shutil
import signal
import sys

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root, for scripts
from layouts import LABEL_FILE_NAMES, existing_folder, find_dataset  # noqa: E402
from utils import DataError, plural, warn  # noqa: E402
from decode import DECODE_ERRORS, bad_file_reason  # noqa: E402

RESIZED_MARKER = "RESIZED_COPY"  # written last: its presence says the copy is complete
RESIZED_SETTINGS = ".resized-copy-settings"  # written first: a rerun must use the same settings
LAYOUT_FILES = (*LABEL_FILE_NAMES, "LOC_synset_mapping.txt")  # what find_dataset reads besides the images


def make_resized_copy(source, destination, short_side=320, workers=None, quality=90):
    """Copy every image of the dataset at source to the same path under destination, its shorter side at most
    short_side pixels, as JPEG, with the layout's label and mapping files; a rerun resumes an interrupted copy.
    An unreadable image is reported and left out. Returns {"resized", "unchanged", "done before", "unreadable"}
    counts."""
    if short_side < 1:
        raise DataError(f"--short-side must be at least 1 pixel, not {short_side}")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality must be in 1..100, not {quality}")
    source = existing_folder(source, "source folder")
    destination = os.path.abspath(os.path.expanduser(str(destination)))
    if destination == source or destination.startswith(source + os.sep):
        raise DataError(f"the copy {destination} must not be inside the source folder {source}")
    if os.path.isfile(destination):
        raise DataError(f"{destination} is a file: give a folder for the copy")
    settings = f"short side {short_side}, quality {quality}, from {source}"
    settings_file = os.path.join(destination, RESIZED_SETTINGS)
    if os.path.isdir(destination) and os.listdir(destination):
        try:
            with open(settings_file) as f:
                earlier = f.read()
        except OSError:
            raise DataError(f"{destination} exists and is not a resized copy: move it away or choose another "
                            f"folder") from None
        if earlier != settings:
            raise DataError(f"{destination} is a resized copy with other settings ({earlier}): choose another "
                            f"folder to copy with {settings}")
    splits = find_dataset(source, cache_dir=None)
    marker = os.path.join(destination, RESIZED_MARKER)
    os.makedirs(destination, exist_ok=True)
    with open(settings_file, "w") as f:
        f.write(settings)
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)  # complete again only when this run has seen every file

    tasks, folders = [], set()
    for index in (splits.train, splits.val):
        for i in range(len(index) if index is not None else 0):
            relative = os.path.relpath(index.path(i), source)
            tasks.append((index.path(i), os.path.join(destination, relative), short_side, quality))
            folders.add(os.path.dirname(tasks[-1][1]))
    for folder in folders:  # every class folder, even one whose images all turn out unreadable
        os.makedirs(folder, exist_ok=True)
    copy_layout_files(source, destination, splits)

    counts = {"resized": 0, "unchanged": 0, "done before": 0, "unreadable": 0}
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = multiprocessing.Pool(workers, initializer=start_copy_worker)
    try:
        results = pool.imap_unordered(resize_image_file, tasks, chunksize=8)
        for outcome, message in tqdm(results, total=len(tasks), desc="resized copy", unit="img",
                                     disable=not sys.stderr.isatty()):
            counts[outcome] += 1
            if message:
                warn(message)
        pool.close()  # the workers end on their own: no signal needed
    except BaseException:
        pool.terminate()  # an error or Ctrl-C: SIGTERM, at its default action in the workers (start_copy_worker)
        raise
    finally:
        pool.join()
    with open(marker, "w") as f:
        f.write(f"{settings}\n" + "".join(f"{name}: {count}\n" for name, count in counts.items()))
    return counts


def start_copy_worker():
    """Pool initializer: Ctrl-C is the parent's to handle, and SIGTERM ends the worker even when its parent had a
    Python handler for it (inherited, it would keep Pool.terminate from ending the worker, and join would hang)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def copy_layout_files(source, destination, splits):
    """The label and mapping files find_dataset reads (LAYOUT_FILES), from the dataset root and the split folders."""
    folders = {source, os.path.dirname(splits.train.root), splits.train.root}
    if splits.val is not None:
        folders |= {splits.val.root, os.path.dirname(splits.val.root)}
    for folder in folders:
        for name in LAYOUT_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and (folder + os.sep).startswith(source + os.sep):
                target = os.path.join(destination, os.path.relpath(path, source))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                partial = f"{target}.partial-{os.getpid()}"
                shutil.copyfile(path, partial)
                os.replace(partial, target)


def resize_image_file(task):
    """One image, in a Pool worker: (outcome, warning or None). Written under a temporary name and renamed, so a
    file with the final name is complete."""
    path, target, short_side, quality = task
    if os.path.exists(target):
        return "done before", None
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise ValueError("empty file (0 bytes)")
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if min(width, height) <= short_side and image.format == "JPEG" and image.mode in ("RGB", "L"):
                resized = None  # small enough already: the same bytes, no second JPEG loss
            else:
                scale = min(1.0, short_side / min(width, height))
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                # DCT-scaled decoding down to at least twice the size, then Lanczos, as PIL's thumbnail() does
                image.draft("RGB", (2 * size[0], 2 * size[1]))
                resized = image.convert("L" if image.mode == "L" else "RGB")
                if resized.size != size:
                    resized = resized.resize(size, Image.Resampling.LANCZOS)
    except DECODE_ERRORS as error:
        return "unreadable", f"leaving out unreadable image {path}: {bad_file_reason(error)}"
    partial = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial-{os.getpid()}")
    try:
        if resized is None:
            with open(partial, "wb") as f:
                f.write(data)
        else:
            resized.save(partial, format="JPEG", quality=quality)
        os.replace(partial, target)
    except OSError as error:  # disk full, no permission: the copy cannot go on
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise DataError(f"cannot write {target}: {error.strerror or error}") from None
    return ("unchanged" if resized is None else "resized"), None


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.resize_copy",
                                     description="Copy a dataset with every image's shorter side at most --short-side "
                                                 "pixels, as JPEG, with its label files; resumes an interrupted copy.")
    parser.add_argument("source", metavar="SRC", help="dataset folder to copy")
    parser.add_argument("destination", metavar="DST", help="folder for the copy")
    parser.add_argument("--short-side", type=int, default=320, help="shorter side of the copied images, in pixels")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the resized images")
    args = parser.parse_args(argv)
    try:
        if args.workers is not None and args.workers < 1:
            raise DataError(f"--workers must be at least 1, not {args.workers}")
        counts = make_resized_copy(args.source, args.destination, short_side=args.short_side,
                                   workers=args.workers, quality=args.quality)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    destination = os.path.abspath(args.destination)
    print(f"{destination}: {plural(counts['resized'], 'image')} resized to a shorter side of {args.short_side} px, "
          f"{counts['unchanged']} small enough already (copied), {counts['done before']} done by an earlier run, "
          f"{counts['unreadable']} unreadable (left out)")
    print(f"train on it with: python train.py --data-path {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
