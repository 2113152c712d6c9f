"""The paper's variance measurement, rerun beside the analytic prediction (METHOD.md section 1).

I.i.d. normal maps with mean 0.3989 (= E[ReLU(z)], the output of conv-BN-ReLU) and variances 0.01 .. 0.99 go through
x2, x4, x8 bilinear upsampling with both ``align_corners`` settings. Each output pixel is a convex combination of
input pixels, so its variance is the input variance times the sum of its squared weights; averaged over the output,
that is the predicted ratio. It is computed here from the interpolation formulas (PyTorch's source coordinates,
clamped at the borders), not from torch, so the measurement checks it. Nearest upsampling copies pixels: ratio 1.

    python examples/bilinear_variance.py            # prints the table, writes docs/bilinear_variance.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

MEAN = 0.3989
FACTORS = (2, 4, 8)


def axis_weights(size: int, factor: int, align_corners: bool) -> list[tuple[float, float]]:
    """Per output position along one axis: (weight of the lower input pixel, weight of the upper one).

    The two weights fall on the same pixel at the last one (clamped), where they add up to 1."""
    out = size * factor
    weights = []
    for dst in range(out):
        if align_corners:
            src = dst * (size - 1) / (out - 1)
        else:
            src = max((dst + 0.5) / factor - 0.5, 0.0)  # PyTorch clamps negative source coordinates to 0
        low = min(int(src), size - 1)
        t = src - low if low < size - 1 else 0.0
        weights.append((1.0 - t, t))
    return weights


def predicted_ratio(size: int, factor: int, align_corners: bool) -> float:
    """Mean over output pixels of the sum of squared bilinear weights (separable: the product of two axes)."""
    per_axis = [a * a + b * b for a, b in axis_weights(size, factor, align_corners)]
    axis = sum(per_axis) / len(per_axis)
    return axis * axis


def interior_ratio(factor: int) -> float:
    """METHOD.md's table: ``align_corners=False`` away from the borders, (E[(1-t)^2 + t^2])^2."""
    ts = [((k + 0.5) / factor - 0.5) % 1.0 for k in range(factor)]
    return (sum((1 - t) ** 2 + t**2 for t in ts) / factor) ** 2


def measured_ratio(variance: float, factor: int, align_corners: bool | None, maps: int = 16, size: int = 128,
                   seed: int = 0) -> float:
    """Output variance / input variance of ``maps`` i.i.d. normal maps (``align_corners=None``: nearest)."""
    gen = torch.Generator().manual_seed(seed)
    x = MEAN + variance**0.5 * torch.randn(maps, 1, size, size, generator=gen, dtype=torch.float64)
    if align_corners is None:
        y = F.interpolate(x, scale_factor=factor, mode="nearest")
    else:
        y = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=align_corners)
    return (y.var(unbiased=False) / x.var(unbiased=False)).item()


def run(variances: list[float], maps: int, size: int) -> dict[tuple[bool, int], list[float]]:
    return {(ac, f): [measured_ratio(v, f, ac, maps, size, seed=i) for i, v in enumerate(variances)]
            for ac in (False, True) for f in FACTORS}


def table(results: dict[tuple[bool, int], list[float]], size: int) -> str:
    lines = ["| align_corners | factor | measured ratio (mean, min-max over variances) | predicted (with borders) | "
             "predicted (interior, METHOD.md) |", "|---|---|---|---|---|"]
    for (ac, f), ratios in results.items():
        mean = sum(ratios) / len(ratios)
        interior = f"{interior_ratio(f):.3f}" if not ac else "-"
        lines.append(f"| {ac} | x{f} | {mean:.4f} ({min(ratios):.4f}-{max(ratios):.4f}) | "
                     f"{predicted_ratio(size, f, ac):.4f} | {interior} |")
    return "\n".join(lines)


def plot(results: dict[tuple[bool, int], list[float]], variances: list[float], size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, ac in zip(axes, (False, True)):
        ax.plot(variances, variances, "k--", label="nearest (keeps the variance)")
        for f in FACTORS:
            (line,) = ax.plot(variances, [v * r for v, r in zip(variances, results[(ac, f)])], "o", ms=3,
                              label=f"x{f} measured")
            ax.plot(variances, [v * predicted_ratio(size, f, ac) for v in variances], "-", color=line.get_color(),
                    lw=1, label=f"x{f} predicted")
        ax.set_title(f"bilinear, align_corners={ac}")
        ax.set_xlabel("input variance")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("output variance")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Variance after bilinear upsampling: i.i.d. normal maps, mean {MEAN}, {size}x{size}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", type=int, default=16, help="maps per measurement (default 16, as published)")
    parser.add_argument("--size", type=int, default=128, help="map size (default 128, as published)")
    parser.add_argument("--plot", type=Path, default=Path("docs/bilinear_variance.png"))
    args = parser.parse_args()
    variances = [round(0.01 * k, 2) for k in range(1, 100, 7)]  # 0.01 .. 0.99
    results = run(variances, args.maps, args.size)
    print(table(results, args.size))
    nearest = max(abs(measured_ratio(v, f, None, args.maps, args.size) - 1) for v in (0.01, 0.99) for f in FACTORS)
    print(f"\nnearest: |ratio - 1| <= {nearest:.1e}")
    plot(results, variances, args.size, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
