"""Small offline zoo models (random weights) and the exact number of sites each has, with the reason.

Counts hold for 2x3x128x128 inputs (64 px is too small for smp's output stride 32 plus PAN's pyramid).
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torchvision.models.segmentation as tvs
from transformers import (
    ConvNextConfig,
    DPTConfig,
    DPTForSemanticSegmentation,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SwinConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

SIZE = 128
LEVELS = ["stage1", "stage2", "stage3", "stage4"]


def _smp(name):
    return lambda: getattr(smp, name)("resnet18", encoder_weights=None, classes=5)


BUILDERS = {
    "tv_deeplabv3": lambda: tvs.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5,
                                                   aux_loss=False),
    "tv_lraspp": lambda: tvs.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5),
    "tv_fcn": lambda: tvs.fcn_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=False),
    **{f"smp_{n}": _smp(n) for n in ["FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "UPerNet", "PAN", "Segformer",
                                     "Unet", "MAnet"]},
    "hf_upernet_convnext": lambda: UperNetForSemanticSegmentation(UperNetConfig(
        backbone_config=ConvNextConfig(out_features=LEVELS, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128]),
        hidden_size=32, num_labels=5, use_auxiliary_head=False)),
    "hf_upernet_swin": lambda: UperNetForSemanticSegmentation(UperNetConfig(
        backbone_config=SwinConfig(out_features=LEVELS, depths=[1, 1, 1, 1], embed_dim=16, num_heads=[1, 1, 2, 2],
                                   window_size=4, image_size=SIZE),
        hidden_size=32, num_labels=5, use_auxiliary_head=False)),
    "hf_segformer": lambda: SegformerForSemanticSegmentation(SegformerConfig(
        num_labels=5, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], decoder_hidden_size=32)),
    "hf_dpt": lambda: DPTForSemanticSegmentation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=SIZE,
        patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64],
        fusion_hidden_size=32, num_labels=5, use_auxiliary_head=False)),
}

# Sites at 128 px, read off each model's source.
SITES = {
    # ASPP: the image-pooling branch (ASPPPooling) is upsampled from 1x1 and concatenated with the four conv
    # branches before the 1x1 projection. The final resize of the logits only reaches the output.
    "tv_deeplabv3": 1,
    # LR-ASPP: the 1/16 branch is upsampled, goes through high_classifier (1x1 conv, linear) and is added to
    # low_classifier(low). The final resize of the logits is not a site.
    "tv_lraspp": 1,
    # FCNHead has no fusion: its only resize is the final one of the logits.
    "tv_fcn": 0,
    # FPN: each pyramid level's segmentation block ends with a x2 bilinear upsampling (after GN+ReLU) for the
    # levels 1/32, 1/16, 1/8 (the 1/4 level has none); they merge by stack().sum(). Earlier upsamplings in the
    # 1/32 and 1/16 blocks feed a 3x3 conv + GroupNorm + ReLU (normalized, not linear), so are not sites. The
    # top-down path upsamples with nearest (not a site).
    "smp_FPN": 3,
    # PSP module: smp's PSPNet stops the encoder at depth 3 (a 16x16 map at 128 px); its four pooled branches
    # (1, 2, 3, 6 bins) are all enlarged to 16x16 and concatenated with the map: 4 sites.
    "smp_PSPNet": 4,
    # ASPP as in torchvision: the pooling branch; smp's final x8 resize is in the segmentation head (output).
    "smp_DeepLabV3": 1,
    # SepASPP: the ASPP pooling branch (level 0), and the x4 upsampling of the ASPP output concatenated with the
    # high-resolution features (level 1: its input depends on the first site).
    "smp_DeepLabV3Plus": 2,
    # UPerHead: PPM on the 4x4 top map with bins 1, 2, 3, 6: three enlarged (6x6 -> 4x4 shrinks, not a site);
    # three top-down x2 upsamplings added to laterals; three upsamplings (x8, x4, x2) to the 1/4 map before the
    # fusion concat. The top-down and fusion ones are chained (levels 1-3).
    "smp_UPerNet": 9,
    # PAN: FPA's global branch (upsampled, added at the end) and two of its pyramid upsamplings, added to
    # convolved branches; the pyramid's last upsampling multiplies the middle branch (an attention map, a gate:
    # not a fusion); GAU2 and GAU1 each add an upsampled coarse map to a gated fine one. The final x4 of the head
    # only reaches the output.
    "smp_PAN": 5,
    # SegFormer (smp): the 1/8, 1/16, 1/32 MLP outputs are upsampled to 1/4 and concatenated with the 1/4 one.
    "smp_Segformer": 3,
    # Unet and MAnet upsample with nearest, which keeps the variance: no bilinear site.
    "smp_Unet": 0,
    "smp_MAnet": 0,
    # transformers UperNet (ConvNeXt / Swin backbone): same design as smp's UPerNet, 3 + 3 + 3 = 9.
    "hf_upernet_convnext": 9,
    "hf_upernet_swin": 9,
    # transformers SegFormer: all four levels go through interpolate to the 1/4 size; the 1/4 one is a
    # same-size resize (not an upsampling), so 3 sites. The logits stay at 1/4 (no final resize).
    "hf_segformer": 3,
    # DPT: fusion layers 0-2 each upsample x2 and project (1x1); the next fusion layer adds that as the residual
    # (hidden + residual_layer1(residual), and the PreAct residual's own skip). The last layer's upsampling
    # goes to the head only.
    "hf_dpt": 3,
}

HF = {name for name in BUILDERS if name.startswith("hf_")}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The model with random weights and BatchNorm statistics of a few warm-up batches, in eval mode.

    Random init leaves running_mean=0/var=1, so ReLUs after BatchNorm can kill whole one-channel branches
    (PAN's pyramid); a trained network has real statistics, which the warm-up stands in for.
    """
    torch.manual_seed(seed)
    return warm_up(BUILDERS[name](), lambda m, x: call(m, name, x), (4, 3, SIZE, SIZE))


def warm_up(model: torch.nn.Module, run, shape) -> torch.nn.Module:
    """BatchNorm statistics of two random batches of ``shape`` (``run(model, x)`` calls the model); eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.momentum = None  # cumulative average over the warm-up
    model.train()
    with torch.no_grad():
        for _ in range(2):
            run(model, torch.randn(*shape))
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


def inputs(name: str, x: torch.Tensor):
    """The example_inputs / batch form the model takes."""
    return {"pixel_values": x} if name in HF else (x,)


def call(model: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    out = model(**inputs(name, x)) if name in HF else model(x)
    if isinstance(out, dict) and "out" in out:
        return out["out"]
    return out.logits if name in HF else out


def batches(name: str, n: int = 3, size: int = SIZE, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [inputs(name, torch.randn(2, 3, size, size, generator=gen)) for _ in range(n)]


def equalized(name, **kw):
    """The zoo model ``name`` equalized on its example and calibration batches (warnings silenced)."""
    import warnings

    import se_surgery as se

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return se.equalize(build(name), inputs(name, torch.randn(2, 3, 128, 128)), batches(name), progress=False,
                           **kw)
