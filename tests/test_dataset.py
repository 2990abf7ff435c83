"""Tests for dataset.py: the layouts it reads, odd and broken files, sampling, the listing cache and transforms
(the tools' tests are in test_tools.py). Every dataset here is a few tiny images generated in tmp_path."""
import csv
import inspect
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataset  # noqa: E402
import decode  # noqa: E402
import layouts  # noqa: E402
import utils  # noqa: E402
from conftest import REPO  # noqa: E402
from utils import DataError  # noqa: E402

# torchvision 0.29 deprecates its decoders: tests here call them directly, to compare (dataset.py silences only
# its own calls)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


# ----------------------------------------------------------------------------------------------------------
# Helpers: tiny generated images and dataset folders


def image_pixels(size=(40, 32), seed=0):
    """Smooth colour gradients with a little noise: JPEG keeps them close to the original."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 160, 3)
    pixels = base + np.stack([x * 2, y * 2, (x + y)], axis=-1) + rng.integers(0, 8, (height, width, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def save_image(path, mode="RGB", size=(40, 32), seed=0, format=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_pixels(size, seed)).convert(mode).save(path, format=format)
    return path


def make_class_folders(split_dir, classes, per_class=2, extension=".jpg"):
    for label, name in enumerate(classes):
        for i in range(per_class):
            save_image(Path(split_dir) / name / f"{name}_{i}{extension}", seed=10 * label + i)


def age_folders(root):
    """Give every folder under root an old modification time, so that any change to it is seen by the cache
    even within the file system's timestamp granularity."""
    for folder, _, _ in os.walk(root):
        os.utime(folder, ns=(10**18, 10**18))


@pytest.fixture
def class_folder_data(tmp_path):
    root = tmp_path / "data"
    make_class_folders(root / "train", ["b", "a", "c"])
    make_class_folders(root / "val", ["c", "a", "b"], per_class=1)
    return root


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def labelled_paths(index):
    return [(os.path.relpath(index.path(i), index.root), int(index.labels[i])) for i in range(len(index))]


# ----------------------------------------------------------------------------------------------------------
# Layouts and the class mapping


def test_class_folder_layout(class_folder_data, cache_dir):
    splits = layouts.find_dataset(class_folder_data, cache_dir)
    assert "class folders" in splits.layout
    assert splits.classes == ["a", "b", "c"]
    assert splits.classes == torchvision.datasets.ImageFolder(class_folder_data / "train").classes
    assert splits.class_names == ["a", "b", "c"]
    assert labelled_paths(splits.train) == [("a/a_0.jpg", 0), ("a/a_1.jpg", 0), ("b/b_0.jpg", 1),
                                            ("b/b_1.jpg", 1), ("c/c_0.jpg", 2), ("c/c_1.jpg", 2)]
    assert labelled_paths(splits.val) == [("a/a_0.jpg", 0), ("b/b_0.jpg", 1), ("c/c_0.jpg", 2)]
    # memory-safe index: numpy arrays, not lists of str
    assert splits.train.paths.dtype.kind == "S" and splits.train.labels.dtype == np.int64


def test_missing_val_folder_gives_no_val_split(tmp_path, cache_dir):
    make_class_folders(tmp_path / "train", ["a", "b"])
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert splits.val is None and len(splits.train) == 4


def test_val_with_a_subset_of_classes_uses_the_training_mapping(tmp_path, cache_dir):
    make_class_folders(tmp_path / "train", ["a", "b", "c"])
    make_class_folders(tmp_path / "val", ["c"])
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert labelled_paths(splits.val) == [("c/c_0.jpg", 2), ("c/c_1.jpg", 2)]


def test_val_class_unknown_to_training_is_named(tmp_path, cache_dir):
    make_class_folders(tmp_path / "train", ["a", "b"])
    make_class_folders(tmp_path / "val", ["a", "zebra"])
    with pytest.raises(DataError, match="zebra"):
        layouts.find_dataset(tmp_path, cache_dir)


def test_find_val_split_maps_by_name_onto_a_given_class_list(class_folder_data, cache_dir):
    classes = ["c", "x", "a", "b"]  # another order, and a class the folder does not have
    for path in (class_folder_data, class_folder_data / "val"):  # dataset root or the val folder itself
        index, layout = layouts.find_val_split(path, classes, cache_dir)
        assert labelled_paths(index) == [("a/a_0.jpg", 2), ("b/b_0.jpg", 3), ("c/c_0.jpg", 0)]
    with pytest.raises(DataError, match="'b'"):
        layouts.find_val_split(class_folder_data, ["a", "c"], cache_dir)


def make_kaggle_layout(root):
    images = root / "ILSVRC" / "Data" / "CLS-LOC"
    make_class_folders(images / "train", ["n01443537", "n01440764"], extension=".JPEG")
    truth = {"ILSVRC2012_val_00000001": "n01440764", "ILSVRC2012_val_00000002": "n01443537",
             "ILSVRC2012_val_00000003": "n01440764"}
    for i, name in enumerate(truth):
        save_image(images / "val" / f"{name}.JPEG", seed=i)
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for name, synset in truth.items():
            writer.writerow([name, f"{synset} 10 20 30 40 {synset} 1 2 3 4 "])
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\n"
                                                 "n01443537 goldfish, Carassius auratus\n")
    return images


def test_kaggle_layout(tmp_path, cache_dir):
    images = make_kaggle_layout(tmp_path)
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert "Kaggle" in splits.layout and "LOC_val_solution.csv" in splits.layout
    assert splits.classes == ["n01440764", "n01443537"]
    assert splits.class_names == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    assert len(splits.train) == 4
    expected = [("ILSVRC2012_val_00000001.JPEG", 0), ("ILSVRC2012_val_00000002.JPEG", 1),
                ("ILSVRC2012_val_00000003.JPEG", 0)]
    assert labelled_paths(splits.val) == expected
    index, _ = layouts.find_val_split(images / "val", splits.classes, cache_dir)  # the val folder itself
    assert labelled_paths(index) == expected


@pytest.mark.parametrize("label_file, lines, where", [
    ("val_labels.csv", ["filename,label", "v0.jpg,b", "v1.jpg,a", "v2.jpg,b"], "root"),
    ("val.txt", ["v0 b", "v1\ta", "", "v2   b"], "val"),
])
def test_flat_val_folder_with_a_label_file(tmp_path, cache_dir, label_file, lines, where):
    make_class_folders(tmp_path / "train", ["a", "b"])
    for i in range(3):
        save_image(tmp_path / "val" / f"v{i}.jpg", seed=i)
    (tmp_path / ("val" if where == "val" else "") / label_file).write_text("\n".join(lines) + "\n")
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert label_file in splits.layout
    assert labelled_paths(splits.val) == [("v0.jpg", 1), ("v1.jpg", 0), ("v2.jpg", 1)]


def test_flat_val_folder_errors(tmp_path, cache_dir):
    make_class_folders(tmp_path / "train", ["a", "b"])
    save_image(tmp_path / "val" / "v0.jpg")
    save_image(tmp_path / "val" / "v1.jpg")
    with pytest.raises(DataError, match="no label file"):
        layouts.find_dataset(tmp_path, cache_dir)
    (tmp_path / "labels.csv").write_text("v0.jpg,a\n")
    with pytest.raises(DataError, match="v1.jpg"):  # an image without a label
        layouts.find_dataset(tmp_path, cache_dir)
    for lines in ["v0.jpg,a\nv1.jpg,walrus\n", "v0.jpg,a\nv1.jpg,b\ngone.jpg,walrus\n"]:
        (tmp_path / "labels.csv").write_text(lines)
        with pytest.raises(DataError, match="walrus"):  # a label that is not a training class
            layouts.find_dataset(tmp_path, cache_dir)


def test_ilsvrc_tars_without_scipy_say_how_to_prepare_them(tmp_path, cache_dir, monkeypatch):
    for name in layouts.ILSVRC_TARS.values():
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy` fail
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match=r"pip install scipy.*train/<synset>/ and val/<synset>/") as error:
        layouts.find_dataset(tmp_path, cache_dir)
    assert "\n" not in str(error.value)


def test_ilsvrc_tars_are_extracted_with_torchvision(tmp_path, cache_dir, monkeypatch):
    for name in layouts.ILSVRC_TARS.values():
        (tmp_path / name).write_bytes(b"")
    extracted = []

    class FakeImageNet:  # stands in for torchvision.datasets.ImageNet, which extracts into <root>/<split>/<wnid>/
        def __init__(self, root, split):
            extracted.append(split)
            make_class_folders(Path(root) / split, ["n01440764", "n01443537"], per_class=1, extension=".JPEG")

    monkeypatch.setattr(torchvision.datasets, "ImageNet", FakeImageNet)
    monkeypatch.setitem(sys.modules, "scipy", types.ModuleType("scipy"))
    monkeypatch.setitem(sys.modules, "scipy.io", types.ModuleType("scipy.io"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert extracted == ["train", "val"]
    assert "tar" in splits.layout and len(splits.train) == 2 and len(splits.val) == 2


def test_missing_or_empty_folders_are_one_line_errors(tmp_path, cache_dir):
    cases = [(tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "is empty"),
             (tmp_path / "no_train", "no train/ folder"), (tmp_path / "no_classes", "no class folders"),
             (tmp_path / "no_images", "no image files")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_train" / "images").mkdir(parents=True)
    (tmp_path / "no_classes" / "train").mkdir(parents=True)
    (tmp_path / "no_classes" / "train" / "readme.txt").write_text("hello")
    (tmp_path / "no_images" / "train" / "a").mkdir(parents=True)
    (tmp_path / "no_images" / "train" / "a" / "notes.txt").write_text("hello")
    for path, message in cases:
        with pytest.raises(DataError, match=message) as error:
            layouts.find_dataset(path, cache_dir)
        assert "\n" not in str(error.value)


def test_non_image_and_hidden_files_are_ignored(tmp_path, cache_dir):
    train = tmp_path / "train"
    save_image(train / "a" / "x.jpg")
    save_image(train / "a" / "Y.JPEG")
    save_image(train / "a" / "z.PNG", format="PNG")
    save_image(train / "a" / "nested" / "w.jpeg")
    save_image(train / "a" / "._x.jpg")  # macOS resource fork
    save_image(train / "a" / ".hidden" / "v.jpg")
    (train / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "a" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (train / "a" / "notes.txt").write_text("not an image")
    save_image(train / ".ipynb_checkpoints" / "x.jpg")  # a hidden folder is not a class
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert splits.classes == ["a"]
    assert [path for path, _ in labelled_paths(splits.train)] == ["a/Y.JPEG", "a/nested/w.jpeg", "a/x.jpg",
                                                                  "a/z.PNG"]


def test_imagenet_class_names():
    synsets = [f"n{number:08d}" for number in range(1440764, 1440764 + 999)] + ["n15075141"]
    names = layouts.imagenet_class_names(synsets)
    assert names[0] == "tench" and names[-1] == "toilet tissue" and len(names) == 1000
    assert layouts.imagenet_class_names(synsets[:999]) == synsets[:999]  # not the 1000 ILSVRC classes
    assert layouts.imagenet_class_names(["cat", "dog"]) == ["cat", "dog"]


# ----------------------------------------------------------------------------------------------------------
# Decoding odd files, and bad files


@pytest.mark.parametrize("mode, format, name", [
    ("RGB", "JPEG", "rgb.jpg"), ("L", "JPEG", "gray.jpg"), ("CMYK", "JPEG", "cmyk.jpg"),
    ("P", "PNG", "palette.png"), ("RGBA", "PNG", "rgba.png"), ("RGB", "PNG", "png_named.JPEG"),
    ("L", "PNG", "gray.png"), ("RGB", "BMP", "x.bmp"), ("RGB", "TIFF", "x.tiff"), ("RGB", "WEBP", "x.webp"),
])
def test_odd_files_decode_to_rgb(tmp_path, mode, format, name):
    path = save_image(tmp_path / name, mode=mode, format=format)
    image = decode.decode_image_file(path)
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 40)
    assert (image.int() - expected.int()).abs().float().mean() < 1.0


@pytest.mark.parametrize("mode, format", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I;16", "PPM"),
                                          ("LA", "PNG"), ("1", "PNG"), ("YCbCr", "TIFF"), ("LAB", "TIFF")])
def test_every_mode_the_loader_accepts_decodes_to_its_true_picture(tmp_path, mode, format):
    """A grey ramp, with a bright half: each mode's pixels are the ramp's own, to within a grey level or two (16-bit
    greys were clipped to white by PIL's convert("RGB"))."""
    ramp = np.tile(np.linspace(0, 1, 40), (32, 1))
    if mode.startswith("I;16"):
        order = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (40, 32), (ramp * 65535).astype(order).tobytes())
    elif mode == "1":
        image, ramp = Image.fromarray((ramp > 0.5).astype(np.uint8) * 255).convert("1"), (ramp > 0.5) * 1.0
    else:
        image = Image.fromarray((ramp * 255).astype(np.uint8)).convert("RGB").convert(mode)
    image.save(tmp_path / f"x.{format.lower()}", format=format)
    with Image.open(tmp_path / f"x.{format.lower()}") as saved:  # 16-bit PGM opens as mode I
        assert saved.mode == ("I" if format == "PPM" else mode)  # the mode the loader really meets
    decoded = decode.decode_image_file(tmp_path / f"x.{format.lower()}").float()
    assert decoded.shape == (3, 32, 40)
    assert (decoded - torch.from_numpy(ramp * 255).float()).abs().max() <= 3, mode


@pytest.mark.parametrize("mode", ["I", "F"])
def test_pixels_without_a_fixed_range_are_refused_naming_why(tmp_path, mode):
    Image.fromarray(np.full((32, 40), 1000, dtype=np.int32 if mode == "I" else np.float32)).save(tmp_path / "x.tiff")
    with pytest.raises(ValueError, match="have no fixed range: save the image with 8"):
        decode.decode_image_file(tmp_path / "x.tiff")
    index = layouts.FileIndex(tmp_path, [b"x.tiff"], [0])
    with pytest.raises(DataError, match="cannot read image .*x.tiff: .* have no fixed range"):  # counted as unreadable
        dataset.ValidationImageFiles(index, None, strict=True)[0]


SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"  # only in the workspace


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="needs ../shared/data/imagenet-sample")
def test_real_imagenet_jpegs_decode_like_pil():
    files = sorted(SAMPLE.glob("*.JPEG"))
    grayscale = [path for path in files if Image.open(path).mode == "L"]
    for path in files[:10] + grayscale:
        expected = np.array(Image.open(path).convert("RGB"))
        assert np.array_equal(decode.decode_image_file(path).permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("format, name", [("WEBP", "scraped.JPEG"), ("WEBP", "scraped.jpg"), ("AVIF", "scraped.JPEG"),
                                          ("AVIF", "scraped.jpg")])
def test_webp_and_avif_named_jpeg_decode_to_rgb(tmp_path, format, name):
    from PIL import features
    if format == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow cannot write AVIF")
    path = tmp_path / name
    Image.fromarray(image_pixels()).save(path, format=format, quality=90)
    with Image.open(path) as image:
        assert image.format == format  # really a WebP/AVIF file, whatever its name says
        expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    decoded = decode.decode_image_file(path)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 32, 40)
    assert torch.equal(decoded, expected)
    assert (decoded.int() - torch.from_numpy(image_pixels()).permute(2, 0, 1).int()).abs().float().mean() < 4
    train = dataset.ImageFiles(layouts.FileIndex(tmp_path, [name.encode()], [0]), dataset.train_transform(16))
    assert train[(0, 1)][0].shape == (3, 16, 16)  # the training path (scaled decoding) takes it too


@pytest.mark.skipif(decode.torchcodec_decode_jpeg is None, reason="torchcodec is not installed")
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="needs ../shared/data/imagenet-sample")
def test_torchcodec_decodes_real_jpegs_as_torchvision_does():
    files = sorted(SAMPLE.glob("*.JPEG"))
    odd = [path for path in files if Image.open(path).mode == "L" or "exif" in Image.open(path).info]
    for path in files[:10] + odd:  # grayscale, and EXIF blocks (one after a Photoshop block, with an XMP block)
        data, _ = decode.read_image_file(path)
        image = decode.decode_jpeg_cpu(data)
        assert torch.equal(image, torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB))
        assert image.permute(1, 2, 0).is_contiguous()  # height-width-channel in memory, for the fast resize


def test_without_torchcodec_torchvision_decodes(tmp_path, monkeypatch):
    path = save_image(tmp_path / "x.jpg")
    expected = decode.decode_image_file(path)
    monkeypatch.setattr(decode, "torchcodec_decode_jpeg", None)
    assert torch.equal(decode.decode_image_file(path), expected)


def test_torchvision_decoders_run_without_their_deprecation_warning(tmp_path, monkeypatch, recwarn):
    # recwarn records every warning, whatever filters pytest or this file set: only dataset.py's silencing counts
    path = save_image(tmp_path / "x.jpg")
    monkeypatch.setattr(decode, "torchcodec_decode_jpeg", None)  # the CPU fallback: torchvision's decoder
    assert decode.decode_image_file(path).shape == (3, 32, 40)
    index = layouts.FileIndex(tmp_path, [b"x.jpg"], [0])
    images = dataset.EncodedImageFiles(index, 16)  # decoding on the device: torchvision's, on the CPU here
    dataset.EncodedImageFiles.check_device(torch.device("cpu"))
    decoded, _ = images.batch_to(torch.device("cpu"), *images.collate([images[0]]))
    assert decoded.shape == (1, 3, 16, 16)
    assert not [str(w.message) for w in recwarn if issubclass(w.category, DeprecationWarning)]
    if hasattr(torchvision.io.image, "_warn_deprecated"):  # torchvision >= 0.29: the warning exists to be silenced
        with pytest.warns(DeprecationWarning, match="decoding and encoding capabilities of TorchVision"):
            torchvision.io.decode_jpeg(decode.read_image_file(path)[0])


def test_a_device_no_decoder_works_on_is_one_line_naming_each_reason():
    # torchvision's decode_jpeg would decode on the CPU for "meta": not counted as working
    with pytest.raises(DataError, match=r"no JPEG decoder here works on meta \(TorchCodec: [^/\n]+; torchvision: "
                                        r"decodes on the CPU instead\); use --decode-on workers$") as error:
        dataset.EncodedImageFiles.check_device(torch.device("meta"))
    assert str(error.value).count("\n") == 0


def test_a_torchcodec_without_nvjpeg_hands_the_device_to_torchvision(monkeypatch):
    # a CPU-only torchcodec wheel imports, then refuses CUDA: torchvision decodes instead
    calls = []
    def torchcodec_without_nvjpeg(jpegs, mode, device):
        raise RuntimeError("decode_jpegs_cuda, x.cpp:1, torchcodec was not compiled with nvJPEG support")
    def torchvision_decoder(jpegs, mode, device):
        calls.append(device.type)
        return [torch.zeros(3, 8, 8, dtype=torch.uint8, device="meta") for _ in jpegs]
    monkeypatch.setattr(decode, "torchcodec_decode_jpeg", torchcodec_without_nvjpeg)
    monkeypatch.setattr(decode, "decode_jpeg", torchvision_decoder)
    decode.first_decoder_that_works_on.cache_clear()
    try:
        assert decode.device_jpeg_decoder(torch.device("meta")) == "torchvision"
        assert decode.decode_jpegs_on(torch.device("meta"), [torch.zeros(4, dtype=torch.uint8)])[0].is_meta
        assert calls == ["meta", "meta"]  # the probe, then the batch
    finally:
        decode.first_decoder_that_works_on.cache_clear()


def test_palette_with_transparency_decodes(tmp_path):
    path = tmp_path / "transparent.png"
    Image.fromarray(image_pixels()).convert("P").save(path, transparency=0)
    assert decode.decode_image_file(path).shape == (3, 32, 40)


def index_with_bad_files(tmp_path, count, bad):
    """The index of count images in train/a/, where bad maps position -> 'truncated' or 'empty'."""
    for i in range(count):
        path = save_image(tmp_path / "data" / "train" / "a" / f"{i:02d}.jpg", seed=i)
        if bad.get(i) == "truncated":
            path.write_bytes(path.read_bytes()[:300])
        elif bad.get(i) == "empty":
            path.write_bytes(b"")
    return layouts.find_dataset(tmp_path / "data", cache_dir=str(tmp_path / "cache")).train


def test_bad_files_are_skipped_counted_and_replaced_by_the_next(tmp_path, capsys):
    index = index_with_bad_files(tmp_path, 4, {1: "truncated", 2: "empty"})
    images = dataset.ImageFiles(index, transform=None)
    image, label = images[1]
    assert torch.equal(image, decode.decode_image_file(index.path(3)))
    assert images.skipped == 2
    warnings = capsys.readouterr().err
    assert "01.jpg" in warnings and "02.jpg" in warnings


def test_skip_count_is_seen_in_the_main_process_with_workers(tmp_path):
    index = index_with_bad_files(tmp_path, 8, {2: "truncated", 5: "empty"})
    images = dataset.ImageFiles(index, dataset.val_transform(16, 16))
    loader = dataset.build_loader(images, dataset.EpochSampler(len(images), shuffle=False), batch_size=4,
                                  workers=2, train=False)
    batch_sizes = [len(batch) for batch, _ in loader]
    assert batch_sizes == [4, 4]
    assert images.skipped == 2


def test_strict_mode_raises_naming_the_file(tmp_path):
    index = index_with_bad_files(tmp_path, 2, {1: "truncated"})
    with pytest.raises(DataError, match="01.jpg"):
        dataset.ImageFiles(index, transform=None, strict=True)[1]


def test_decompression_bomb_check_stays_on(tmp_path, monkeypatch):
    assert not re.search(r"MAX_IMAGE_PIXELS\s*=", inspect.getsource(dataset))  # PIL's limit is left alone
    jpeg = save_image(tmp_path / "big.jpg")
    png = save_image(tmp_path / "big.png", format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x32 pixels is then more than twice the limit
    for path in (jpeg, png):  # the libjpeg-turbo path and the PIL path
        with pytest.raises(Image.DecompressionBombError):
            decode.decode_image_file(path)
    index = layouts.FileIndex(tmp_path, [b"big.jpg"], [0])
    with pytest.raises(DataError, match="big.jpg"):
        dataset.ImageFiles(index, transform=None, strict=True)[0]


# ----------------------------------------------------------------------------------------------------------
# EpochSampler and the loader


def test_shuffled_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch):
        sampler = dataset.EpochSampler(20, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    torch.manual_seed(1)
    first = order(3, 2)
    torch.manual_seed(2)  # the global RNG plays no part
    assert order(3, 2) == first
    assert order(3, 3) != first and order(4, 2) != first
    assert sorted(index for index, _ in first) == list(range(20))
    assert len({seed for _, seed in first}) == 20


def test_shuffled_ranks_are_padded_disjoint_and_cover_everything():
    def rank_indices(num_samples, replicas, drop_last=False):
        shares = []
        for rank in range(replicas):
            sampler = dataset.EpochSampler(num_samples, True, seed=5, num_replicas=replicas, rank=rank,
                                           drop_last=drop_last)
            sampler.set_epoch(1)
            shares.append([index for index, _ in sampler])
            assert len(sampler) == len(shares[-1])
        return shares

    shares = rank_indices(12, 3)
    assert [len(share) for share in shares] == [4, 4, 4]
    assert sorted(sum(shares, [])) == list(range(12))  # disjoint and covering
    shares = rank_indices(10, 3)  # padded by wrapping around: two indices come twice
    assert [len(share) for share in shares] == [4, 4, 4] and set(sum(shares, [])) == set(range(10))
    assert sorted(np.bincount(sum(shares, []))) == [1] * 8 + [2] * 2
    shares = rank_indices(10, 3, drop_last=True)
    assert [len(share) for share in shares] == [3, 3, 3] and len(set(sum(shares, []))) == 9


def test_validation_ranks_count_every_image_once_without_padding():
    shares = [list(dataset.EpochSampler(10, shuffle=False, num_replicas=3, rank=rank)) for rank in range(3)]
    assert [len(share) for share in shares] == [4, 3, 3]
    assert sorted(sum(shares, [])) == list(range(10))
    assert all(isinstance(index, int) for index in shares[0])


@pytest.mark.parametrize("shuffle", [True, False])
def test_skip_batches_resumes_the_same_sequence(shuffle):
    sampler = dataset.EpochSampler(23, shuffle, seed=7, num_replicas=2, rank=1)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip_batches=2, batch_size=3)
    assert list(sampler) == full[6:] and len(sampler) == len(full) - 6
    sampler.set_epoch(5)  # the next epoch starts from its beginning again
    assert len(list(sampler)) == len(full)


def test_augmentation_is_identical_with_0_and_2_workers_and_after_a_resume(tmp_path):
    make_class_folders(tmp_path / "train", ["a", "b", "c"], per_class=4)
    splits = layouts.find_dataset(tmp_path, str(tmp_path / "cache"))
    images = dataset.ImageFiles(splits.train, dataset.train_transform(16, auto_augment="ta_wide",
                                                                       random_erase=0.5))

    def batches(workers, skip_batches=0):
        sampler = dataset.EpochSampler(len(images), shuffle=True, seed=1)
        sampler.set_epoch(3, skip_batches=skip_batches, batch_size=4)
        return list(dataset.build_loader(images, sampler, batch_size=4, workers=workers, train=True))

    in_process, with_workers = batches(0), batches(2)
    assert len(in_process) == 3
    for (images_0, labels_0), (images_2, labels_2) in zip(in_process, with_workers, strict=True):
        assert torch.equal(images_0, images_2) and torch.equal(labels_0, labels_2)
    resumed = batches(2, skip_batches=1)
    for (images_full, _), (images_resumed, _) in zip(in_process[1:], resumed, strict=True):
        assert torch.equal(images_full, images_resumed)


class WorkerPriority(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return os.nice(0)  # this process's niceness


@pytest.mark.skipif(not hasattr(os, "nice"), reason="no process priorities here")
def test_workers_keep_this_process_priority_unless_asked():
    """train.py's workers keep its priority (a lower one starved them next to busy processes); tools/benchmark.py
    measures the alternative through worker_nice."""
    def worker_priorities(**options):
        loader = dataset.build_loader(WorkerPriority(), dataset.EpochSampler(2, shuffle=False), batch_size=1,
                                      workers=1, train=False, **options)
        return [int(n) for n in loader]
    assert worker_priorities() == [os.nice(0)] * 2
    assert worker_priorities(worker_nice=10) == [min(19, os.nice(0) + 10)] * 2


# Exits normally with a persistent loader worker alive (which ignores SIGTERM) beside another child process.
EXIT_WITH_WORKERS = """
import atexit, multiprocessing, sys, time
sys.path.insert(0, {repo!r})
import dataset

def report():  # registered before build_loader registers end_loader_workers: atexit runs it after that one
    print("loader worker alive:", worker.is_alive(), "other child alive:", other.is_alive(), flush=True)

atexit.register(report)
other = multiprocessing.Process(target=time.sleep, args=(60,), daemon=True)  # not a loader worker
other.start()
loader = dataset.build_loader(list(range(4)), dataset.EpochSampler(4, shuffle=False), batch_size=2, workers=1,
                              train=False)
assert next(iter(loader)).tolist() == [0, 1]
(worker,) = [child for child in multiprocessing.active_children() if child is not other]
"""


def test_exit_ends_the_loader_workers_and_only_them():
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_WORKERS.format(repo=REPO)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "loader worker alive: False other child alive: True" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
def test_decoding_on_the_device_gives_the_workers_images_exactly(tmp_path, monkeypatch, decoder):
    if decoder == "torchvision":  # what decodes on the device where torchcodec does not import
        monkeypatch.setattr(decode, "torchcodec_decode_jpeg", None)
    elif decode.torchcodec_decode_jpeg is None:
        pytest.skip("torchcodec is not installed")
    make_class_folders(tmp_path / "train", ["a", "b"], per_class=4)
    save_image(tmp_path / "train" / "a" / "gray.jpg", mode="L", size=(50, 30))
    for orientation in (3, 5, 6, 8):  # phone photos: torchcodec turns them by the tag; the crop box is the stored image's
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(photo_like_pixels((60, 36), seed=orientation)).save(
            tmp_path / "train" / "a" / f"turned{orientation}.jpg", exif=exif)
    save_image(tmp_path / "train" / "b" / "cmyk.jpg", mode="CMYK", size=(30, 50))
    save_image(tmp_path / "train" / "b" / "png_named.jpg", format="PNG")  # decoded and cropped in the worker
    splits = layouts.find_dataset(tmp_path, str(tmp_path / "cache"))
    # the device decodes every JPEG at full size: it matches the workers' path without scaled decoding
    on_workers = dataset.ImageFiles(splits.train, dataset.train_transform(16, min_scale=0.3), scaled_decoding=False)
    on_device = dataset.EncodedImageFiles(splits.train, 16, min_scale=0.3)

    def batches(images, workers):
        sampler = dataset.EpochSampler(len(images), shuffle=True, seed=2)
        sampler.set_epoch(1)
        return list(dataset.build_loader(images, sampler, batch_size=5, workers=workers, train=True))

    expected, encoded = batches(on_workers, 0), batches(on_device, 2)
    assert len(expected) == 3  # all 15 images
    assert sum(len(batch.finished) for batch, _ in encoded) == 2  # the PNG and the CMYK JPEG, in the worker
    for (images, labels), (batch, batch_labels) in zip(expected, encoded, strict=True):
        decoded, decoded_labels = on_device.batch_to(torch.device("cpu"), batch, batch_labels)
        assert decoded.dtype == torch.uint8 and decoded.shape == (5, 3, 16, 16)
        assert torch.equal(decoded, images) and torch.equal(decoded_labels, labels)


def test_device_decoding_replaces_a_broken_jpeg_with_the_batch_neighbour(tmp_path, capsys, monkeypatch):
    index = index_with_bad_files(tmp_path, 4, {})
    path = save_image(index.path(2), size=(200, 150))
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # the header reads, the pixels do not
    images = dataset.EncodedImageFiles(index, 16)
    batch, labels = images.collate([images[i] for i in (2, 1, 3)])
    decoded, labels = images.batch_to(torch.device("cpu"), batch, labels)
    assert torch.equal(decoded[0], decoded[1])  # the first is broken: the next good one stands in
    assert not torch.equal(decoded[1], decoded[2])
    assert images.skipped == 1
    warning = capsys.readouterr().err
    assert "02.jpg" in warning and "truncated" in warning and ".cpp" not in warning
    with pytest.raises(DataError, match="02.jpg"):
        strict = dataset.EncodedImageFiles(index, 16, strict=True)
        strict.batch_to(torch.device("cpu"), *strict.collate([strict[2], strict[1]]))
    # a batch of nothing but broken files: the next readable file of the index stands in
    alone, label = images.batch_to(torch.device("cpu"), *images.collate([images[2]]))
    assert alone.shape == (1, 3, 16, 16) and label.tolist() == [int(index.labels[3])]
    assert images.skipped == 2
    # a failing device is not a bad file: as torch raises it, and as the decoders pass it on (a plain RuntimeError)
    for failure in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
                    RuntimeError("decode_jpegs_cuda, DecodeJpegCuda.cpp:170, CUDA out of memory. Tried to allocate 2 MiB"),
                    RuntimeError("Error while decoding JPEG images: CUDA error: an illegal memory access was encountered")):
        def failing_decoder(*args, **kwargs):
            raise failure
        monkeypatch.setattr(decode, "torchcodec_decode_jpeg", failing_decoder)
        monkeypatch.setattr(decode, "decode_jpeg", failing_decoder)
        with pytest.raises(RuntimeError, match="out of memory|CUDA error"):
            images.batch_to(torch.device("cpu"), *images.collate([images[1], images[3]]))
        assert images.skipped == 2


def test_device_decoding_draws_a_new_crop_for_each_unseeded_sample(tmp_path):
    index = index_with_bad_files(tmp_path, 4, {})
    images = dataset.EncodedImageFiles(index, 16)
    plans = [images[0][1][1:].tolist() for _ in range(4)]
    assert len({tuple(plan) for plan in plans}) > 1


# ----------------------------------------------------------------------------------------------------------
# Scaled JPEG decoding (DCT scaling for large RandomResizedCrop boxes)


def photo_like_pixels(size, seed):
    """A photograph's statistics, roughly: smooth colour fields, a few hard-edged shapes, fine noise. A gradient
    in x and y besides, so that a crop taken from the wrong place or flipped shows as a large difference."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    field = np.stack([80 + 120 * x, 60 + 140 * y, 100 + 60 * np.sin(2 * np.pi * (x + y))], axis=-1)
    for _ in range(3):  # low-frequency texture
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        field += rng.uniform(5, 20, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)[..., None]
    image = Image.fromarray((field + rng.normal(0, 3, field.shape)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        draw.ellipse((x0, y0, x0 + rng.integers(10, width // 3), y0 + rng.integers(10, height // 3)),
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return np.array(image)


def photo_like_index(tmp_path, count=6, size=(400, 300), mode="RGB"):
    for i in range(count):
        path = tmp_path / "train" / "a" / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like_pixels(size, seed=i)).convert(mode).save(path, quality=90)
    return layouts.find_dataset(tmp_path, str(tmp_path / "cache")).train


def test_dct_scale_is_the_smallest_that_keeps_the_output_resolution():
    assert decode.dct_scale(512, 600, 64, 64) == 8
    assert decode.dct_scale(511, 600, 64, 64) == 4  # 511 / 8 < 64
    assert decode.dct_scale(600, 255, 64, 64) == 2  # the narrower side decides
    assert decode.dct_scale(127, 400, 64, 64) == 1
    assert decode.dct_scale(448, 224, 224, 112) == 2  # a non-square output


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_scaled_decoding_keeps_the_crop_and_flip_and_is_within_a_few_grey_levels(tmp_path, monkeypatch, mode):
    index = photo_like_index(tmp_path, mode=mode)
    full = dataset.ImageFiles(index, dataset.train_transform(32), scaled_decoding=False)
    scaled = dataset.ImageFiles(index, dataset.train_transform(32))
    scales = []
    reduced = decode.decode_jpeg_crop_reduced
    monkeypatch.setattr(decode, "decode_jpeg_crop_reduced",
                        lambda data, scale, *rest: scales.append(scale) or reduced(data, scale, *rest))
    differences = []
    for i in range(len(index)):
        for seed in range(8):
            expected, label = full[(i, seed)]
            image, scaled_label = scaled[(i, seed)]
            assert image.shape == expected.shape == (3, 32, 32) and image.dtype == torch.uint8
            assert label == scaled_label
            differences.append((image.int() - expected.int()).abs().float().mean().item())
    assert {2, 4, 8} <= set(scales)  # every scale was used (boxes of 64 to 400 px for a 32 px output)
    # Measured: at most 1.1 levels, 0.55 on average. A box taken elsewhere or a flip not drawn alike gives tens of
    # levels; box edges rounded to whole reduced pixels (up to half an output pixel off) give up to 3.4.
    assert max(differences) < 2.0 and np.mean(differences) < 1.0, (max(differences), np.mean(differences))


def test_scaled_decoding_gives_small_boxes_the_full_decode_exactly(tmp_path):
    index = photo_like_index(tmp_path, count=3, size=(120, 90))  # boxes under 2 x 224 px: never reduced
    full = dataset.ImageFiles(index, dataset.train_transform(224, auto_augment="ta_wide"), scaled_decoding=False)
    scaled = dataset.ImageFiles(index, dataset.train_transform(224, auto_augment="ta_wide"))
    for i in range(len(index)):
        assert torch.equal(full[(i, 5 + i)][0], scaled[(i, 5 + i)][0])


def test_reduced_decode_of_the_whole_image_is_close_to_the_full_decode_resized(tmp_path):
    path = photo_like_index(tmp_path, count=1, size=(400, 296)).path(0)  # 296 / 8 = 37: the reduced size
    data, size = decode.read_image_file(path)
    full = decode.decode_jpeg(data, mode=decode.ImageReadMode.RGB)
    for scale in (2, 4, 8):
        out = (size[0] // scale, size[1] // scale)
        reduced = decode.decode_jpeg_crop_reduced(data, scale, (0, 0, *size), out)
        expected = torchvision.transforms.v2.functional.resize(full, list(out), antialias=True)
        assert reduced.shape == (3, *out)
        assert (reduced.int() - expected.int()).abs().float().mean() < 2.0


def test_scaled_decoding_replaces_a_bad_file_with_the_next_one_and_its_own_crop(tmp_path, capsys):
    index = photo_like_index(tmp_path, count=3)
    path = Path(index.path(1))
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 3])  # the header reads, the pixels do not
    full = dataset.ImageFiles(index, dataset.train_transform(32), scaled_decoding=False)
    scaled = dataset.ImageFiles(index, dataset.train_transform(32))
    for seed in range(6):
        # the next file (2) stands in, with the crop and flip the seed gives it without scaled decoding, as if
        # the bad file had consumed no random numbers
        expected, _ = full[(1, seed)]
        image, label = scaled[(1, seed)]
        assert label == int(index.labels[2])
        assert (image.int() - expected.int()).abs().float().mean() < 4.0
    assert scaled.skipped == 6 and "01.jpg" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The listing cache


@pytest.fixture
def count_scans(monkeypatch):
    scans = []
    scan = layouts.scan_class_folders

    def counting_scan(split_dir, classes):
        scans.append(split_dir)
        return scan(split_dir, classes)

    monkeypatch.setattr(layouts, "scan_class_folders", counting_scan)
    return scans


def test_index_cache_is_reused_until_a_folder_changes(tmp_path, cache_dir, count_scans):
    make_class_folders(tmp_path / "train", ["a", "b"])
    age_folders(tmp_path)
    first = layouts.find_dataset(tmp_path, cache_dir)
    second = layouts.find_dataset(tmp_path, cache_dir)
    assert len(count_scans) == 1
    assert labelled_paths(second.train) == labelled_paths(first.train) and second.classes == first.classes

    make_class_folders(tmp_path / "train", ["c"], per_class=1)  # a new class folder
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert len(count_scans) == 2 and splits.classes == ["a", "b", "c"]

    age_folders(tmp_path)
    layouts.find_dataset(tmp_path, cache_dir)
    save_image(tmp_path / "train" / "a" / "new.jpg")  # a new file in a class folder
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert len(count_scans) == 4 and len(splits.train) == 6


def test_corrupt_cache_is_rebuilt(tmp_path, cache_dir, count_scans):
    make_class_folders(tmp_path / "train", ["a", "b"])
    layouts.find_dataset(tmp_path, cache_dir)
    for cache_file in Path(cache_dir).iterdir():
        cache_file.write_bytes(b"PK\3\4 not a zip file")
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert len(count_scans) == 2 and len(splits.train) == 4
    assert len(layouts.find_dataset(tmp_path, cache_dir).train) == 4 and len(count_scans) == 2


def test_read_only_data_folder_and_unwritable_cache(tmp_path, cache_dir):
    data = tmp_path / "data"
    make_class_folders(data / "train", ["a", "b"])
    before = sorted(path for path in data.rglob("*"))
    for folder, _, _ in os.walk(data):
        os.chmod(folder, 0o555)
    try:
        assert len(layouts.find_dataset(data, cache_dir).train) == 4
        not_a_folder = tmp_path / "file"
        not_a_folder.write_text("a file where the cache folder should be")
        assert len(layouts.find_dataset(data, str(not_a_folder)).train) == 4
    finally:
        for folder, _, _ in os.walk(data):
            os.chmod(folder, 0o755)
    assert sorted(path for path in data.rglob("*")) == before  # nothing written into the data folder
    assert list(Path(cache_dir).glob("index-*.npz"))


# ----------------------------------------------------------------------------------------------------------
# Transforms, normalization, MixUp/CutMix


@pytest.mark.parametrize("auto_augment", [None, "ra", "ta_wide", "imagenet"])
def test_train_transform_gives_uint8_crops(auto_augment):
    image = torch.from_numpy(image_pixels((50, 40))).permute(2, 0, 1)
    out = dataset.train_transform(32, auto_augment=auto_augment, random_erase=0.25)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)



@pytest.mark.parametrize("policy, make_policy", [
    ("ra", lambda: torchvision.transforms.v2.RandAugment()),
    ("ta_wide", lambda: torchvision.transforms.v2.TrivialAugmentWide()),
    ("imagenet", lambda: torchvision.transforms.v2.AutoAugment(torchvision.transforms.v2.AutoAugmentPolicy.IMAGENET))],
    ids=["ra", "ta_wide", "imagenet"])
def test_auto_augment_applies_its_policy_after_the_crop_and_flip(tiny_data, tmp_path, policy, make_policy):
    """train.py --auto-augment: a training sample is the plain sample (the same crop box and flip, drawn first from
    the sample's seed) put through the policy, which draws next from that seed; the policy changes most samples."""
    import flags
    import train
    from conftest import tiny_train_args

    def training_set(*extra):
        args = flags.get_args_parser().parse_args(tiny_train_args(tiny_data, tmp_path, *extra))
        config = flags.resolve_config(args, torch.device("cpu"), str(tmp_path / "ckpt"), "t")
        return train.build_data(config, 0, 1, torch.device("cpu")).train_set
    plain, augmented = training_set(), training_set("--auto-augment", policy)
    changed = 0
    for position, seed in zip(range(0, 48, 3), range(1000, 1016)):
        cropped = plain[(position, seed)][0]
        with dataset.sample_rng(seed):
            plain.transform(decode.decode_image_file(plain.index.path(position)))  # the crop's and flip's draws
            expected = make_policy()(cropped)
        sample = augmented[(position, seed)][0]
        assert torch.equal(sample, expected), (policy, position)
        changed += not torch.equal(sample, cropped)
    assert changed >= 10, changed  # of 16 (a policy may draw the identity, or leave a flat image alone)


def test_val_transform_and_unknown_auto_augment():
    image = torch.from_numpy(image_pixels((50, 40))).permute(2, 0, 1)
    out = dataset.val_transform(36, 32)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="auto_augment"):
        dataset.train_transform(32, auto_augment="bogus")


@pytest.mark.parametrize("norm", ["imagenet", "legacy"])
def test_random_erasing_fills_with_the_mean(norm):
    torch.manual_seed(0)
    white = torch.full((3, 40, 40), 255, dtype=torch.uint8)
    erased = dataset.train_transform(32, random_erase=1.0, norm=norm)(white)
    normalized = dataset.normalize_batch(erased[None], *dataset.NORMS[norm])[0]
    changed = (erased != 255).any(dim=0)
    assert changed.any()
    assert normalized[:, changed].abs().max() < 0.02  # the mean colour, rounded to uint8, normalizes to ~0


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_batch_matches_the_formula(channels_last):
    images = torch.randint(0, 256, (2, 3, 8, 6), dtype=torch.uint8)
    mean, std = dataset.NORMS["imagenet"]
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = dataset.normalize_batch(images, mean, std, channels_last=channels_last)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_mixup_cutmix():
    assert dataset.make_mixup_cutmix(0.0, 0.0, 10) is None
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 9, 3])
    for mixup_alpha, cutmix_alpha in [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)]:
        mixed, soft = dataset.make_mixup_cutmix(mixup_alpha, cutmix_alpha, 10)(images, labels)
        assert mixed.shape == images.shape and soft.shape == (4, 10)
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))
    both = dataset.make_mixup_cutmix(0.2, 1.0, 10)  # one of the two, chosen per batch
    assert sorted(type(transform).__name__ for transform in both.transforms) == ["CutMix", "MixUp"]


# ----------------------------------------------------------------------------------------------------------
# Validation leaves unreadable files out; symlinks, empty class folders, nested folders and the cache; EXIF


def test_validation_leaves_out_unreadable_files_names_them_and_warns_once(tmp_path, capfd):
    # 8 files, batches of 3: [0 1 2] [3 4 5] [6 7]; 2 and 5 are bad, and the last batch is bad throughout
    index = index_with_bad_files(tmp_path, 8, {2: "truncated", 5: "empty", 6: "empty", 7: "truncated"})
    images = dataset.ValidationImageFiles(index, dataset.val_transform(16, 16))
    loader = dataset.build_loader(images, dataset.EpochSampler(len(images), shuffle=False), batch_size=3,
                                  workers=2, train=False)
    for _ in range(2):  # a second pass (the EMA weights) neither warns again nor counts again
        batches = [(batch.shape[0], labels.tolist()) for batch, labels in loader]
        assert batches == [(2, [0, 0]), (2, [0, 0]), (0, [])]
    assert images.skipped == 4
    assert [os.path.basename(path) for path in images.unreadable_files()] == ["02.jpg", "05.jpg", "06.jpg", "07.jpg"]
    err = capfd.readouterr().err  # the workers write to the file descriptor
    assert err.count("02.jpg") == 1 and err.count("07.jpg") == 1 and "empty file (0 bytes)" in err
    assert "BytesIO" not in err
    with pytest.raises(DataError, match="02.jpg"):
        dataset.ValidationImageFiles(index, None, strict=True)[2]


def test_symlink_loops_and_links_out_of_a_class_folder_are_not_followed(tmp_path, cache_dir, capsys):
    train = tmp_path / "train"
    make_class_folders(train, ["a", "b"], per_class=1)
    save_image(train / "a" / "sub" / "deep.jpg")
    save_image(tmp_path / "elsewhere" / "linked.jpg")
    os.symlink(".", train / "a" / "loop")                         # a loop
    os.symlink("..", train / "b" / "up")                          # into the other classes
    os.symlink("sub", train / "a" / "alias")                      # a second way into a folder already listed
    os.symlink(train / "a" / "loop", train / "b" / "far")         # a link to a link out of b's tree
    os.symlink("ping", train / "a" / "pong")                      # links that lead to each other
    os.symlink("pong", train / "a" / "ping")
    os.symlink(tmp_path / "elsewhere" / "linked.jpg", train / "b" / "linked.jpg")  # a symlinked file: followed
    splits = layouts.find_dataset(tmp_path, cache_dir)
    assert labelled_paths(splits.train) == [("a/a_0.jpg", 0), ("a/sub/deep.jpg", 0), ("b/b_0.jpg", 1),
                                            ("b/linked.jpg", 1)]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for link in ("a/loop", "b/up", "b/far", "a/ping", "a/alias"):
        assert str(train / link) in err, link


def test_cache_sees_changes_in_nested_subfolders(tmp_path, cache_dir, count_scans):
    make_class_folders(tmp_path / "train", ["a", "b"])
    save_image(tmp_path / "train" / "a" / "batch2" / "old.jpg")
    age_folders(tmp_path)
    assert len(layouts.find_dataset(tmp_path, cache_dir).train) == 5
    assert len(layouts.find_dataset(tmp_path, cache_dir).train) == 5 and len(count_scans) == 1
    for i in range(5):  # five files added two levels down: the class folder's own time does not change
        save_image(tmp_path / "train" / "a" / "batch2" / f"new_{i}.jpg")
    assert len(layouts.find_dataset(tmp_path, cache_dir).train) == 10 and len(count_scans) == 2
    age_folders(tmp_path)
    layouts.find_dataset(tmp_path, cache_dir)
    (tmp_path / "train" / "a" / "batch2" / "old.jpg").unlink()  # a file removed there
    assert len(layouts.find_dataset(tmp_path, cache_dir).train) == 9 and len(count_scans) == 4


def test_empty_class_folders_are_refused_for_training_and_a_single_class_is_warned(tmp_path, cache_dir, capsys):
    make_class_folders(tmp_path / "data" / "train", ["a", "b"])
    (tmp_path / "data" / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images") as error:
        layouts.find_dataset(tmp_path / "data", cache_dir)
    assert "\n" not in str(error.value)
    (tmp_path / "data" / "train" / "empty").rmdir()
    make_class_folders(tmp_path / "data" / "val", ["a"], per_class=1)
    (tmp_path / "data" / "val" / "b").mkdir()  # in validation a subset is fine: only a warning
    splits = layouts.find_dataset(tmp_path / "data", cache_dir)
    assert len(splits.val) == 1 and "val/b holds no images" in capsys.readouterr().err

    make_class_folders(tmp_path / "one" / "train", ["a"])
    layouts.find_dataset(tmp_path / "one", cache_dir)
    err = capsys.readouterr().err
    assert "single class (a)" in err and err.count("\n") == 1
    with pytest.raises(DataError, match="not one of the 1 training class$"):
        layouts.find_val_split(tmp_path / "data", ["z"], cache_dir)


def test_warnings_in_the_main_process_go_through_tqdm_write(monkeypatch):
    written = []
    monkeypatch.setattr(utils.tqdm, "write", lambda text, file=None: written.append((text, file)))
    utils.warn("a message")
    assert written == [("warning: a message", sys.stderr)]
    assert utils.plural(1, "class") == "1 class" and utils.plural(2, "image") == "2 images"
    assert utils.plural(2, "class") == "2 classes" and utils.plural(3, "epoch") == "3 epochs"


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_every_exif_orientation_turns_as_pillow_does(tmp_path, monkeypatch, format, orientation, decoder):
    if decoder == "torchvision":  # what decodes where torchcodec does not import
        monkeypatch.setattr(decode, "torchcodec_decode_jpeg", None)
    elif decode.torchcodec_decode_jpeg is None:
        pytest.skip("torchcodec is not installed")
    path = tmp_path / f"turned.{format.lower()}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(photo_like_pixels((64, 48), seed=orientation)).save(path, format=format, exif=exif)
    upright = decode.decode_image_file(path, exif_orientation=True)
    with Image.open(path) as image:
        expected = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    assert upright.permute(1, 2, 0).shape == expected.shape
    assert np.abs(upright.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 2
    assert upright.permute(1, 2, 0).is_contiguous()
    # training and validation: the stored pixels, whatever the tag says (torchcodec would turn JPEGs by it: the tags are set to 1 first)
    stored = decode.decode_image_file(path)
    with Image.open(path) as image:
        assert np.abs(stored.permute(1, 2, 0).numpy().astype(int) - np.array(image.convert("RGB"))).max() <= 2
    assert stored.permute(1, 2, 0).is_contiguous()
    if format == "JPEG":
        data, _ = decode.read_image_file(path)
        assert torch.equal(stored, torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB))
        train = dataset.ImageFiles(layouts.FileIndex(tmp_path, [path.name.encode()], [0]),
                                   dataset.train_transform(64, min_scale=1.0), scaled_decoding=False)
        assert torch.equal(train[(0, 3)][0], torchvision.transforms.v2.functional.resize(stored, [64, 64]))


@pytest.mark.parametrize("extra", [b"\x00\x00", b"\xff\xd0"])  # stray bytes, a marker without a length
def test_a_tag_behind_odd_bytes_still_gives_the_stored_pixels(tmp_path, extra):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo_like_pixels((64, 48), seed=3)).save(tmp_path / "plain.jpg", exif=exif)
    data = (tmp_path / "plain.jpg").read_bytes()
    app1 = data.index(b"\xff\xe1")  # the EXIF segment: the odd bytes just before it; libjpeg reads past them
    (tmp_path / "odd.jpg").write_bytes(data[:app1] + extra + data[app1:])
    stored = decode.decode_image_file(tmp_path / "odd.jpg")
    with Image.open(tmp_path / "plain.jpg") as image:
        assert stored.shape == (3, image.height, image.width)
        assert np.abs(stored.permute(1, 2, 0).numpy().astype(int) - np.array(image.convert("RGB"))).max() <= 2


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_only_when_asked(tmp_path, format):
    path = tmp_path / f"phone.{format.lower()}"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it 90 degrees clockwise
    Image.fromarray(image_pixels((40, 32))).save(path, format=format, exif=exif)
    stored = decode.decode_image_file(path)
    upright = decode.decode_image_file(path, exif_orientation=True)
    assert stored.shape == (3, 32, 40) and upright.shape == (3, 40, 32)
    with Image.open(path) as image:
        expected = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.abs(upright.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 2
    assert torch.equal(upright, torch.rot90(stored, -1, dims=(1, 2)))


# ----------------------------------------------------------------------------------------------------------
# Importing


def test_importing_changes_no_warning_filter_and_registers_no_exit_handler():
    probe = f"""
import atexit, sys, warnings
sys.path.insert(0, {REPO!r})
import numpy, PIL.Image, torch, torchvision.io, tqdm, utils  # what the modules import: their own effects aside
try:
    import torchcodec.decoders
except Exception:
    pass
filters, exit_handlers = list(warnings.filters), atexit._ncallbacks()
import dataset, decode, evaluate, export, layouts, model
assert warnings.filters == filters, [f for f in warnings.filters if f not in filters]
assert atexit._ncallbacks() == exit_handlers
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
