"""Runtime overhead: the equalized (and the folded) model's eager eval forward against the original's, batch 2, one
thread, thread CPU time, interleaved in one process; the median over rounds of the per-round ratio.

Run: python benchmarks/runtime_overhead.py [--rounds 40] [--sizes 64 192]   (a quiet machine: no other job)
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import build  # noqa: E402

import se_surgery as se  # noqa: E402


def segformer_b0():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=150)).eval()


def segresnet_3d():
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 2, 2),
                     blocks_up=(1, 1)).eval()


MODELS = {"smp UPerNet": lambda: build("smp_UPerNet"), "smp FPN": lambda: build("smp_FPN"),
          "tv LR-ASPP": lambda: build("tv_lraspp"), "hf SegFormer-B0": segformer_b0,
          "MONAI SegResNet 3-D": segresnet_3d}


def _inputs(name: str, size: int) -> tuple[tuple, dict]:
    if "3-D" in name:
        side = size // 4
        return (torch.randn(2, 1, side, side, side),), {}
    x = torch.randn(2, 3, size, size)
    return ((), {"pixel_values": x}) if name.startswith("hf") else ((x,), {})


def _cpu_seconds(model, args, kwargs) -> float:
    start = time.thread_time()
    with torch.no_grad():
        model(*args, **kwargs)
    return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 192])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | size | equalized / original | folded / original | equalizers left after fold |")
    print("|---|---|---|---|---|")
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make().eval()
        for size in args.sizes:
            a, k = _inputs(name, size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                eq = se.equalize(model, a if a else k, [a[0] if a else k["pixel_values"]] * 2, progress=False)
            folded = se.fold(eq)
            models = {"original": model, "equalized": eq, "folded": folded}
            for m in models.values():  # warm up
                _cpu_seconds(m, a, k)
            ratios = {"equalized": [], "folded": []}
            for _ in range(args.rounds):
                t = {label: _cpu_seconds(m, a, k) for label, m in models.items()}
                for label in ratios:
                    ratios[label].append(t[label] / t["original"])
            side = f"{size // 4}^3" if "3-D" in name else f"{size} px"
            print(f"| {name} | {side} | {statistics.median(ratios['equalized']):.3f} | "
                  f"{statistics.median(ratios['folded']):.3f} | {len(se.equalizers(folded))} |", flush=True)


if __name__ == "__main__":
    main()
