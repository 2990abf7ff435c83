"""What dataset.py finds in a data folder, without training: its layout, classes and train/val image counts.

    python -m tools.show_data [PATH] [--cache-dir D]
    python tools/show_data.py [PATH] [--cache-dir D]     # the same

PATH holding the ILSVRC2012 tar files: they are extracted first (once), which a multi-process run needs done
beforehand. Without PATH: the demo dataset (made in data/demo if it is not there yet).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root, for scripts
from layouts import find_dataset  # noqa: E402
from utils import DataError, plural  # noqa: E402


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.show_data",
                                     description="Show what dataset.py finds in a data folder (extracting the "
                                                 "ILSVRC2012 tar files first if that is what it holds).")
    parser.add_argument("data_path", nargs="?", help="dataset folder (default: make or reuse data/demo)")
    parser.add_argument("--cache-dir", default=None, help="where to cache file listings (default: "
                                                          "$XDG_CACHE_HOME or ~/.cache, /mobilenetv3-torch)")
    args = parser.parse_args(argv)
    try:
        if args.data_path is None:
            from tools.demo_data import make_demo_dataset
            args.data_path = make_demo_dataset()
        splits = find_dataset(args.data_path, args.cache_dir)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"layout: {splits.layout}")
    print(f"classes: {len(splits.classes)}, e.g. " +
          ", ".join(f"{name} ({readable})" for name, readable in list(zip(splits.classes, splits.class_names))[:3]))
    print(f"train: {plural(len(splits.train), 'image')} in {splits.train.root}")
    print(f"val: {plural(len(splits.val), 'image')} in {splits.val.root}" if splits.val else "val: none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
