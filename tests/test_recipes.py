"""recipes/*.toml: each parses, names only train.py flags with their types, carries its metadata, and runs 3 steps."""
import argparse
import glob
import os
import tomllib

import pytest
import torch

import flags
import train
from conftest import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "*.toml")))
IDS = [os.path.splitext(os.path.basename(path))[0] for path in RECIPES]
EXPECTED = {"original_2021", "torchvision_large", "torchvision_small", "timm_large_ra", "tf_large_adamw",
            "paddleclas_large_050"}
METADATA = {"name": str, "source": str, "published_top1": float, "global_batch": int, "lr_scaling": str,
            "not_reproduced": list}
# Where the data and the outputs live, and on what machine, belongs to the command line, not to a recipe.
MACHINE_KEYS = {"data_path", "output_dir", "log_dir", "run_name", "resume", "device", "workers", "max_steps", "config"}
# --config rescales these to the run's global batch (lr: linear/sqrt; EMA decay: decay**k), so they are not
# compared with the recipe after a run at another batch size.
SCALED = {"lr", "ema_decay"}


def load(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def train_flags():
    return {action.dest: action for action in flags.get_args_parser()._actions if action.dest != "help"}


def flag_type(action):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return bool
    return action.type or str


def test_every_published_recipe_has_a_file():
    assert EXPECTED <= set(IDS), sorted(EXPECTED - set(IDS))


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_keys_are_train_flags_with_their_types(path):
    recipe, known = load(path), train_flags()
    settings = {key: value for key, value in recipe.items() if key != "recipe"}
    assert settings, "a recipe sets at least one flag"
    for key, value in settings.items():
        assert key in known, f"{key!r} is not a train.py flag (dest); put it in [recipe] not_reproduced instead"
        assert key not in MACHINE_KEYS, f"{key!r} belongs on the command line, not in a recipe"
        action = known[key]
        expected = flag_type(action)
        # exact types: a float flag is written 2.0, not 2 (TOML's int), and no flag takes a bool but the switches
        assert type(value) is expected, f"{key} = {value!r}: {type(value).__name__}, train.py wants {expected.__name__}"
        if action.choices is not None:
            assert value in action.choices, f"{key} = {value!r}: not one of {sorted(action.choices)}"
    # the values pass train.py's own checks, as if given on the command line
    parser = flags.get_args_parser()
    parser.set_defaults(**settings)
    flags.validate_args(parser.parse_args([]))


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_metadata(path):
    recipe = load(path)
    assert isinstance(recipe.get("recipe"), dict), "a [recipe] table with the metadata"
    meta = recipe["recipe"]
    for key, kind in METADATA.items():
        assert key in meta, f"[recipe] lacks {key}"
        assert type(meta[key]) is kind, f"[recipe] {key} = {meta[key]!r}: want {kind.__name__}"
    assert meta["name"] == os.path.splitext(os.path.basename(path))[0]
    assert meta["source"].strip()
    assert 0 < meta["published_top1"] < 100
    assert meta["lr_scaling"] in ("linear", "sqrt", "none")
    assert meta["global_batch"] >= 1
    # the per-process batch the recipe sets divides the global batch its lr belongs to (a whole number of GPUs)
    batch = recipe.get("batch_size")
    if batch is not None:
        assert meta["global_batch"] % batch == 0, (batch, meta["global_batch"])
    assert all(isinstance(item, str) and item.strip() for item in meta["not_reproduced"])
    for proposal in meta.get("proposed_flags", []):
        assert isinstance(proposal, dict) and proposal.get("flag", "").startswith("--") and "value" in proposal, proposal
    assert set(meta) <= set(METADATA) | {"proposed_flags"}, f"unknown [recipe] keys {sorted(set(meta) - set(METADATA))}"


def test_recipe_names_are_unique():
    names = [load(path)["recipe"]["name"] for path in RECIPES]
    assert len(names) == len(set(names))


# ---------------------------------------------------------------- runs (train.py --config)

RUN_FLAGS = ["--max-steps", "3", "--epochs", "1", "-b", "8", "--img-size", "32", "--arch", "small",
             "--width-mult", "0.5", "--workers", "0", "--device", "cpu", "--no-amp"]
OVERRIDDEN = {"max_steps", "epochs", "batch_size", "img_size", "arch", "width_mult", "workers", "device", "amp",
              "data_path", "output_dir", "log_dir"}


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_runs_3_steps(path, tiny_data, tmp_path):
    argv = ["--config", path, *RUN_FLAGS, "--data-path", tiny_data,
            "--output-dir", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "runs")]
    assert train.main(flags.parse_args(argv)) == 0
    last = torch.load(tmp_path / "ckpt" / "last.pth", map_location="cpu", weights_only=True)
    assert last["step"] == 3
    stored, recipe = last["args"], load(path)
    # command-line flags win over the recipe ...
    assert stored["batch_size"] == 8 and stored["arch"] == "small" and stored["epochs"] == 1
    # ... and the recipe sets everything else
    assert stored["opt"] == recipe["opt"]
    assert stored["weight_decay"] == pytest.approx(recipe["weight_decay"])
    for key, value in recipe.items():
        if key in ("recipe", *OVERRIDDEN, *SCALED):
            continue
        assert stored[key] == (pytest.approx(value) if isinstance(value, float) else value), key


@pytest.mark.parametrize("text, message", [
    ("learning_rate = 0.1", "unknown key 'learning_rate'"),
    ("lr = \"fast\"", "lr = 'fast' should be float"),
    ("amp = 1", "amp = 1 should be bool"),
    ("opt = \"lamb\"", "opt = 'lamb' is not one of"),
    ("[recipe]\nauthor = \"me\"", "unknown key 'author' in [recipe]"),
    ("lr = [", "is not valid TOML"),
    ("recipe = \"x\"", "must be a [recipe] table"),
])
def test_a_bad_recipe_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(SystemExit) as exit_info:
        flags.parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: --config ") and message in err, err
    assert err.count("\n") == 1


def test_batch_scaling_keeps_the_lr_rule_and_the_ema_horizon(capsys):
    """The same recipe at global batch 128 and 1024: lr scaled linearly (RMSprop) or by the square root (Adam),
    EMA decay per step d ** (G / B), so that decay ** (steps per epoch) is the same at every batch."""
    tv = os.path.join(REPO, "recipes", "torchvision_large.toml")  # lr 0.064 at 1024, linear
    for processes, lr in ((8, 0.064), (1, 0.008)):
        args = flags.parse_args(["--config", tv, "--ema-decay", "0.9999"])
        assert (args.lr_base_batch, args.lr_scaling) == (1024, "linear")
        scaled_lr, decay = flags.scaled_to_global_batch(args, processes)
        assert scaled_lr == pytest.approx(lr)
        images = 1_281_167
        assert decay ** (images / (128 * processes)) == pytest.approx(0.9999 ** (images / 1024), rel=1e-9)
    original = os.path.join(REPO, "recipes", "original_2021.toml")  # Adam lr 5e-3 at 128, square root
    args = flags.parse_args(["--config", original])
    assert flags.scaled_to_global_batch(args, 8)[0] == pytest.approx(5e-3 * 8 ** 0.5)
    assert flags.scaled_to_global_batch(args, 1) == (5e-3, 0.9999)
    assert flags.parse_args(["--config", original, "--lr", "1e-3"]).lr == 1e-3  # the command line wins
