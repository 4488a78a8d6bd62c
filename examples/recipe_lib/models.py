"""The model zoo of the training recipes: ``build_model(name, ...)``.

The full-size models are the ones of the papers the recipes reproduce: the SWA
paper's VGG-16-BN, PreResNet-110/164 and WRN-28-10; "Train longer, generalize
better"'s ResNet-44 and Keskar et al.'s F1; and a ResNet-18 for the image
folder tutorial. Each has a small variant for quick CPU runs.

Every model takes ``[N, in_channels, image_size, image_size]`` and returns
logits ``[N, num_classes]``. The convolutional ones end in global average
pooling, so any ``image_size >= 28`` works (only ``f1`` is tied to the
``image_size`` it was built for, and ``vgg*`` and ``resnet18`` choose their
pooling and stem from it). Normalization is plain ``nn.BatchNorm1d/2d`` so the
recipes can swap it for ghost BN by module type. Nothing here depends on the
memory format: ``model.to(memory_format=torch.channels_last)`` is fine.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["MODEL_NAMES", "MODEL_DESCRIPTIONS", "build_model", "count_parameters"]


# --------------------------------------------------------------------------- helpers


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _init_weights(model: nn.Module) -> nn.Module:
    """He init for convs (fan_out, as in the ResNet and SWA code), identity BN; Linear keeps torch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _head(features: int, num_classes: int) -> nn.Sequential:
    """Global average pooling then a linear classifier: what makes the conv nets size-agnostic."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, num_classes))


# --------------------------------------------------------------------------- post-activation ResNets


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU.

    When the shape changes the shortcut is a strided 1x1 conv + BN ("option B"
    of He et al.), used both by ResNet-18 and by the CIFAR ResNets here.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)  # in place is safe: it only ever sees a fresh BN output or sum
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of :class:`BasicBlock` (each stage after the first starts by halving the size), head."""

    def __init__(
        self, stem: nn.Module, stem_channels: int, widths: Sequence[int], blocks: Sequence[int], num_classes: int
    ) -> None:
        super().__init__()
        self.stem = stem
        stages: list[nn.Module] = []
        channels = stem_channels
        for index, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(channels, width, stride)] + [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = _head(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _resnet18(num_classes: int, in_channels: int, image_size: int, base_width: int = 64) -> nn.Module:
    """ResNet-18 ([2, 2, 2, 2] basic blocks at widths ``base_width`` times 1, 2, 4, 8) with a size-dependent stem."""
    widths = [base_width * 2**i for i in range(4)]
    if image_size <= 64:
        # Small images (CIFAR-style): the ImageNet stem would shrink 32x32 to 8x8 before
        # the first block and throw away most of the resolution.
        stem = nn.Sequential(_conv3x3(in_channels, base_width), nn.BatchNorm2d(base_width), nn.ReLU(inplace=True))
    else:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(base_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    return ResNet(stem, base_width, widths, [2, 2, 2, 2], num_classes)


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> nn.Module:
    """He et al.'s CIFAR ResNet: depth 6n+2, three stages of n blocks at widths 16/32/64."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    stem = nn.Sequential(_conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    return ResNet(stem, 16, [16, 32, 64], [n, n, n], num_classes)


# --------------------------------------------------------------------------- pre-activation ResNets


class PreActBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv twice); also the "wide basic" block of WRN, without dropout.

    A projection shortcut (1x1 conv, no BN: the next block's BN follows) takes
    the pre-activated input, as in He et al.'s identity-mappings code and WRN.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _conv1x1(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 to 4x the planes."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _conv1x1(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """3x3 conv to 16 channels, three stages of ``n`` pre-activation blocks, then BN-ReLU and the head.

    The closing BN-ReLU is needed because pre-activation blocks output the raw
    residual sum. Covers PreResNet (widths 16/32/64) and WRN (widths times k).
    """

    def __init__(
        self,
        block: type[PreActBlock] | type[PreActBottleneck],
        n: int,
        widths: Sequence[int],
        num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.stem = _conv3x3(in_channels, 16)
        stages: list[nn.Module] = []
        channels = 16
        for index, planes in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers: list[nn.Module] = []
            for i in range(n):
                layers.append(block(channels, planes, stride if i == 0 else 1))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.head = _head(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final(self.stages(self.stem(x))))


def _preresnet(depth: int, bottleneck: bool, num_classes: int, in_channels: int) -> nn.Module:
    """PreResNet as the SWA paper names them: depth counts conv and linear layers.

    That is 2 per basic block or 3 per bottleneck, times 3 stages of ``n``
    blocks, plus the stem and the classifier: 6n+2 (110: n=18, 20: n=3) or
    9n+2 (164: n=18).
    """
    per_block = 3 if bottleneck else 2
    if (depth - 2) % (3 * per_block):
        raise ValueError(f"PreResNet depth must be {3 * per_block}n+2, got {depth}")
    block = PreActBottleneck if bottleneck else PreActBlock
    return PreActResNet(block, (depth - 2) // (3 * per_block), [16, 32, 64], num_classes, in_channels)


def _wide_resnet(depth: int, k: int, num_classes: int, in_channels: int) -> nn.Module:
    """WRN-depth-k (Zagoruyko & Komodakis): depth 6n+4 (the 4: stem, classifier and two projection convs)."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    return PreActResNet(PreActBlock, (depth - 4) // 6, [16 * k, 32 * k, 64 * k], num_classes, in_channels)


# --------------------------------------------------------------------------- VGG

VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
)


class VGG(nn.Module):
    """VGG with BN, CIFAR-style: conv3x3-BN-ReLU per number in ``config``, 2x2 max-pool per ``"M"``.

    A max-pool is skipped once the feature map is down to 1x1, so 28x28
    inputs (which reach 1x1 after four pools) build too; adaptive average
    pooling then reduces whatever is left (1x1 at 28 or 32, 4x4 at 150).
    """

    def __init__(self, config: Sequence[int | str], in_channels: int, image_size: int, classifier: nn.Module) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in config:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                width = int(item)
                layers += [_conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _vgg16_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    # The SWA repo's classifier, dropout included (the one place this zoo has dropout).
    classifier = nn.Sequential(
        nn.Dropout(),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )
    return VGG(VGG16_CONFIG, in_channels, image_size, classifier)


def _vgg_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    config = tuple(item if item == "M" else int(item) // 8 for item in VGG16_CONFIG)
    return VGG(config, in_channels, image_size, nn.Linear(512 // 8, num_classes))


# --------------------------------------------------------------------------- fully connected


def _fully_connected(num_classes: int, in_features: int, hidden: int, depth: int) -> nn.Module:
    """Keskar et al.'s F1 shape: flatten, ``depth`` x (Linear-BN-ReLU) of ``hidden`` units, Linear.

    The hidden Linears have no bias: BatchNorm1d's shift right after makes it redundant.
    """
    layers: list[nn.Module] = [nn.Flatten()]  # flattens in logical NCHW order, whatever the memory format
    features = in_features
    for _ in range(depth):
        layers += [nn.Linear(features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        features = hidden
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- registry

_Builder = Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, image_size) -> model

_BUILDERS: dict[str, _Builder] = {
    "resnet18": lambda c, i, s: _resnet18(c, i, s),
    "resnet18_small": lambda c, i, s: _resnet18(c, i, s, base_width=16),
    "vgg16_bn": _vgg16_bn,
    "vgg_small": _vgg_small,
    "preresnet110": lambda c, i, s: _preresnet(110, False, c, i),
    "preresnet164": lambda c, i, s: _preresnet(164, True, c, i),
    "preresnet20": lambda c, i, s: _preresnet(20, False, c, i),
    "wrn28_10": lambda c, i, s: _wide_resnet(28, 10, c, i),
    "wrn16_4": lambda c, i, s: _wide_resnet(16, 4, c, i),
    "resnet44": lambda c, i, s: _cifar_resnet(44, c, i),
    "resnet20": lambda c, i, s: _cifar_resnet(20, c, i),
    "f1": lambda c, i, s: _fully_connected(c, i * s * s, 512, 5),
    "f1_small": lambda c, i, s: _fully_connected(c, i * s * s, 256, 3),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)

MODEL_DESCRIPTIONS: dict[str, str] = {
    "resnet18": "ResNet-18 (11.2M params); 3x3 stem up to 64px, ImageNet 7x7 stem + max-pool above",
    "resnet18_small": "ResNet-18 at base width 16 (0.7M params), for quick CPU runs",
    "vgg16_bn": "VGG-16 with BN and the SWA paper's dropout classifier (15M params)",
    "vgg_small": "VGG-16-BN layout at 1/8 width, single linear classifier, no dropout",
    "preresnet110": "pre-activation ResNet-110, basic blocks, widths 16/32/64 (1.7M params)",
    "preresnet164": "pre-activation ResNet-164, bottleneck blocks, widths 64/128/256 out (1.7M params)",
    "preresnet20": "pre-activation ResNet-20, basic blocks (0.27M params), for quick CPU runs",
    "wrn28_10": "Wide ResNet 28-10, pre-activation, no dropout (36.5M params)",
    "wrn16_4": "Wide ResNet 16-4, pre-activation, no dropout (2.7M params), for quick CPU runs",
    "resnet44": "He et al.'s CIFAR ResNet-44, post-activation, 1x1-conv projections (0.66M params)",
    "resnet20": "He et al.'s CIFAR ResNet-20 (0.27M params), for quick CPU runs",
    "f1": "Keskar et al.'s F1: 5 x (Linear 512-BN-ReLU) then Linear (1.5M params at 28x28x1)",
    "f1_small": "F1 shape with 3 hidden layers of 256 units, for quick CPU runs",
}


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A freshly initialized model ``name`` for ``[N, in_channels, image_size, image_size]`` inputs.

    Initialization draws from torch's default generator, so the same
    ``torch.manual_seed`` gives the same weights. Raises ``ValueError`` for an
    unknown name (listing :data:`MODEL_NAMES`) or a non-positive size.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    return _init_weights(_BUILDERS[name](int(num_classes), int(in_channels), int(image_size)))


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not; BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())
