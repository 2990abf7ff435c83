"""Tests for model.py: the built networks against the paper ("Searching for MobileNetV3", Howard et al. 2019),
torchvision interop, and the ways train.py / evaluate.py run the model.

    python -m pytest tests/test_model.py -q
"""
import dataclasses
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from model import (ARCHS, ConvBNActivation, MobileNetV3, ModelConfig, SqueezeExcite, build_model, count_madds,
                   count_params, guess_torchvision_arch, is_torchvision_state_dict, load_pretrained,
                   load_torchvision_state_dict, make_divisible)

# Parameter counts at 1000 classes of the reference models (TF slim's released MobileNetV3 checkpoints;
# torchvision's mobilenet_v3_large/small match at width 1.0).
PARAMS = {
    ("large", 1.0): 5_483_032,
    ("large", 0.75): 3_993_528,
    ("large", 0.5): 2_689_520,
    ("small", 1.0): 2_542_856,
    ("small", 0.75): 2_041_872,
    ("small", 0.5): 1_592_704,
}

# Millions of multiply-adds at 224 px (convolutions and linear layers, SE included).
MADDS = {
    ("large", 1.0): 216.6,
    ("large", 0.75): 154.6,
    ("large", 0.5): 69.2,
    ("small", 1.0): 56.5,
    ("small", 0.75): 43.4,
    ("small", 0.5): 21.1,
}

# The paper's tables transcribed again here, independently of model.py, as
# (kernel, expansion size, out channels, SE, nonlinearity, stride); the tests read the built model and compare.
PAPER_TABLE_1_LARGE = [
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
]
PAPER_TABLE_2_SMALL = [
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
]
PAPER_TABLES = {"large": PAPER_TABLE_1_LARGE, "small": PAPER_TABLE_2_SMALL}
# (stem out, last 1x1 conv out, head width) from the same tables.
PAPER_ENDS = {"large": (16, 960, 1280), "small": (16, 576, 1024)}
# 0-based bneck rows with a residual connection (stride 1 and input == output channels).
RESIDUAL_ROWS = {"large": [0, 2, 4, 5, 7, 8, 9, 11, 13, 14], "small": [2, 4, 5, 7, 9, 10]}


def read_block_row(block):
    """(kernel, expansion, out, SE, nonlinearity, stride) of a built bneck block, read from its layers."""
    layers = list(block.block)
    depthwise = next(layer for layer in layers
                     if isinstance(layer, ConvBNActivation) and layer[0].groups > 1)
    project = layers[-1]
    activation = type(depthwise[2])
    assert activation in (nn.ReLU, nn.Hardswish)
    return (depthwise[0].kernel_size[0], depthwise[0].out_channels, project[0].out_channels,
            any(isinstance(layer, SqueezeExcite) for layer in layers),
            "HS" if activation is nn.Hardswish else "RE", depthwise[0].stride[0])


def randomize_(model, seed=0):
    """Random BN scales and shifts and conv/linear biases, then BN running statistics measured on one random
    batch (momentum 1.0 in train mode), so activations stay O(1) through the whole depth and two models agree
    only if their graphs do. Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    batch_norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
            if isinstance(module, (nn.BatchNorm2d, nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.uniform_(-0.5, 0.5, generator=generator)
        momenta = [module.momentum for module in batch_norms]
        for module in batch_norms:
            module.momentum = 1.0
        model.train()(torch.randn(8, 3, 64, 64, generator=generator))
        for module, momentum in zip(batch_norms, momenta):
            module.momentum = momentum
    return model.eval()


# --- the paper's numbers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, width_mult", list(PARAMS))
def test_parameter_count(arch, width_mult):
    assert count_params(MobileNetV3(arch, width_mult)) == PARAMS[arch, width_mult]


@pytest.mark.parametrize("arch, width_mult", list(MADDS))
def test_madds_at_224(arch, width_mult):
    madds = count_madds(MobileNetV3(arch, width_mult), img_size=224) / 1e6
    assert madds == pytest.approx(MADDS[arch, width_mult], rel=0.01)


def test_count_madds_is_quiet_and_keeps_train_mode(capsys):
    model = MobileNetV3("small", 0.5).train()
    madds = []  # counted by hand: output positions x (input channels / groups) x kernel area, per layer

    def count(module, inputs, output):
        per_position = module.in_features if isinstance(module, nn.Linear) else \
            module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        madds.append(output[0].numel() * per_position)
    layers = [module for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    for module in layers:
        module.register_forward_hook(count)
    assert count_madds(model, img_size=64) == sum(madds) and len(madds) == len(layers)  # one forward
    assert model.training
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_match_paper_table(arch):
    model = MobileNetV3(arch)
    blocks = list(model.features)[1:-1]
    assert len(blocks) == {"large": 15, "small": 11}[arch]
    assert [read_block_row(block) for block in blocks] == PAPER_TABLES[arch]

    in_channels = 16
    for block, (_, expansion, out, use_se, _, _) in zip(blocks, PAPER_TABLES[arch]):
        layers = list(block.block)
        # The 1x1 expansion exists exactly when the expansion size differs from the input.
        has_expand = layers[0][0].groups == 1
        assert has_expand == (expansion != in_channels)
        # The 1x1 projection is linear: conv + BN, no activation.
        assert len(layers[-1]) == 2 and layers[-1][0].kernel_size == (1, 1)
        if use_se:
            se = next(layer for layer in layers if isinstance(layer, SqueezeExcite))
            assert se.fc1.out_channels == make_divisible(expansion / 4)
            assert se.fc1.bias is not None and isinstance(se.hardsigmoid, nn.Hardsigmoid)
            # SE comes after the depthwise conv and its activation, right before the projection.
            assert layers.index(se) == len(layers) - 2
        in_channels = out


def test_squeeze_excite_widths():
    large, small = MobileNetV3("large"), MobileNetV3("small")
    assert large.features[4].block[2].fc1.out_channels == 24  # 72 / 4 = 18, rounded to 8s
    assert large.features[14].block[2].fc1.out_channels == 240  # 960 / 4
    assert small.features[1].block[1].fc1.out_channels == 8  # 16 / 4 = 4, never below 8


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_placement(arch):
    # With its projection BN zeroed, a block outputs its input if it has a residual connection and zeros if not.
    residual_rows = []
    for index, block in enumerate(list(MobileNetV3(arch).eval().features)[1:-1]):
        nn.init.zeros_(block.block[-1][1].weight)
        nn.init.zeros_(block.block[-1][1].bias)
        inputs = torch.randn(1, block.block[0][0].in_channels, 8, 8)
        with torch.no_grad():
            output = block(inputs)
        if output.abs().max() > 0:
            assert torch.equal(output, inputs)
            residual_rows.append(index)
    assert residual_rows == RESIDUAL_ROWS[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_stem_last_conv_and_head_match_paper(arch):
    stem_out, last_out, head = PAPER_ENDS[arch]
    model = MobileNetV3(arch)
    stem = model.features[0]
    assert (stem[0].in_channels, stem[0].out_channels, stem[0].kernel_size, stem[0].stride) == (3, stem_out, (3, 3),
                                                                                                 (2, 2))
    assert isinstance(stem[2], nn.Hardswish)
    last = model.features[-1]
    # Table 2 marks SE on Small's last conv; that is a typo (no SE in the TF reference or the parameter count).
    assert isinstance(last, ConvBNActivation) and len(last) == 3
    assert (last[0].out_channels, last[0].kernel_size) == (last_out, (1, 1)) and isinstance(last[2], nn.Hardswish)
    linear1, activation, dropout, linear2 = model.classifier
    assert (linear1.in_features, linear1.out_features, linear2.out_features) == (last_out, head, 1000)
    assert linear1.bias is not None and isinstance(activation, nn.Hardswish) and dropout.p == 0.2
    assert not any(isinstance(module, nn.BatchNorm1d) for module in model.classifier)  # "NBN" in the tables


def test_batch_norm_defaults_and_overrides():
    default = [m for m in MobileNetV3("small", 0.5).modules() if isinstance(m, nn.BatchNorm2d)]
    assert all((m.eps, m.momentum) == (1e-3, 0.01) for m in default)
    custom = [m for m in MobileNetV3("small", 0.5, bn_eps=1e-5, bn_momentum=0.1).modules()
              if isinstance(m, nn.BatchNorm2d)]
    assert all((m.eps, m.momentum) == (1e-5, 0.1) for m in custom)


def test_width_multiplier_rules():
    large_075 = MobileNetV3("large", 0.75)
    assert large_075.features[0][0].out_channels == 16  # 16 * 0.75 = 12 rounds up to 16
    # Expansion is the table's ratio times the scaled input (TF rule): row 2 is 16 -> 64, ratio 4, and the
    # scaled input is still 16, so 64. torchvision's rule (64 * 0.75 = 48) would give 48.
    assert large_075.features[2].block[0][0].out_channels == 64
    assert large_075.features[-1][0].out_channels == 720  # 960 * 0.75
    assert large_075.classifier[0].out_features == 1280  # the head is not scaled below 1.0
    small_05 = MobileNetV3("small", 0.5)
    assert (small_05.features[-1][0].out_channels, small_05.classifier[0].out_features) == (288, 1024)
    large_125 = MobileNetV3("large", 1.25)
    assert (large_125.features[-1][0].out_channels, large_125.classifier[0].out_features) == (1200, 1600)


@pytest.mark.parametrize("value, expected", [
    (16, 16),  # already a multiple
    (99, 96),  # nearest multiple, rounding down
    (100, 104),  # nearest multiple, rounding up (half way goes up)
    (4, 8),  # never below the divisor
    (18, 24),  # nearest is 16, but that would be 11% down, so up instead
    (720.0, 720),
])
def test_make_divisible(value, expected):
    result = make_divisible(value, 8)
    assert result == expected and isinstance(result, int)


def test_make_divisible_min_value():
    assert make_divisible(3, 8, min_value=16) == 16
    assert make_divisible(30, 16) == 32


def test_initialization():
    model = MobileNetV3("small", 0.5)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(torch.all(m.bias == 0) for m in linears)
    assert model.classifier[0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    # Kaiming normal, fan-out mode: std sqrt(2 / (out_channels * k * k)).
    conv = model.features[-1][0]
    assert conv.weight.std().item() == pytest.approx((2 / conv.out_channels) ** 0.5, rel=0.05)
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is not None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="medium"), "unknown MobileNetV3 arch"),
    (dict(arch="large", width_mult=0), "width_mult must be > 0"),
    (dict(arch="small", width_mult=-0.5), "width_mult must be > 0"),
    (dict(arch="small", num_classes=5, classifier_out_features=10), "give only one of them"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MobileNetV3(**kwargs)


# --- torchvision interop ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_state_dict_gives_same_logits(arch):
    torch.manual_seed(0)
    reference = randomize_(getattr(torchvision.models, f"mobilenet_v3_{arch}")(weights=None))
    state_dict = reference.state_dict()
    assert is_torchvision_state_dict(state_dict) and guess_torchvision_arch(state_dict) == arch
    model = load_torchvision_state_dict(MobileNetV3(arch), state_dict).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, logits = reference(images), model(images)
    assert expected.std() > 0.1  # logits large enough for the comparison below to mean something
    assert (logits - expected).abs().max().item() < 1e-5


def test_torchvision_state_dict_that_does_not_fit_raises():
    small = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    with pytest.raises(ValueError, match="looks like a 'small' state dict"):
        load_torchvision_state_dict(MobileNetV3("large"), small)
    with pytest.raises(ValueError, match="width_mult=1.0"):
        load_torchvision_state_dict(MobileNetV3("small", 0.75), small)


def test_state_dict_detection():
    assert not is_torchvision_state_dict({"model": {}, "epoch": 3})
    assert not is_torchvision_state_dict([])
    assert guess_torchvision_arch({"model": {}}) is None
    assert guess_torchvision_arch(MobileNetV3("small", classifier=False).state_dict()) == "small"


def test_load_pretrained_from_file_skips_a_different_classifier(tmp_path, capsys):
    path = tmp_path / "small.pth"
    reference = randomize_(torchvision.models.mobilenet_v3_small(weights=None))
    torch.save(reference.state_dict(), path)

    same = MobileNetV3("small").eval()
    assert load_pretrained(same, str(path)) == 0
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(same(images), reference(images), atol=1e-5)

    finetune = MobileNetV3("small", num_classes=10)
    fresh_head = finetune.classifier[3].weight.clone()
    assert load_pretrained(finetune, str(path)) == 2
    assert "skipped 2 classifier tensors" in capsys.readouterr().out
    assert torch.equal(finetune.classifier[3].weight, fresh_head)
    assert torch.equal(finetune.classifier[0].weight, reference.classifier[0].weight)

    assert load_pretrained(MobileNetV3("small", classifier=False), str(path)) == 4
    with pytest.raises(ValueError, match="looks like a 'small' state dict"):
        load_pretrained(MobileNetV3("large"), str(path))


def test_load_pretrained_torchvision_errors(monkeypatch):
    with pytest.raises(ValueError, match="only for width_mult=1.0"):
        load_pretrained(MobileNetV3("large", 0.75), "torchvision")

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="could not download torchvision's mobilenet_v3_small"):
        load_pretrained(MobileNetV3("small"), "torchvision")


# --- keywords, config ---------------------------------------------------------------------------------------

def test_classifier_out_features_alias():
    model = MobileNetV3("small", 0.5, classifier_out_features=10).eval()
    assert model.config.num_classes == 10
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch, width_mult, features", [("large", 1.0, 960), ("small", 1.0, 576),
                                                        ("small", 0.75, 432)])
def test_no_classifier_returns_pooled_features(arch, width_mult, features):
    model = MobileNetV3(arch, width_mult, classifier=False).eval()
    assert model.classifier is None and model.num_features == features
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model(images)
        expected = model.features(images).mean((2, 3))
    assert pooled.shape == (2, features)
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert (pooled >= -0.375).all()  # after hard-swish, whose minimum is -3/8


@pytest.mark.parametrize("kwargs", [
    dict(arch="small", width_mult=0.75, num_classes=10, dropout=0.1, bn_eps=1e-5, bn_momentum=0.1),
    dict(arch="large", width_mult=0.5, num_classes=1000),
    dict(arch="large", width_mult=1.0, num_classes=1000, classifier=False),
])
def test_model_config_round_trip(kwargs):
    model = build_model(**kwargs)
    config = model.config.as_dict()
    # exactly the dict of older checkpoints: every argument, and "classifier" only for a model without a head
    assert config == {"dropout": 0.2, "bn_eps": 1e-3, "bn_momentum": 0.01, **kwargs}
    assert list(config)[:6] == ["arch", "width_mult", "num_classes", "dropout", "bn_eps", "bn_momentum"]
    assert all(isinstance(value, (str, int, float, bool)) for value in config.values())
    rebuilt = build_model(**config)
    assert rebuilt.config == model.config and rebuilt.config.as_dict() == config
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    assert {key: value.shape for key, value in rebuilt.state_dict().items()} == shapes
    assert [m.eps for m in rebuilt.modules() if isinstance(m, nn.BatchNorm2d)][0] == model.config.bn_eps


def test_model_config_is_frozen_and_checked():
    model = MobileNetV3("small", 0.5, num_classes=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.num_classes = 20  # the head has 10 outputs: the config must keep saying so
    assert model.config == ModelConfig("small", 0.5, 10, dropout=0.2, bn_eps=1e-3, bn_momentum=0.01)
    with pytest.raises(ValueError, match="unknown MobileNetV3 arch 'huge'"):  # checked without building a model
        ModelConfig("huge", 1.0, 1000, 0.2, 1e-3, 0.01)


# --- ways of running it -------------------------------------------------------------------------------------

def test_channels_last_matches_contiguous():
    model = randomize_(MobileNetV3("small", 0.75)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        logits = model(images.to(memory_format=torch.channels_last))
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-4)


def test_cpu_bf16_autocast_forward_backward():
    model = MobileNetV3("small", 0.5, num_classes=10).train()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.features[0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [32, 33, 57])
def test_any_input_size(size):
    model = MobileNetV3("large", 0.5, num_classes=7).train()
    logits = model(torch.randn(2, 3, size, size + 2))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_torch_compile_smoke():
    # Whole-graph capture (fullgraph=True: no graph breaks) through AOTAutograd, which is where model code
    # breaks under compile (in-place activations, Python control flow). The inductor backend itself needs
    # 20-80 s of C++ compilation on a 2-core CPU, too slow for this suite; train.py exercises it on real runs.
    model = MobileNetV3("small", 0.5, num_classes=10).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(images), model(images), atol=1e-6)
