"""Tests for the tools in tools/: the pre-resized copy, the demo dataset and the data summary. Every dataset here is a
few tiny images generated in tmp_path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decode  # noqa: E402
import layouts  # noqa: E402
from conftest import REPO, assert_clean_error, run_script  # noqa: E402
from utils import DataError  # noqa: E402
from test_dataset import labelled_paths, make_class_folders, make_kaggle_layout, save_image  # noqa: E402
from tools import demo_data, resize_copy  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------------
# tools/resize_copy.py: the pre-resized copy


def image_sizes(root):
    """{path relative to root: (width, height, format)} of every image file under root."""
    sizes = {}
    for path in sorted(Path(root).rglob("*")):
        if layouts.is_image_name(path.name) and path.is_file():
            with Image.open(path) as image:
                sizes[str(path.relative_to(root))] = (*image.size, image.format)
    return sizes


def resize_checking_the_sigterm_handler(task):
    """In place of resize_copy.resize_image_file, in a forked copy worker (the patch is inherited by the fork)."""
    import signal
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        raise AssertionError("the copy worker would survive SIGTERM")
    return "resized", None


def test_resized_copy_workers_end_at_sigterm_even_under_a_parent_s_handler(tmp_path, monkeypatch):
    """Pool.terminate ends its workers with SIGTERM; workers forked from a process with a SIGTERM handler of its
    own (train.py's StopRequest, left installed by a run before this change) inherited it and could leave the
    copy waiting forever for a worker that would not end."""
    import signal
    source = tmp_path / "source"
    for name in ("a", "b"):
        save_image(source / "train" / name / "x.jpg", size=(60, 40))

    monkeypatch.setattr(resize_copy, "resize_image_file", resize_checking_the_sigterm_handler)
    previous = signal.signal(signal.SIGTERM, lambda *args: None)  # a parent that handles SIGTERM itself
    try:
        counts = resize_copy.make_resized_copy(source, tmp_path / "copy", short_side=32, workers=2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert counts["resized"] == 2


def test_resized_copy_has_the_shorter_side_the_aspect_ratio_and_the_labels(tmp_path, cache_dir):
    source = tmp_path / "source"
    save_image(source / "train" / "a" / "wide.jpg", size=(100, 60))
    save_image(source / "train" / "a" / "tall_gray.jpg", mode="L", size=(45, 101))
    save_image(source / "train" / "b" / "small.jpg", size=(30, 24))  # smaller already: copied as it is
    save_image(source / "train" / "b" / "small.png", format="PNG", size=(20, 28))  # re-encoded, never enlarged
    save_image(source / "train" / "b" / "cmyk.jpg", mode="CMYK", size=(64, 64))
    save_image(source / "train" / "b" / "nested" / "png_named.JPEG", format="PNG", size=(90, 70))
    save_image(source / "val" / "b" / "v.jpg", size=(77, 33))
    counts = resize_copy.make_resized_copy(source, tmp_path / "copy", short_side=32, workers=2)
    assert counts == {"resized": 6, "unchanged": 1, "done before": 0, "unreadable": 0}
    before, after = image_sizes(source), image_sizes(tmp_path / "copy")
    assert before.keys() == after.keys()
    for name, (width, height, _) in before.items():
        new_width, new_height, format = after[name]
        scale = min(1.0, 32 / min(width, height))
        assert min(new_width, new_height) == min(32, width, height), name
        assert abs(new_width - width * scale) <= 1 and abs(new_height - height * scale) <= 1, name
        assert format == "JPEG"
    assert (tmp_path / "copy" / "train" / "b" / "small.jpg").read_bytes() == \
        (source / "train" / "b" / "small.jpg").read_bytes()
    assert Image.open(tmp_path / "copy" / "train" / "a" / "tall_gray.jpg").mode == "L"
    original, copy = layouts.find_dataset(source, cache_dir), layouts.find_dataset(tmp_path / "copy", cache_dir)
    assert copy.classes == original.classes and copy.layout == original.layout
    assert labelled_paths(copy.train) == labelled_paths(original.train)
    assert labelled_paths(copy.val) == labelled_paths(original.val)
    # the pixels are the original's, smaller: compare with the original resized the same way
    resized = decode.decode_image_file(tmp_path / "copy" / "train" / "a" / "wide.jpg")
    expected = torchvision.transforms.v2.functional.resize(
        decode.decode_image_file(source / "train" / "a" / "wide.jpg"), [32, 53], antialias=True)
    assert resized.shape == (3, 32, 53) and (resized.int() - expected.int()).abs().float().mean() < 3.0
    assert "short side 32" in (tmp_path / "copy" / resize_copy.RESIZED_MARKER).read_text()


def test_resized_copy_of_the_kaggle_layout_keeps_its_label_and_mapping_files(tmp_path, cache_dir):
    make_kaggle_layout(tmp_path / "kaggle")
    resize_copy.make_resized_copy(tmp_path / "kaggle", tmp_path / "copy", short_side=16, workers=1)
    original = layouts.find_dataset(tmp_path / "kaggle", cache_dir)
    copy = layouts.find_dataset(tmp_path / "copy", cache_dir)
    assert "Kaggle" in copy.layout and copy.layout == original.layout
    assert copy.class_names == original.class_names == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    assert labelled_paths(copy.val) == labelled_paths(original.val)
    assert labelled_paths(copy.train) == labelled_paths(original.train)
    assert all(min(width, height) == 16 for width, height, _ in image_sizes(tmp_path / "copy").values())


def test_interrupted_resized_copy_resumes_without_redoing_finished_files(tmp_path, cache_dir):
    make_class_folders(tmp_path / "source" / "train", ["a", "b"], per_class=4)
    copy = tmp_path / "copy"
    resize_copy.make_resized_copy(tmp_path / "source", copy, short_side=20, workers=2)
    # What an interrupted run leaves: some files written, some not, a temporary file, no completion marker
    (copy / resize_copy.RESIZED_MARKER).unlink()
    for name in ("a/a_1.jpg", "b/b_3.jpg"):
        (copy / "train" / name).unlink()
    (copy / "train" / "b" / ".b_3.jpg.partial-12345").write_bytes(b"half a file")
    finished = {path: path.stat().st_ino for path in (copy / "train").rglob("*.jpg")}
    counts = resize_copy.make_resized_copy(tmp_path / "source", copy, short_side=20, workers=2)
    assert counts == {"resized": 2, "unchanged": 0, "done before": 6, "unreadable": 0}
    assert all(path.stat().st_ino == inode for path, inode in finished.items())  # not written again
    assert (copy / resize_copy.RESIZED_MARKER).exists()
    assert len(layouts.find_dataset(copy, cache_dir).train) == 8  # the temporary file is no image


def test_resized_copy_reports_bad_files_and_refuses_bad_input(tmp_path, capsys):
    make_class_folders(tmp_path / "source" / "train", ["a"], per_class=3)
    (tmp_path / "source" / "train" / "a" / "a_1.jpg").write_bytes(b"not a jpeg")
    counts = resize_copy.make_resized_copy(tmp_path / "source", tmp_path / "copy", short_side=20, workers=1)
    assert counts["unreadable"] == 1 and counts["resized"] == 2
    assert "a_1.jpg" in capsys.readouterr().err
    assert not (tmp_path / "copy" / "train" / "a" / "a_1.jpg").exists()
    with pytest.raises(DataError, match="other settings"):
        resize_copy.make_resized_copy(tmp_path / "source", tmp_path / "copy", short_side=24)
    with pytest.raises(DataError, match="inside the source"):
        resize_copy.make_resized_copy(tmp_path / "source", tmp_path / "source" / "small")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("someone's files")
    with pytest.raises(DataError, match="not a resized copy"):
        resize_copy.make_resized_copy(tmp_path / "source", tmp_path / "other")
    with pytest.raises(DataError, match="short-side"):
        resize_copy.make_resized_copy(tmp_path / "source", tmp_path / "new", short_side=0)


def test_resized_copy_command_line(tmp_path):
    make_class_folders(tmp_path / "source" / "train", ["a", "b"])
    proc = run_script("tools/resize_copy.py", tmp_path / "source", tmp_path / "copy", "--short-side", "20",
                      "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "4 images resized" in proc.stdout and f"--data-path {tmp_path / 'copy'}" in proc.stdout
    assert_clean_error(run_script("tools/resize_copy.py", tmp_path / "missing", tmp_path / "copy2"),
                       "does not exist")


# ----------------------------------------------------------------------------------------------------------
# tools/demo_data.py: the demo dataset


def test_demo_dataset_is_deterministic_complete_and_reused(tmp_path, cache_dir):
    first = Path(demo_data.make_demo_dataset(tmp_path / "one"))
    second = Path(demo_data.make_demo_dataset(tmp_path / "two"))
    files = sorted(path.relative_to(first) for path in first.rglob("*.jpg"))
    assert files == sorted(path.relative_to(second) for path in second.rglob("*.jpg"))
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in files)
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]  # no partial folders left behind

    splits = layouts.find_dataset(first, cache_dir)
    assert len(splits.classes) == 5 and len(splits.train) == 1000 and len(splits.val) == 250
    assert Image.open(splits.train.path(0)).size == (64, 64)

    a_file = first / files[0]
    stamp = a_file.stat().st_mtime_ns
    assert demo_data.make_demo_dataset(first) == str(first) and a_file.stat().st_mtime_ns == stamp  # reused
    (first / demo_data.DEMO_MARKER).unlink()  # as if an older or interrupted run made it
    a_file.write_bytes(b"")
    demo_data.make_demo_dataset(first)
    assert a_file.read_bytes() == (second / files[0]).read_bytes()  # regenerated


def test_demo_data_command_line(tmp_path):
    proc = run_script("tools/demo_data.py", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'demo'}\n"
    assert len(layouts.find_dataset(tmp_path / "demo", str(tmp_path / "cache")).train) == 1000
    (tmp_path / "notes.txt").write_text("someone's file")
    assert_clean_error(run_script("tools/demo_data.py", tmp_path / "notes.txt"), "is not a demo dataset")


# ----------------------------------------------------------------------------------------------------------
# tools/show_data.py, and every tool run both ways


def run_module(module, *args):
    """python -m tools.NAME ... from the repository root, as the tools' docstrings say to run them."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_show_data_command_line(tmp_path):
    make_class_folders(tmp_path / "data" / "train", ["b", "a"], per_class=3)
    make_class_folders(tmp_path / "data" / "val", ["a"], per_class=1)
    proc = run_module("tools.show_data", tmp_path / "data", "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["layout: class folders: train/<class>/; val/<class>/",
                                        "classes: 2, e.g. a (a), b (b)",
                                        f"train: 6 images in {tmp_path / 'data' / 'train'}",
                                        f"val: 1 image in {tmp_path / 'data' / 'val'}"]
    assert_clean_error(run_script("tools/show_data.py", tmp_path / "missing"), "does not exist")


@pytest.mark.parametrize("tool", ["resize_copy", "demo_data", "show_data"])
def test_each_tool_runs_as_a_module_and_as_a_script(tool):
    for proc in (run_module(f"tools.{tool}", "--help"), run_script(f"tools/{tool}.py", "--help")):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: python -m tools.{tool}"), proc.stdout

