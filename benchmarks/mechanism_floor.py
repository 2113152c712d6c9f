"""The floor of a runtime without a ``TorchFunctionMode``: what equalizing costs if each owner's forward ran its
class's ``forward`` function with globals in which ``F.interpolate`` (and ``nn.functional.interpolate``) is a
wrapper that finds its site by (source line, occurrence) from the caller's frame and equalizes the resize's input.
No mode, no callee hooks, no model hooks; the same recognition arithmetic as the runtime's for resize sites. A
prototype for measuring (issue 38's choice of mechanism), not the package's runtime: it handles only resize sites
called through those names in the owner's own ``forward``, first calls, eager eval.

Arms as in runtime_overhead.py (3 deep copies each sharing the original's weights, interleaved, thread CPU time,
median of per-round ratios), batch 2 at 64 px, one thread; it checks that the prototype computes what the equalized
model computes before timing it.

Run: python benchmarks/mechanism_floor.py [--rounds 40] [--models UPerNet SegFormer-B0]   (a quiet machine)
"""

import argparse
import statistics
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime_overhead as ro  # noqa: E402

import se_surgery as se  # noqa: E402
from se_surgery.site import CallKey, source_key  # noqa: E402


def install(model: torch.nn.Module, equalized: torch.nn.Module) -> None:
    """Give ``model``'s owners (those of ``equalized``) the mode-free forward, using ``equalized``'s equalizers."""
    reg = equalized.scale_equalizers
    for path, owner in reg.owners.items():
        module = model.get_submodule(path)
        function = type(module).forward
        seen: dict[str, int] = {}

        def interpolate(input, *args, _seen=seen, _owner=owner, **kwargs):
            frame = sys._getframe(1)
            while frame.f_code.co_name != "forward":  # (a comprehension's frame: its forward's line)
                frame = frame.f_back
            source = source_key(frame.f_code.co_filename, frame.f_lineno)
            occurrence = _seen.get(source, 0)
            _seen[source] = occurrence + 1
            targets = _owner.sites.get(CallKey(0, "resize", source, occurrence))
            if targets is None:
                return F.interpolate(input, *args, **kwargs)
            (name,) = targets.values()
            return F.interpolate(reg[name](input), *args, **kwargs)

        functional = types.ModuleType("functional")
        functional.__dict__.update(F.__dict__)
        functional.interpolate = interpolate
        nn = types.ModuleType("nn")
        nn.__dict__.update(torch.nn.__dict__)
        nn.functional = functional
        names = {**function.__globals__, **({"F": functional} if "F" in function.__globals__ else {}),
                 **({"nn": nn} if "nn" in function.__globals__ else {})}
        bound = types.FunctionType(function.__code__, names, function.__name__, function.__defaults__,
                                   function.__closure__)

        def forward(*args, _bound=bound, _module=module, _seen=seen, **kwargs):
            _seen.clear()
            return _bound(_module, *args, **kwargs)

        module.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--models", nargs="+", default=["UPerNet", "SegFormer-B0"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | copy / original | equalized / original | mode-free floor / original |\n|---|---|---|---|")
    for name, make in ro.CPU_MODELS.items():
        if not any(m.lower() in name.lower() for m in args.models):
            continue
        torch.manual_seed(0)
        model = make().eval()
        a, k = ro._input(name, 2, 64, "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eq = se.equalize(model, a if a else k, [a[0] if a else k["pixel_values"]] * 2, progress=False)
        ro._share_weights(model, eq)
        floor = ro._copies(model, 3)
        for copy in floor:
            install(copy, eq)
        with torch.no_grad():
            if not torch.allclose(ro._logits(floor[0](*a, **k)), ro._logits(eq(*a, **k)), atol=1e-5):
                raise SystemExit(f"{name}: the prototype does not compute what the equalized model does")
        arms = {"original": ro._copies(model, 3), "copy": ro._copies(model, 3), "equalized": ro._copies(eq, 3),
                "floor": floor}
        for copies in arms.values():
            ro._cpu_seconds(copies, a, k)  # warm up
        ratios = {label: [] for label in arms}
        for _ in range(args.rounds):
            t = {label: ro._cpu_seconds(copies, a, k) for label, copies in arms.items()}
            for label in ratios:
                ratios[label].append(t[label] / t["original"])
        print(f"| {name}, 64 px | " + " | ".join(f"{statistics.median(ratios[label]):.3f}"
                                               for label in ("copy", "equalized", "floor")) + " |", flush=True)


if __name__ == "__main__":
    main()
