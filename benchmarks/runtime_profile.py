"""How one eager forward of an equalized model reads: se_surgery's function calls per forward, the distinct
functions, and the *backward jumps* (a call to a function defined above the previous call's function in the same
file: the reader scrolls back up). Counted with ``sys.setprofile``: instruction-free counts, the same on any
machine, loaded or not.

Run: python benchmarks/runtime_profile.py      (a one-site toy and smp UPerNet at 64 px, eval mode, batch 1)
"""

import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import se_surgery as se

PACKAGE = os.path.dirname(os.path.abspath(se.__file__))


class Toy(nn.Module):
    """One site: ``fuse(cat(pa(x), up(relu(pb(x)))))``."""

    def __init__(self):
        super().__init__()
        self.pa, self.pb, self.fuse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        u = F.interpolate(torch.relu(self.pb(x)), scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([self.pa(x), u], 1))


def profile(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """(calls, distinct functions, backward jumps) of se_surgery code in one forward."""
    calls, functions, jumps, last = 0, set(), 0, {}

    def watch(frame, event, _arg):
        nonlocal calls, jumps
        if event != "call" or not frame.f_code.co_filename.startswith(PACKAGE):
            return
        code = frame.f_code
        calls += 1
        functions.add((code.co_filename, code.co_firstlineno))
        if code.co_firstlineno < last.get(code.co_filename, 0):
            jumps += 1
        last[code.co_filename] = code.co_firstlineno

    with torch.no_grad():
        model(x)  # (warm: first-call caches)
        sys.setprofile(watch)
        try:
            model(x)
        finally:
            sys.setprofile(None)
    return calls, len(functions), jumps


def main() -> None:
    import segmentation_models_pytorch as smp

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cases = {"one-site toy, 32 px": (Toy(), torch.randn(1, 3, 32, 32)),
             "smp UPerNet (resnet18), 64 px": (smp.UPerNet("resnet18", encoder_weights=None, classes=5),
                                               torch.randn(1, 3, 64, 64))}
    print(f"se_surgery at {PACKAGE}")
    print("| model | calls | functions | backward jumps |\n|---|---|---|---|")
    for name, (model, x) in cases.items():
        data = [torch.randn(2, *x.shape[1:]) for _ in range(2)]
        eq = se.equalize(model.eval(), (x,), data, progress=False)
        print(f"| {name} | " + " | ".join(map(str, profile(eq, x))) + " |")


if __name__ == "__main__":
    main()
