"""Calibration cost: one calibration pass against one plain inference pass (eval, no_grad) over the same batches,
measured side by side in one process, interleaved, the fastest of several repeats (timeit's rule: the
minimum is the run least disturbed by the rest of the machine). Chained sites take one pass per
level, so a whole calibration costs about ``levels`` x the per-pass ratio.

Run: python benchmarks/calibration_cost.py [--size 256] [--batches 4] [--repeats 5]
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import build, inputs  # noqa: E402

import se_surgery as se  # noqa: E402
from se_surgery.calibrate import calibrate_level  # noqa: E402


def segformer_b0():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=150)).eval()  # B0: the config defaults


MODELS = {"smp_PSPNet": None, "smp_DeepLabV3": None, "smp_UPerNet": None, "hf_segformer_b0": segformer_b0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"| model | sites | levels (passes) | plain pass (s) | calibration pass (s) | ratio per pass | whole "
          f"calibration / plain pass |\n|---|---|---|---|---|---|---|   ({args.batches} batches of 2x3x{args.size}"
          f"x{args.size}, CPU, 2 threads)")
    for name, builder in MODELS.items():
        model = builder() if builder else build(name)
        key = "hf_segformer" if name.startswith("hf_") else name
        data = [inputs(key, torch.randn(2, 3, args.size, args.size)) for _ in range(args.batches)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eq = se.equalize(model, data[0], data, progress=False)
        eqs = se.equalizers(eq)
        levels = sorted({e.site.level for e in eqs})

        def plain():
            with torch.no_grad():
                for batch in data:
                    model(**batch) if isinstance(batch, dict) else model(*batch)

        def one_pass():  # the level-0 pass; every level's pass runs the same model over the same data
            calibrate_level(eq, [e for e in eqs if e.site.level == 0], data, progress=False)

        def whole():
            se.calibrate(eq, data, progress=False)

        times = {"plain": [], "pass": [], "whole": []}
        plain(), one_pass()  # warm-up
        for _ in range(args.repeats):
            for label, fn in (("plain", plain), ("pass", one_pass), ("whole", whole)):
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
        p, c, w = (min(times[k]) for k in ("plain", "pass", "whole"))
        print(f"| {name} | {len(eqs)} | {len(levels)} | {p:.3f} | {c:.3f} | {c / p:.3f} | {w / p:.2f} |")


if __name__ == "__main__":
    main()
