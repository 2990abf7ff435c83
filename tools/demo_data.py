"""The demo dataset: five classes of drawn shapes, small enough that a MobileNetV3 learns it in about a minute on a
CPU. `python train.py` without --data-path makes it (once) in data/demo and trains on it.

    python -m tools.demo_data [ROOT]          # make (or reuse) it in ROOT (default data/demo); prints its path
    python tools/demo_data.py [ROOT]          # the same

The images are the same bytes every run (a fixed seed): change DEMO_VERSION whenever the drawing changes.
"""
import colorsys
import os
import random
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root, for scripts
from utils import DataError  # noqa: E402

DEMO_SHAPES = ("circle", "square", "triangle", "cross", "star")
DEMO_HUES = (0, 72, 144, 216, 288)  # degrees: red, yellow-green, green-cyan, blue, magenta
DEMO_VERSION = "demo v2"  # change it when the drawing changes, so that old demo folders are regenerated
DEMO_MARKER = "COMPLETE"


def make_demo_dataset(root="data/demo"):
    """A small dataset of drawn shapes in root/{train,val}/<shape>/*.jpg, made once; returns its path.

    Five classes, 200 training and 50 validation images each, 64x64 px. The same bytes every time (fixed
    seed), and easy enough that a small MobileNetV3 learns it in about a minute on a CPU.
    """
    root = os.path.abspath(root)
    if demo_is_complete(root):
        return root
    if os.path.exists(root) and not (os.path.isdir(root) and set(os.listdir(root)) <= {"train", "val", DEMO_MARKER}):
        raise DataError(f"{root} exists and is not a demo dataset: move it away or choose another folder")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    # Written in a temporary folder and renamed when complete, so that an interrupted run leaves no half demo.
    partial = tempfile.mkdtemp(prefix=".demo-partial-", dir=os.path.dirname(root))
    try:
        rng = random.Random(0)
        for split, per_class in (("train", 200), ("val", 50)):
            for shape in DEMO_SHAPES:
                folder = os.path.join(partial, split, shape)
                os.makedirs(folder)
                for i in range(per_class):
                    draw_demo_image(shape, rng).save(os.path.join(folder, f"{shape}_{i:03d}.jpg"), quality=90)
        with open(os.path.join(partial, DEMO_MARKER), "w") as f:
            f.write(DEMO_VERSION)
        if demo_is_complete(root):  # another process (a parallel rank) finished first
            return root
        shutil.rmtree(root, ignore_errors=True)  # an incomplete or older demo
        try:
            os.rename(partial, root)
        except OSError:
            if not demo_is_complete(root):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def demo_is_complete(root):
    try:
        with open(os.path.join(root, DEMO_MARKER)) as f:
            return f.read() == DEMO_VERSION
    except OSError:
        return False


def draw_demo_image(shape, rng, size=64):
    """One filled shape of random size, position and rotation on a noisy greyish gradient background.

    Each shape has its own hue range (a colour shift of up to 20 degrees around DEMO_HUES) besides its outline:
    a cue that survives small random crops, so that a MobileNetV3 learns the demo in about a minute on a CPU.
    """
    # Background: a gradient between two random low-saturation colours along a random direction, plus noise.
    start, end = np.array(pale_colour(rng)), np.array(pale_colour(rng))
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    along = (x * np.cos(angle) + y * np.sin(angle) + 1.5) / 3
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 10, (size, size, 3))
    background = start + along[..., None] * (end - start) + noise
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))

    hue = DEMO_HUES[DEMO_SHAPES.index(shape)] + rng.uniform(-20, 20)
    red, green, blue = colorsys.hsv_to_rgb((hue % 360) / 360, rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0))
    colour = (round(255 * red), round(255 * green), round(255 * blue))
    radius = rng.uniform(0.3, 0.45) * size
    centre_x = size / 2 + rng.uniform(-0.12, 0.12) * size
    centre_y = size / 2 + rng.uniform(-0.12, 0.12) * size
    turn = rng.uniform(0, 2 * np.pi)

    def polygon(radii, corners):
        points = []
        for k in range(corners):
            a = turn + 2 * np.pi * k / corners
            r = radii[k % len(radii)]
            points.append((centre_x + r * np.cos(a), centre_y + r * np.sin(a)))
        return points

    draw = ImageDraw.Draw(image)
    if shape == "circle":
        r = radius * 0.85
        draw.ellipse((centre_x - r, centre_y - r, centre_x + r, centre_y + r), fill=colour)
    elif shape == "square":
        draw.polygon(polygon([radius], 4), fill=colour)
    elif shape == "triangle":
        draw.polygon(polygon([radius], 3), fill=colour)
    elif shape == "star":
        draw.polygon(polygon([radius, radius * 0.4], 10), fill=colour)
    elif shape == "cross":
        # two long thin bars at right angles
        centre = np.array([centre_x, centre_y])
        for bar in (turn, turn + np.pi / 2):
            along, across = np.array([np.cos(bar), np.sin(bar)]), np.array([-np.sin(bar), np.cos(bar)])
            corners = [centre + radius * (a * along + 0.3 * b * across)
                       for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
            draw.polygon([tuple(corner) for corner in corners], fill=colour)
    else:
        raise ValueError(f"unknown demo shape {shape!r}")
    return image


def pale_colour(rng):
    grey = rng.uniform(60, 200)
    return tuple(grey + rng.uniform(-25, 25) for _ in range(3))


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.demo_data",
                                     description="Make (or reuse) the demo dataset and print its path.")
    parser.add_argument("root", nargs="?", default="data/demo", help="folder for the demo (default: data/demo)")
    args = parser.parse_args(argv)
    try:
        print(make_demo_dataset(args.root))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # no permission, a file in the way
        print(f"error: cannot make the demo dataset in {os.path.abspath(args.root)}: {error.strerror or error}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
