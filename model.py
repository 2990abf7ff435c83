"""MobileNetV3-Large and -Small, as in "Searching for MobileNetV3" (Howard et al., ICCV 2019, arXiv:1905.02244v5).

    from model import build_model, count_params, count_madds
    model = build_model("large", width_mult=1.0, num_classes=1000)
    print(count_params(model), count_madds(model))   # 5,483,032 params, ~216.6M MAdds at 224 px

The architecture is data: `LARGE_BLOCKS` and `SMALL_BLOCKS` below are the paper's Tables 1 and 2, one row per
bneck block, and `MobileNetV3.__init__` is the one builder that reads them. Module names follow torchvision's
`mobilenet_v3_large`/`mobilenet_v3_small` (features.N.block.M, SE fc1/fc2, classifier.0/.3), so a torchvision
state dict loads 1:1 with `load_torchvision_state_dict`.
"""
import dataclasses

import torch
from torch import nn

ARCHS = ("large", "small")

# Each row: (kernel, expansion size, out channels, use SE, nonlinearity, stride). A block's input channels are
# the previous row's output (16 from the stem for the first row). "RE" = ReLU, "HS" = hard-swish.

# Paper, Table 1: MobileNetV3-Large.
LARGE_BLOCKS = (
    #k  exp  out  SE     NL    s      input (H x W x C)
    (3, 16,  16,  False, "RE", 1),  # 112x112x16
    (3, 64,  24,  False, "RE", 2),  # 112x112x16
    (3, 72,  24,  False, "RE", 1),  # 56x56x24
    (5, 72,  40,  True,  "RE", 2),  # 56x56x24
    (5, 120, 40,  True,  "RE", 1),  # 28x28x40
    (5, 120, 40,  True,  "RE", 1),  # 28x28x40
    (3, 240, 80,  False, "HS", 2),  # 28x28x40
    (3, 200, 80,  False, "HS", 1),  # 14x14x80
    (3, 184, 80,  False, "HS", 1),  # 14x14x80
    (3, 184, 80,  False, "HS", 1),  # 14x14x80
    (3, 480, 112, True,  "HS", 1),  # 14x14x80
    (3, 672, 112, True,  "HS", 1),  # 14x14x112
    (5, 672, 160, True,  "HS", 2),  # 14x14x112
    (5, 960, 160, True,  "HS", 1),  # 7x7x160
    (5, 960, 160, True,  "HS", 1),  # 7x7x160
)

# Paper, Table 2: MobileNetV3-Small. The table also marks SE on the final 1x1 conv (576 channels); that is a
# known typo - the authors' TF reference (tensorflow/models, research/slim/nets/mobilenet/mobilenet_v3.py) has
# no SE there, and the reference parameter count (2,542,856) leaves no room for one. So that conv has none.
SMALL_BLOCKS = (
    #k  exp  out  SE     NL    s      input (H x W x C)
    (3, 16,  16,  True,  "RE", 2),  # 112x112x16
    (3, 72,  24,  False, "RE", 2),  # 56x56x16
    (3, 88,  24,  False, "RE", 1),  # 28x28x24
    (5, 96,  40,  True,  "HS", 2),  # 28x28x24
    (5, 240, 40,  True,  "HS", 1),  # 14x14x40
    (5, 240, 40,  True,  "HS", 1),  # 14x14x40
    (5, 120, 48,  True,  "HS", 1),  # 14x14x40
    (5, 144, 48,  True,  "HS", 1),  # 14x14x48
    (5, 288, 96,  True,  "HS", 2),  # 14x14x48
    (5, 576, 96,  True,  "HS", 1),  # 7x7x96
    (5, 576, 96,  True,  "HS", 1),  # 7x7x96
)

# Rows of each table that are not bneck blocks (same tables): the stem conv's output, the last 1x1 conv
# before pooling, and the width of the 1x1 "NBN" conv after pooling (a Linear layer here, since it sees 1x1).
ARCH_TABLES = {
    # arch:  (blocks,       stem, last conv, head)
    "large": (LARGE_BLOCKS, 16, 960, 1280),
    "small": (SMALL_BLOCKS, 16, 576, 1024),
}

NONLINEARITIES = {"RE": nn.ReLU, "HS": nn.Hardswish}


def make_divisible(value, divisor=8, min_value=None):
    """Round `value` to the nearest multiple of `divisor`, never below `min_value` (default `divisor`) and never
    more than 10% below `value`. This is the channel rounding of the TF MobileNet reference (`_make_divisible`
    in research/slim/nets/mobilenet/mobilenet.py), which every width multiplier in the paper goes through."""
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    # Rounding 0.9 * 18 = 16.2 down to 16 would lose more than 10% of the channels; go up instead.
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


class ConvBNActivation(nn.Sequential):
    """Conv (no bias, BN follows) -> BN -> optional activation; submodules .0/.1/.2 as in torchvision."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, activation=None,
                 bn_eps=1e-3, bn_momentum=0.01):
        layers = [
            # "Same" padding for odd kernels; with stride 2 any input size works (the output is ceil(size / 2)).
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite as in the paper, section 5.3 and Figure 4: global average pool, 1x1 conv down to a
    quarter of the channels, ReLU, 1x1 conv back up, hard-sigmoid, then scale the input channels."""

    def __init__(self, channels, squeeze_channels):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        # Hard-sigmoid relu6(x + 3) / 6 replaces the sigmoid (paper, section 5.2).
        self.hardsigmoid = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.hardsigmoid(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """The paper's "bneck" block (Figure 4): 1x1 expand, kxk depthwise, optional SE, 1x1 linear projection.
    The projection has no activation: the bottleneck stays linear, as in MobileNetV2."""

    def __init__(self, in_channels, expanded_channels, out_channels, kernel_size, use_se, nonlinearity, stride,
                 bn_eps=1e-3, bn_momentum=0.01):
        super().__init__()
        activation = NONLINEARITIES[nonlinearity]
        norm = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        layers = []
        # Rows whose expansion size equals the input (the first row of both tables) have nothing to expand.
        if expanded_channels != in_channels:
            layers.append(ConvBNActivation(in_channels, expanded_channels, 1, activation=activation, **norm))
        layers.append(ConvBNActivation(expanded_channels, expanded_channels, kernel_size, stride,
                                       groups=expanded_channels, activation=activation, **norm))
        if use_se:
            # SE squeezes to 1/4 of the expansion layer's channels (paper, section 5.3), rounded to 8 as in the
            # TF reference.
            layers.append(SqueezeExcite(expanded_channels, make_divisible(expanded_channels / 4, 8)))
        layers.append(ConvBNActivation(expanded_channels, out_channels, 1, activation=None, **norm))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.block(x)
        if self.use_residual:
            out = out + x
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The arguments that build a MobileNetV3 (`model.config`). Frozen: the network was built from these values,
    so changing one afterwards would describe another network than the weights."""

    arch: str
    width_mult: float
    num_classes: int
    dropout: float
    bn_eps: float
    bn_momentum: float
    classifier: bool = True

    def __post_init__(self):
        if self.arch not in ARCH_TABLES:
            raise ValueError(f"unknown MobileNetV3 arch {self.arch!r}; expected one of {ARCHS}")
        if not self.width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {self.width_mult}")
        if self.classifier and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    def as_dict(self):
        """What checkpoints store, and `build_model(**config.as_dict())` rebuilds the model from. "classifier"
        appears (as False) only for a model without a head, so the dicts of checkpoints saved before that option
        existed stay equal to those of the same models now."""
        config = dataclasses.asdict(self)
        del config["classifier"]
        if not self.classifier:
            config["classifier"] = False
        return config


class MobileNetV3(nn.Module):
    """MobileNetV3-Large or -Small built from the paper's table (see `ARCH_TABLES`).

    The arguments are kept as `self.config` (a ModelConfig). `classifier_out_features` is an alias of
    `num_classes` kept for older call sites. With `classifier=False` no head is built and `forward` returns the
    pooled features (`self.num_features` wide): the output of the last 1x1 conv + BN + hard-swish, globally
    average-pooled and flattened.
    """

    def __init__(self, arch="large", width_mult=1.0, num_classes=1000, dropout=0.2, bn_eps=1e-3, bn_momentum=0.01,
                 classifier=True, classifier_out_features=None):
        super().__init__()
        if classifier_out_features is not None:
            if num_classes not in (1000, classifier_out_features):
                raise ValueError(f"num_classes={num_classes} and classifier_out_features={classifier_out_features} "
                                 "disagree; give only one of them")
            num_classes = classifier_out_features
        # ModelConfig checks the values; checkpoints store config.as_dict(), which rebuilds this model.
        self.config = ModelConfig(arch, width_mult, num_classes, dropout, bn_eps, bn_momentum, classifier)

        # BN momentum 0.01 = TF decay 0.99 (paper, section 6.1.1); eps 1e-3 is the TF reference's default.
        norm = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        blocks, stem_channels, last_channels, head_channels = ARCH_TABLES[arch]

        in_channels = make_divisible(stem_channels * width_mult)
        table_in = stem_channels  # the unscaled input channels, as the table reads
        layers = [ConvBNActivation(3, in_channels, 3, stride=2, activation=nn.Hardswish, **norm)]
        for kernel_size, expansion, out, use_se, nonlinearity, stride in blocks:
            out_channels = make_divisible(out * width_mult)
            # Expansion under a width multiplier follows the TF reference (`expand_input_by_factor` in
            # research/slim/nets/mobilenet/mobilenet_v3.py): the table's ratio expansion / input applied to the
            # *scaled* input channels, then rounded. torchvision rounds expansion * width_mult instead, which
            # is the same at 1.0 but gives e.g. 3,928,296 instead of 3,993,528 parameters for Large 0.75;
            # the TF rule reproduces the counts of all six reference models (tests/test_model.py).
            expanded_channels = make_divisible(in_channels * expansion / table_in)
            layers.append(InvertedResidual(in_channels, expanded_channels, out_channels, kernel_size, use_se,
                                           nonlinearity, stride, **norm))
            in_channels, table_in = out_channels, out

        # The last 1x1 conv scales with the width like every other conv. The 1280/1024 layer after pooling is
        # kept full size for width_mult <= 1: the TF reference's `finegrain_classification_mode`, after the
        # MobileNetV2 paper (arXiv:1801.04381, section 6.1), which found a large last layer helps small models.
        self.num_features = make_divisible(last_channels * width_mult)
        layers.append(ConvBNActivation(in_channels, self.num_features, 1, activation=nn.Hardswish, **norm))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

        self.classifier = None
        if classifier:
            if width_mult > 1.0:
                head_channels = make_divisible(head_channels * width_mult)
            # The paper's two 1x1 "NBN" convs after pooling see a 1x1 map, so they are Linear layers (with
            # bias, no BN). Dropout before the last one: "dropout of 0.8" (paper, section 6.1.1) is TF's keep
            # probability, so p = 0.2.
            self.classifier = nn.Sequential(
                nn.Linear(self.num_features, head_channels),
                nn.Hardswish(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(head_channels, num_classes),
            )
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        if self.classifier is not None:
            x = self.classifier(x)
        return x


def build_model(arch, width_mult, num_classes, **kwargs):
    """Build a MobileNetV3; `kwargs` are the other `MobileNetV3` arguments (dropout, bn_eps, ...).
    `build_model(**model.config.as_dict())` rebuilds `model` (checkpoints store that dict)."""
    return MobileNetV3(arch=arch, width_mult=width_mult, num_classes=num_classes, **kwargs)


def count_params(model):
    """Number of parameters, frozen or not (BN running statistics are buffers and are not counted)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_madds(model, img_size=224):
    """Multiply-adds of one img_size x img_size image through the convolutions and linear layers (SE included),
    which is what the paper's MAdds column counts. FlopCounterMode counts a multiply-add as 2 flops."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    image = torch.zeros(1, 3, img_size, img_size, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()  # counting must not update BN running statistics
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


# --- torchvision interop -------------------------------------------------------------------------------------
# The module names above follow torchvision's mobilenet_v3_large / mobilenet_v3_small, so their state dicts
# load 1:1 into a width 1.0 model of the same arch; these helpers only check that and explain misfits.

def is_torchvision_state_dict(state_dict):
    """True if `state_dict` is a plain MobileNetV3 state dict in torchvision's layout (tensors only, keys under
    features.* and classifier.*, a 3-channel stem conv). This model's own state dicts have the same layout."""
    if not isinstance(state_dict, dict) or not state_dict:
        return False
    if not all(isinstance(key, str) and torch.is_tensor(value) for key, value in state_dict.items()):
        return False
    if not all(key.startswith(("features.", "classifier.")) for key in state_dict):
        return False
    stem = state_dict.get("features.0.0.weight")
    return stem is not None and stem.dim() == 4 and stem.shape[1] == 3


def guess_torchvision_arch(state_dict):
    """"large" or "small" from the number of feature stages (stem + bneck rows + last conv), else None."""
    if not is_torchvision_state_dict(state_dict):
        return None
    stages = {int(key.split(".")[1]) for key in state_dict if key.startswith("features.")}
    for arch, (blocks, *_) in ARCH_TABLES.items():
        if stages == set(range(len(blocks) + 2)):
            return arch
    return None


def _describe_misfit(model, state_dict):
    """One line saying why `state_dict` does not load into `model`, or None when it fits exactly."""
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    reshaped = [key for key in own if key in state_dict and state_dict[key].shape != own[key].shape]
    if not (missing or unexpected or reshaped):
        return None
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]!r})")
    if reshaped:
        key = reshaped[0]
        problems.append(f"{len(reshaped)} shape mismatches (first {key!r}: {tuple(state_dict[key].shape)} in "
                        f"the state dict, {tuple(own[key].shape)} in the model)")
    config = model.config
    guess = guess_torchvision_arch(state_dict)
    if guess and guess != config.arch:
        problems.append(f"it looks like a {guess!r} state dict")
    elif config.width_mult != 1.0:
        problems.append("torchvision's weights exist only for width_mult=1.0")
    return (f"state dict does not fit MobileNetV3 arch={config.arch!r} width_mult={config.width_mult}: "
            + "; ".join(problems))


def load_torchvision_state_dict(model, state_dict):
    """Load a torchvision mobilenet_v3_large/small (width 1.0) state dict into `model` and return `model`.
    Raises ValueError, before changing anything, if a key or shape does not fit (wrong arch or width)."""
    problem = _describe_misfit(model, state_dict)
    if problem:
        raise ValueError(problem)
    model.load_state_dict(state_dict)
    return model


TORCHVISION_BUILDERS = {"large": "mobilenet_v3_large", "small": "mobilenet_v3_small"}


def load_pretrained(model, source):
    """Load ImageNet weights into `model` and return how many state-dict tensors were skipped.

    `source` is "torchvision" (torchvision's IMAGENET1K_V1 weights, downloaded through torchvision into its
    cache), the path of a state-dict file, or a state dict. For fine-tuning, a final classifier layer whose class count
    differs from the model's is skipped and keeps its fresh initialisation; a model built with
    classifier=False skips the whole head. Everything else must fit exactly (ValueError otherwise).
    """
    config = model.config
    if source == "torchvision":
        if config.width_mult != 1.0:
            raise ValueError(f"torchvision has ImageNet weights only for width_mult=1.0, not {config.width_mult}")
        state_dict = _torchvision_weights(config.arch)
    elif isinstance(source, dict):  # a state dict already loaded (train.py --pretrained reads checkpoints too)
        state_dict, source = source, "the given state dict"
    else:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
    if not is_torchvision_state_dict(state_dict):
        raise ValueError(f"{source} does not hold a plain MobileNetV3 state dict (features.* and "
                         "classifier.* tensors)")

    skipped = []
    if not config.classifier:
        skipped = [key for key in state_dict if key.startswith("classifier.")]
    elif "classifier.3.weight" in state_dict and state_dict["classifier.3.weight"].shape[0] != config.num_classes:
        skipped = [key for key in state_dict if key.startswith("classifier.3.")]
    kept = {key: value for key, value in state_dict.items() if key not in skipped}
    if skipped and config.classifier:
        # Load the model's own fresh last layer back into itself, so the exact-fit check covers the rest.
        own = model.state_dict()
        kept.update({key: own[key] for key in own if key.startswith("classifier.3.")})
    load_torchvision_state_dict(model, kept)
    if skipped:
        reason = (f"its {state_dict['classifier.3.weight'].shape[0]} classes vs this model's {config.num_classes}"
                  if config.classifier else "this model has classifier=False")
        print(f"load_pretrained: skipped {len(skipped)} classifier tensors from {source} ({reason})")
    return len(skipped)


def _torchvision_weights(arch):
    """torchvision's IMAGENET1K_V1 state dict for `arch`; RuntimeError with a way out when it can't download."""
    from torchvision.models import get_model_weights

    builder = TORCHVISION_BUILDERS[arch]
    weights = get_model_weights(builder).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as error:  # URLError, HTTPError, hash mismatch, ...: all mean "no weights here"
        raise RuntimeError(f"could not download torchvision's {builder} IMAGENET1K_V1 weights from {weights.url} "
                           f"({type(error).__name__}: {error}); when offline, fetch that file elsewhere and "
                           "pass its path instead of 'torchvision'") from error
