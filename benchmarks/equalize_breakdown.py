"""Where a whole ``se.equalize`` (with calibration data) spends its time, per phase, in units of one plain inference
pass over the same calibration data, measured in one process: the capture (torch.export, eval and training mode),
the verification run, the norm-mode probe, each calibration level, the check in the other norm mode, and the spread
measurement. Thread CPU time (``time.thread_time``), so a busy machine inflates the phases alike; the ratios are
what to read.

Run: python benchmarks/equalize_breakdown.py [--size 256] [--batches 4] [--batch 2] [--models smp_PSPNet smp_UPerNet]
"""

import argparse
import contextlib
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import build, inputs  # noqa: E402

import se_surgery as se  # noqa: E402

# the modules, not the functions of the same names that the package exports
EQUALIZE, CALIBRATE = sys.modules["se_surgery.equalize"], sys.modules["se_surgery.calibrate"]
# (module, function name, phase): the functions each phase runs in, wrapped with a timer while measuring
PHASES = [(EQUALIZE, "capture", "capture (torch.export)"),
          (EQUALIZE, "_training_calls", "training-mode capture"),
          (EQUALIZE, "_verify", "verify (one example forward)"),
          (CALIBRATE, "choose_norm", "norm-mode probe"),
          (CALIBRATE, "calibrate_level", "calibration levels"),
          (CALIBRATE, "_check_other_mode", "check in the other norm mode"),
          (EQUALIZE, "spreads", "spreads (premise) measurement")]


@contextlib.contextmanager
def timed(spent: dict):
    originals, depth = [], []
    for module, name, phase in PHASES:
        function = getattr(module, name)
        originals.append((module, name, function))

        def wrapper(*args, _function=function, _phase=phase, **kwargs):
            if depth:  # inside another phase (the training capture runs the capture): counted there
                return _function(*args, **kwargs)
            depth.append(_phase)
            start = time.thread_time()
            try:
                return _function(*args, **kwargs)
            finally:
                spent[_phase] += time.thread_time() - start
                depth.pop()

        setattr(module, name, wrapper)
    try:
        yield
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["smp_PSPNet", "smp_UPerNet"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name in args.models:
        model = build(name).train()
        data = [inputs(name, torch.randn(args.batch, 3, args.size, args.size)) for _ in range(args.batches)]
        with torch.no_grad():
            start = time.thread_time()
            for batch in data:
                model(*batch)
            plain = time.thread_time() - start
        spent: dict[str, float] = defaultdict(float)
        with warnings.catch_warnings(), timed(spent):
            warnings.simplefilter("ignore")
            start = time.thread_time()
            eq = se.equalize(model, data[0], data, progress=False)
            total = time.thread_time() - start
        levels = len({e.site.level for e in se.equalizers(eq)})
        print(f"\n{name}: {len(se.equalizers(eq))} sites, {levels} level(s); {args.batches} batches of "
              f"{args.batch}x3x{args.size}x{args.size}, 1 thread; one plain pass {plain:.2f} s")
        print("| phase | CPU s | plain passes |\n|---|---|---|")
        for _, _, phase in PHASES:
            print(f"| {phase} | {spent[phase]:.2f} | {spent[phase] / plain:.2f} |")
        rest = total - sum(spent.values())
        print(f"| the rest (find, attach, copies) | {rest:.2f} | {rest / plain:.2f} |")
        print(f"| **whole equalize** | {total:.2f} | {total / plain:.2f} |")


if __name__ == "__main__":
    main()
