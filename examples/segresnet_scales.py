"""The scale gap in a 3-D decoder and its fix: MONAI SegResNet (trilinear ``up(x) + skip``), before/after equalizing.

Random weights with BatchNorm statistics of two random batches (nothing is downloaded), 4 batches of 2 x 1 x 32^3
random volumes; prints ``se.scale_report`` of the model as built and of the model equalized on the same data.

    python examples/segresnet_scales.py
"""

import warnings

import torch
from monai.networks.nets import SegResNet

import se_surgery as se


def main() -> None:
    torch.manual_seed(0)
    model = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 2, 2),
                      blocks_up=(1, 1))
    with torch.no_grad():  # BatchNorm statistics of two batches, standing in for a trained network's
        for _ in range(2):
            model(torch.randn(2, 1, 32, 32, 32))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 1, 32, 32, 32, generator=gen) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = se.scale_report(model, (data[0],), data, progress=False)
        equalized = se.equalize(model, (data[0],), data, progress=False)
        after = se.scale_report(equalized, (data[0],), data, progress=False)
    print("## before\n")
    print(before.to_markdown())
    print("\n## after\n")
    print(after.to_markdown())
    print()
    print(se.describe(equalized))


if __name__ == "__main__":
    main()
