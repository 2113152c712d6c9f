"""Runtime overhead: the equalized (and the folded) model's eager forward against the original's, interleaved in
one process; the median over rounds of the per-round ratio.

The arms share the original's weight tensors wherever their values are the same (all but the convs fold changed):
two deep copies of one model differ by up to 2% on a CPU from where their weights lie in memory alone, which would
hide what is measured here, the runtime.

CPU (default): eval forward, batch 2, one thread, thread CPU time, at ``--sizes`` px (MONAI 3-D: a quarter of it per
side). Each arm runs as ``--copies`` deep copies (the original too), sharing those weights: where a copy's modules
lie in memory is worth about 1% of a small model's forward on its own, and averages out over copies.
GPU (``--device cuda``): CUDA events; batch 8 at 512 px (MONAI: 2 x 128^3), ResNet-50 encoders; eval fp32, eval
bf16 autocast, the folded model in bf16, and a training step (bf16 autocast, SGD) for each model.

The CPU table's first column is a second set of copies of the original against the first: the noise of the
method on this machine. ``--decompose`` splits the equalized model's cost in two more arms: *mechanism*, the
original with what the runtime does per call and none of its work (each owner's instance forward pauses its
caller's mode and, unless it runs bound (se_surgery/bound.py), enters a pass-through ``TorchFunctionMode`` around its
class's forward; every module it calls has the pausing hook pair, the model a no-op hook pair; no site is
recognised, nothing is equalized), and *no arithmetic*,
the equalized model whose equalizers return their input (the runtime's whole logic, none of the equalizers' arithmetic).

Run: python benchmarks/runtime_overhead.py [--rounds 40] [--sizes 64 192] [--decompose]   (a quiet machine)
     python benchmarks/runtime_overhead.py --device cuda [--rounds 20]
     python benchmarks/runtime_overhead.py --dry-run --rounds 1 --iters 1   (the GPU table's code, on the CPU)
"""

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import build  # noqa: E402

import se_surgery as se  # noqa: E402
from se_surgery.install import _callees  # noqa: E402


def segformer(size: str):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_labels=150) if size == "b0" else SegformerConfig(
        num_labels=150, hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768)
    return SegformerForSemanticSegmentation(config)


def segresnet_3d(small: bool = True):
    from monai.networks.nets import SegResNet

    if small:
        return SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 2, 2),
                         blocks_up=(1, 1))
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=3)


def _smp(name: str):
    import segmentation_models_pytorch as smp

    return lambda: getattr(smp, name)("resnet50", encoder_weights=None, classes=150)


CPU_MODELS = {"smp UPerNet": lambda: build("smp_UPerNet"), "smp FPN": lambda: build("smp_FPN"),
              "tv LR-ASPP": lambda: build("tv_lraspp"), "hf SegFormer-B0": lambda: segformer("b0"),
              "MONAI SegResNet 3-D": segresnet_3d}
GPU_MODELS = {"smp UPerNet r50": _smp("UPerNet"), "smp FPN r50": _smp("FPN"), "smp PSPNet r50": _smp("PSPNet"),
              "smp DeepLabV3+ r50": _smp("DeepLabV3Plus"), "hf SegFormer-B0": lambda: segformer("b0"),
              "hf SegFormer-B2": lambda: segformer("b2"), "MONAI SegResNet 3-D": lambda: segresnet_3d(False)}


def _input(name: str, batch: int, size: int, device: str) -> tuple[tuple, dict]:
    if "3-D" in name:
        return (torch.randn(batch, 1, size, size, size, device=device),), {}
    x = torch.randn(batch, 3, size, size, device=device)
    return ((), {"pixel_values": x}) if name.startswith("hf") else ((x,), {})


def _arms(model, args, kwargs) -> dict:
    x = args[0] if args else kwargs["pixel_values"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = se.equalize(model, args if args else kwargs, [x, x], progress=False)
    arms = {"original": model, "equalized": eq, "folded": se.fold(eq)}
    for arm in ("equalized", "folded"):
        _share_weights(model, arms[arm])
    return arms


def _share_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Point ``target``'s parameters and buffers at ``source``'s tensors of the same name and value."""
    modules = dict(source.named_modules())
    for path, module in target.named_modules():
        other = modules.get(path)
        for mine, theirs in ((module._parameters, getattr(other, "_parameters", {})),
                             (module._buffers, getattr(other, "_buffers", {}))):
            for key, value in mine.items():
                given = theirs.get(key)
                if value is not None and given is not None and value.shape == given.shape and \
                        torch.equal(value, given):
                    mine[key] = given


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]


# ------------------------------------------------------------------------------------------------------------------
# CPU


def _cpu_seconds(models, args, kwargs) -> float:
    start = time.thread_time()
    with torch.no_grad():
        for model in models:
            model(*args, **kwargs)
    return time.thread_time() - start


def _copies(model: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    copies = [copy.deepcopy(model) for _ in range(count)]
    for other in copies:
        _share_weights(model, other)
    return copies


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _mechanism(model: torch.nn.Module, equalized: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with the runtime's per-call mechanism and none of its work (see the module docstring)."""
    (mechanism,) = _copies(model, 1)
    sites = equalized.scale_equalizers.owners
    owners = [mechanism.get_submodule(p) for p in sites]
    paused = []

    def pause(_module=None, _args=None):
        depth = torch._C._len_torch_function_stack()
        top = torch._C._get_function_stack_at(depth - 1) if depth else None
        paused.append(torch._C._pop_torch_function_stack() if isinstance(top, _PassThrough) else None)

    def resume(_module=None, _args=None, _out=None):
        mode = paused.pop()
        if mode is not None:
            torch._C._push_on_torch_function_stack(mode)

    def owner_forward(owner, bound):  # (as OwnerForward: pause the caller's mode, enter its own unless bound)
        run = type(owner).forward

        def forward(*args, **kwargs):
            pause()
            try:
                if bound or isinstance(owner, torch.nn.Upsample):
                    return run(owner, *args, **kwargs)
                with _PassThrough():
                    return run(owner, *args, **kwargs)
            finally:
                resume()
        return forward

    mechanism.register_forward_pre_hook(lambda _module, _args: None)  # (the model's pair: which model runs)
    mechanism.register_forward_hook(lambda _module, _args, _out: None, always_call=True)
    for path, owner in zip(sites, owners):
        owner.forward = owner_forward(owner, sites[path].bound)
        for callee in _callees(owner):
            if all(callee is not o for o in owners):
                callee.register_forward_pre_hook(pause)
                callee.register_forward_hook(resume, always_call=True)
    return mechanism


def _without_arithmetic(equalized: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``equalized`` whose equalizers return their input."""
    (copied,) = _copies(equalized, 1)
    for equalizer in se.equalizers(copied):
        equalizer.forward = lambda x, source=None: x
    return copied


def cpu(args) -> None:
    torch.set_num_threads(1)
    labels = ["copy", "equalized", "folded"] + (["mechanism", "no arithmetic"] if args.decompose else [])
    print("| model | size | " + " | ".join(f"{label} / original" for label in labels) + " | left after fold |")
    print("|---|---|" + "---|" * (len(labels) + 1))
    for name, make in CPU_MODELS.items():
        if args.models and not any(m.lower() in name.lower() for m in args.models):
            continue
        torch.manual_seed(0)
        model = make().eval()
        for size in args.sizes:
            side = size // 4 if "3-D" in name else size
            a, k = _input(name, 2, side, "cpu")
            arms = {**_arms(model, a, k), "copy": model}
            if args.decompose:
                arms["mechanism"] = _mechanism(model, arms["equalized"])
                arms["no arithmetic"] = _without_arithmetic(arms["equalized"])
            arms = {label: _copies(m, args.copies) for label, m in arms.items()}
            for copies in arms.values():  # warm up
                _cpu_seconds(copies, a, k)
            ratios = {label: [] for label in labels}
            for _ in range(args.rounds):
                t = {label: _cpu_seconds(copies, a, k) for label, copies in arms.items()}
                for label in ratios:
                    ratios[label].append(t[label] / t["original"])
            where = f"{side}^3" if "3-D" in name else f"{size} px"
            print(f"| {name} | {where} | " + " | ".join(f"{statistics.median(ratios[label]):.3f}" for label in labels)
                  + f" | {len(se.equalizers(arms['folded'][0]))} |", flush=True)


# ------------------------------------------------------------------------------------------------------------------
# GPU


def _gpu_ms(step, iters: int, device: str) -> float:
    if device == "cpu":  # (--dry-run: wall time, only to see that the table runs)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - start) * 1000 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _eval_step(model, args, kwargs, dtype):
    def step():
        with torch.no_grad(), torch.autocast(_device(model), dtype=dtype, enabled=dtype is not None):
            model(*args, **kwargs)
    return step


def _train_step(model, args, kwargs):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(_device(model), dtype=torch.bfloat16):
            loss = _logits(model(*args, **kwargs)).float().square().mean()
        loss.backward()
        optimizer.step()
    return step


def _device(model: torch.nn.Module) -> str:
    return next(model.parameters()).device.type


def gpu(args) -> None:
    device = "cpu" if args.dry_run else "cuda"
    torch.backends.cudnn.benchmark = True
    where = "dry run on the CPU (batch 2, 64 px, MONAI 32^3; wall time)" if args.dry_run else \
        torch.cuda.get_device_name()
    print(f"{where}, torch {torch.__version__}; median over {args.rounds} interleaved rounds of the per-round ratio")
    print("| model | sites (left after fold) | eval fp32 eq / orig | eval bf16 eq / orig | folded bf16 / orig | "
          "train step bf16 eq / orig |")
    print("|---|---|---|---|---|---|")
    bf16 = torch.bfloat16
    for name, make in GPU_MODELS.items():
        torch.manual_seed(0)
        batch, side = (2, 128) if "3-D" in name else (8, 512)
        if args.dry_run:
            batch, side = 2, side // 4 if "3-D" in name else 64
        a, k = _input(name, batch, side, device)
        arms = _arms(make().to(device).eval(), a, k)
        columns = {
            "eval fp32": {label: _eval_step(arms[label], a, k, None) for label in ("original", "equalized")},
            "eval bf16": {label: _eval_step(arms[label], a, k, bf16) for label in ("original", "equalized")},
            "folded bf16": {label: _eval_step(arms[label], a, k, bf16) for label in ("original", "folded")},
            "train bf16": {label: _train_step(copy.deepcopy(arms[label]), a, k)
                           for label in ("original", "equalized")},
        }
        cells = []
        for steps in columns.values():
            for step in steps.values():  # warm up (cuDNN's choice of kernels)
                _gpu_ms(step, 3, device)
            ratios = []
            for _ in range(args.rounds):
                base, other = (_gpu_ms(step, args.iters, device) for step in steps.values())
                ratios.append(other / base)
            cells.append(f"{statistics.median(ratios):.3f}")
        print(f"| {name} | {len(se.equalizers(arms['equalized']))} ({len(se.equalizers(arms['folded']))}) | "
              + " | ".join(cells) + " |", flush=True)
        del arms, columns
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 192], help="CPU: input sizes")
    parser.add_argument("--copies", type=int, default=3, help="CPU: deep copies per arm")
    parser.add_argument("--models", nargs="+", help="CPU: only the models whose name contains one of these")
    parser.add_argument("--decompose", action="store_true", help="CPU: add the mechanism-only and no-arithmetic arms")
    parser.add_argument("--iters", type=int, default=5, help="GPU: steps per timed round")
    parser.add_argument("--dry-run", action="store_true",
                        help="GPU: run the GPU table's code on the CPU, small and untimed, before a device session")
    args = parser.parse_args()
    gpu(args) if args.device == "cuda" or args.dry_run else cpu(args)


if __name__ == "__main__":
    main()
