"""Classifiers: the small CNNs of the embedded digits benchmark, and any torchvision architecture.

The small CNN is ``[Conv3x3 - BatchNorm2d - ReLU - MaxPool2]`` x 2 + one Linear head. The teacher uses
32/32 channels, the student 8/16 (about 20x fewer parameters). The head is called ``fc`` so that
``models.io`` can read the class count of a checkpoint the same way as for a torchvision ResNet.
The teacher must contain BatchNorm2d layers: Module 1 matches their running statistics.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

SMALL_CNNS: dict[str, tuple[int, ...]] = {"cnn-teacher": (32, 32), "cnn-student": (8, 16)}


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-MaxPool blocks, one per entry of ``widths``, then a Linear layer on the flattened map."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 16, widths: Sequence[int] = (32, 32)):
        super().__init__()
        _check_common(num_classes, in_channels, image_size)
        if image_size < 2 ** len(widths):
            raise ValueError(f"image_size: expected >= {2 ** len(widths)} for {len(widths)} pooling steps, got {image_size}")
        layers: list[nn.Module] = []
        prev = in_channels
        for w in widths:
            layers += [nn.Conv2d(prev, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev = w
        self.features = nn.Sequential(*layers)
        side = image_size
        for _ in widths:
            side //= 2  # MaxPool2d(2) floors odd sizes
        self.fc = nn.Linear(prev * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def _check_common(num_classes, in_channels, image_size) -> None:
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes: expected >= 2, got {num_classes}")


def _torchvision(name: str | None = None):
    try:
        import torchvision
    except ImportError:
        what = f"{name!r} is not a built-in model ({', '.join(SMALL_CNNS)}); " if name else ""
        raise ImportError(
            f"{what}torchvision architectures need torchvision, which is not installed: run `pip install torchvision`"
        ) from None
    return torchvision


def torchvision_names() -> list[str]:
    """Classification architectures known to the installed torchvision ([] when it is missing)."""
    try:
        tv = _torchvision()
    except ImportError:
        return []
    return sorted(tv.models.list_models(module=tv.models))


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the final Linear layer for one with ``num_classes`` outputs, by structure, not by name.

    Handles ``.fc`` (ResNet, ShuffleNet, RegNet, GoogLeNet, ...), ``.classifier[-1]`` (MobileNet,
    EfficientNet, ConvNeXt, VGG, AlexNet), ``.classifier`` (DenseNet), ``.heads.head`` (ViT) and
    ``.head`` (Swin, MaxViT). Anything else raises instead of guessing: the official code assumed
    ``.fc`` for every unknown model (bug B5).
    """
    def last(seq):
        return seq[-1] if isinstance(seq, nn.Sequential) and len(seq) else None

    fc, cls, head = (getattr(model, name, None) for name in ("fc", "classifier", "head"))
    heads = getattr(model, "heads", None)
    # the candidate places in the order looked at: (what is there now, how to put a new layer there)
    places = [
        (fc, lambda m: setattr(model, "fc", m)),
        (cls, lambda m: setattr(model, "classifier", m)),
        (last(cls), lambda m: cls.__setitem__(-1, m)),
        (getattr(heads, "head", None) if isinstance(heads, nn.Sequential) else None, lambda m: setattr(heads, "head", m)),
        (head, lambda m: setattr(model, "head", m)),
        (last(head), lambda m: head.__setitem__(-1, m)),
    ]
    for old, put in places:
        if isinstance(old, nn.Linear):
            put(nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
            return model
    raise ValueError(
        f"name: cannot find the classification head of {type(model).__name__} (looked for a Linear at .fc, "
        ".classifier, .classifier[-1], .heads.head, .head); this architecture is not supported"
    )


def _gray_to_rgb(module: nn.Module, args):
    # A forward pre-hook rather than a wrapper module: the state_dict keys stay those of torchvision,
    # so ImageNet checkpoints and torchvision-trained teachers load unchanged.
    (x,) = args
    return (x.expand(-1, 3, -1, -1) if x.dim() == 4 and x.shape[1] == 1 else x,)


def build_classifier(name: str, num_classes: int, in_channels: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """Build a classifier by name: "cnn-teacher", "cnn-student", or a torchvision architecture.

    Torchvision models get their head replaced for ``num_classes``; ``pretrained=True`` loads their
    default ImageNet weights (torchvision downloads them unless cached). One-channel input is repeated
    to three channels for them.
    """
    if not isinstance(name, str):
        raise ValueError(f"name: expected a model name string, got {name!r}")
    _check_common(num_classes, in_channels, image_size)
    if name in SMALL_CNNS:
        if pretrained:
            raise ValueError(f"pretrained: there are no pretrained weights for {name!r}; use pretrained=False")
        return SmallCNN(num_classes, in_channels, image_size, SMALL_CNNS[name])
    tv = _torchvision(name)
    known = torchvision_names()
    if name not in known:
        raise ValueError(f"name: unknown model {name!r}; expected one of {', '.join(list(SMALL_CNNS) + known)}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels: torchvision models take 3 (or 1, repeated) channels, got {in_channels}")
    kwargs = {}
    if name in ("googlenet", "inception_v3"):
        # Without this, train-mode forward returns a namedtuple with auxiliary logits instead of a tensor.
        kwargs["aux_logits"] = False
    model = tv.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    model = replace_head(model, num_classes)
    if in_channels == 1:
        model.register_forward_pre_hook(_gray_to_rgb)
    return model


CLASSIFIER_NAMES: tuple[str, ...] = tuple(SMALL_CNNS)
"""Built-in names; any torchvision architecture name is also accepted when torchvision is installed."""
