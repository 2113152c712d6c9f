"""The paper's variance measurement for every interpolating upsampler, beside the exact prediction.

I.i.d. normal maps with mean 0.3989 (= E[ReLU(z)], the output of conv-BN-ReLU) go through x2, x4, x8 upsampling
with each linear-family kernel (``linear`` 1-D, ``bilinear`` and ``bicubic`` 2-D, ``trilinear`` 3-D) and both
``align_corners`` settings. Each output pixel is a weighted sum of input pixels with weights summing to 1, so the
mean is kept and the variance is the input variance times the sum of the squared weights; averaged over the output,
that is the predicted ratio. The weights are computed here from PyTorch's formulas (source coordinates, clamped
borders, the cubic kernel with A = -0.75), not from torch, so the measurement checks them. The kernels are
separable, so the ratio is the per-axis mean raised to the number of axes. Nearest upsampling copies pixels: ratio 1.

    python examples/upsampling_variance.py          # prints the table, writes docs/upsampling_variance.png
    python examples/upsampling_variance.py --pretrained   # the same ratio on a pretrained encoder's maps
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

MEAN = 0.3989
FACTORS = (2, 4, 8)
A = -0.75  # PyTorch's bicubic kernel parameter
# mode: (spatial dims, map size per axis, maps per measurement); about 2.6e5 input pixels each, as published in 2-D
KERNELS = {"linear": (1, 16384, 16), "bilinear": (2, 128, 16), "bicubic": (2, 128, 16), "trilinear": (3, 32, 8)}


def _source(dst: int, size: int, factor: int, align_corners: bool, cubic: bool) -> float:
    out = size * factor
    if align_corners:
        return dst * (size - 1) / (out - 1)
    src = (dst + 0.5) / factor - 0.5
    return src if cubic else max(src, 0.0)  # linear clamps negative source coordinates to 0, cubic does not


def _cubic(t: float) -> list[float]:
    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def axis_weights(size: int, factor: int, align_corners: bool, cubic: bool = False) -> list[dict[int, float]]:
    """Per output position along one axis: {input index: weight}, with indices clamped as PyTorch reads them."""
    rows = []
    for dst in range(size * factor):
        src = _source(dst, size, factor, align_corners, cubic)
        row: dict[int, float] = {}
        if cubic:
            base = math.floor(src)
            for k, w in enumerate(_cubic(src - base)):
                index = min(max(base - 1 + k, 0), size - 1)
                row[index] = row.get(index, 0.0) + w
        else:
            low = min(int(src), size - 1)
            t = src - low if low < size - 1 else 0.0
            row[low] = row.get(low, 0.0) + 1 - t
            high = min(low + 1, size - 1)
            row[high] = row.get(high, 0.0) + t
        rows.append(row)
    return rows


def predicted_ratio(mode: str, size: int, factor: int, align_corners: bool) -> float:
    """Mean over output pixels of the sum of squared weights: the per-axis mean to the power of the axes."""
    dims = KERNELS[mode][0]
    rows = axis_weights(size, factor, align_corners, cubic=mode == "bicubic")
    axis = sum(sum(w * w for w in row.values()) for row in rows) / len(rows)
    return axis**dims


def interior_ratio(mode: str, factor: int) -> float:
    """``align_corners=False`` away from the borders (docs/method.md's table for bilinear)."""
    ts = [((k + 0.5) / factor - 0.5) % 1.0 for k in range(factor)]
    if mode == "bicubic":
        axis = sum(sum(w * w for w in _cubic(t)) for t in ts) / factor
    else:
        axis = sum((1 - t) ** 2 + t**2 for t in ts) / factor
    return axis ** KERNELS[mode][0]


def measured_ratio(mode: str, variance: float, factor: int, align_corners: bool | None, seed: int = 0,
                   size: int | None = None, maps: int | None = None) -> float:
    """Output variance / input variance of i.i.d. normal maps (``align_corners=None``: nearest instead)."""
    dims, default_size, default_maps = KERNELS[mode]
    size, maps = size or default_size, maps or default_maps
    gen = torch.Generator().manual_seed(seed)
    x = MEAN + variance**0.5 * torch.randn(maps, 1, *[size] * dims, generator=gen, dtype=torch.float64)
    if align_corners is None:
        y = F.interpolate(x, scale_factor=factor, mode="nearest")
    else:
        y = F.interpolate(x, scale_factor=factor, mode=mode, align_corners=align_corners)
    return (y.var(unbiased=False) / x.var(unbiased=False)).item()


def table(variances: list[float]) -> tuple[str, dict]:
    lines = ["| kernel | align_corners | factor | measured ratio (mean, min-max over variances) | predicted (with "
             "borders) | predicted (interior) |", "|---|---|---|---|---|---|"]
    results = {}
    for mode, (_, size, _) in KERNELS.items():
        for ac in (False, True):
            for f in FACTORS:
                ratios = [measured_ratio(mode, v, f, ac, seed=i) for i, v in enumerate(variances)]
                results[(mode, ac, f)] = ratios
                interior = f"{interior_ratio(mode, f):.3f}" if not ac else "-"
                lines.append(f"| {mode} | {ac} | x{f} | {sum(ratios) / len(ratios):.4f} ({min(ratios):.4f}-"
                             f"{max(ratios):.4f}) | {predicted_ratio(mode, size, f, ac):.4f} | {interior} |")
    return "\n".join(lines), results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, ac in zip(axes, (False, True)):
        ax.axhline(1.0, color="k", ls="--", lw=1, label="nearest (keeps the variance)")
        for mode, (_, size, _) in KERNELS.items():
            measured = [sum(results[(mode, ac, f)]) / len(results[(mode, ac, f)]) for f in FACTORS]
            (line,) = ax.plot(FACTORS, measured, "o", label=f"{mode} measured")
            ax.plot(FACTORS, [predicted_ratio(mode, size, f, ac) for f in FACTORS], "-", color=line.get_color(),
                    lw=1, label=f"{mode} predicted")
        ax.set_xscale("log", base=2)
        ax.set_xticks(FACTORS, [f"x{f}" for f in FACTORS])
        ax.set_title(f"align_corners={ac}")
        ax.set_xlabel("upsampling factor")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("output variance / input variance")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Variance kept by interpolating upsampling: i.i.d. normal maps, mean {MEAN}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pretrained_ratios(size: int = 256) -> list[tuple[tuple[int, ...], float]]:
    """Per feature level of the ImageNet-pretrained EfficientNet-Lite0 (offline weights) on five photos of
    ``skimage.data`` at ``size`` px: (shape, the variance a bilinear x2 upsampling keeps). Trained maps are
    spatially correlated: they keep much more than i.i.d. ones."""
    import skimage.data
    import timm
    import torch
    import torch.nn.functional as F

    from se_surgery.integrations.lite0 import MEAN, STD, timm_state_dict

    net = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True)
    net.load_state_dict(timm_state_dict(), strict=False)  # (the classifier head's weights have no place here)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
              skimage.data.hubble_deep_field()]
    x = torch.cat([F.interpolate(torch.tensor(p[..., :3]).permute(2, 0, 1)[None].float() / 255, size=(size, size),
                                 mode="bilinear") for p in photos])
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        feats = net.eval()(x)
    return [(tuple(f.shape), float(F.interpolate(f, scale_factor=2, mode="bilinear").var() / f.var())) for f in feats]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", type=Path, default=Path("docs/upsampling_variance.png"))
    parser.add_argument("--pretrained", action="store_true",
                        help="only the variance bilinear x2 keeps on a pretrained encoder's feature maps")
    args = parser.parse_args()
    if args.pretrained:
        print("| Lite0 feature map (photos x channels x h x w) | variance kept by bilinear x2 |\n|---|---|")
        for shape, ratio in pretrained_ratios():
            print(f"| {' x '.join(map(str, shape))} | {ratio:.3f} |")
        return
    variances = [0.01, 0.3, 0.99]
    text, results = table(variances)
    print(text)
    nearest = max(abs(measured_ratio(m, 0.5, f, None) - 1) for m in KERNELS for f in FACTORS)
    print(f"\nnearest, every dimension: |ratio - 1| <= {nearest:.1e}")
    plot(results, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
