"""onnxruntime latency at 512x512 of: the original model's export, the equalized unfolded export, and the folded
export, as ratios to the original (median of repeated runs, interleaved in one process), plus node counts.
Run: python benchmarks/onnx_fold.py [--repeats 30]
     python benchmarks/onnx_fold.py --counts     # the node counts alone (exact; no timing: docs/performance.md)
"""

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import batches, build, inputs  # noqa: E402

import se_surgery as se  # noqa: E402

MODELS = ["tv_lraspp", "smp_DeepLabV3", "smp_Segformer", "smp_FPN", "smp_UPerNet", "hf_segformer"]
STATIC = {"smp_UPerNet"}  # adaptive pooling to fixed bins: torch.onnx bakes the size in


def _export(model, example, path, dynamic):
    """torch.onnx.export as se.export_onnx calls it: dynamic batch (exported on a batch of two, as a batch of one is
    specialised), and dynamic height/width where the model allows them."""
    auto = torch.export.Dim.AUTO
    shapes = {0: auto, **({2: auto, 3: auto} if dynamic else {})}
    def two(t):
        return t.expand(2, *t.shape[1:]).contiguous()

    example = {k: two(v) for k, v in example.items()} if isinstance(example, dict) else tuple(map(two, example))
    if isinstance(example, dict):
        torch.onnx.export(model, (), kwargs=example, dynamo=True, verbose=False,
                          dynamic_shapes={"pixel_values": shapes}).save(path)
    else:
        torch.onnx.export(model, example, dynamo=True, verbose=False, dynamic_shapes=(shapes,)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--counts", action="store_true", help="node counts only (no onnxruntime timing)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    print("| model | sites | nodes original / unfolded / folded | latency original (ms) | unfolded / original "
          "| folded / original |\n|---|---|---|---|---|---|")
    for name in MODELS:
        x = torch.randn(1, 3, args.size, args.size)
        example = inputs(name, x)
        model = build(name)
        eq = se.equalize(model, inputs(name, torch.randn(2, 3, 128, 128)), batches(name), progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {k: f"{tmp}/{k}.onnx" for k in ("original", "unfolded", "folded")}
            _export(model, example, paths["original"], name not in STATIC)
            _export(eq, example, paths["unfolded"], name not in STATIC)
            se.export_onnx(eq, example, paths["folded"], dynamic_spatial=name not in STATIC)
            sessions = {k: ort.InferenceSession(p, options, providers=["CPUExecutionProvider"])
                        for k, p in paths.items()}
            nodes = {k: len(onnx.load(p).graph.node) for k, p in paths.items()}
            if args.counts:
                print(f"| {name} | {len(list(se.equalizers(eq)))} | {nodes['original']} / {nodes['unfolded']} / "
                      f"{nodes['folded']} |", flush=True)
                continue
            feed = {sessions["original"].get_inputs()[0].name: x.numpy().astype(np.float32)}
            times = {k: [] for k in sessions}
            for s in sessions.values():
                s.run(None, feed)  # warm-up
            for _ in range(args.repeats):  # interleaved, so drift hits all three alike
                for k, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, feed)
                    times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        sites = len(list(se.equalizers(eq)))
        print(f"| {name} | {sites} | {nodes['original']} / {nodes['unfolded']} / {nodes['folded']} | "
              f"{med['original'] * 1e3:.1f} | {med['unfolded'] / med['original']:.3f} | "
              f"{med['folded'] / med['original']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
