"""Per zoo model: sites found, time of equalize without calibration (capture + find + insert + check) and of one
plain forward pass of the same model, measured side by side in one process. Run: python benchmarks/equalize_time.py
"""

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import BUILDERS, build, inputs  # noqa: E402

import se_surgery as se  # noqa: E402


def _median_time(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    print("| model | sites | equalize (s) | forward (s) | ratio |\n|---|---|---|---|---|")
    for name in BUILDERS:
        model = build(name)
        example = inputs(name, torch.randn(2, 3, 128, 128))
        args, kwargs = ((), example) if isinstance(example, dict) else (example, {})
        with torch.no_grad():
            model(*args, **kwargs)  # warm-up
            forward = _median_time(lambda: model(*args, **kwargs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            equalize = _median_time(lambda: se.equalize(model, example, progress=False))
            sites = len(list(se.equalizers(se.equalize(model, example, progress=False))))
        print(f"| {name} | {sites} | {equalize:.2f} | {forward:.3f} | {equalize / forward:.0f} |", flush=True)


if __name__ == "__main__":
    main()
