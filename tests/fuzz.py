"""Random decoders as source files, with ground truth from the generator: every coarse level is upsampled once by
interpolation and fused with the fine level, so a decoder has exactly ``levels`` sites. ``check`` runs equalize ->
calibrate -> fold (against the equalized model, at another size and batch) -> export_onnx (its own onnxruntime
checks) and raises on anything wrong.

    python tests/fuzz.py --count 500 --seed 7      # a larger sweep, counts by kind
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
FUSIONS = ("cat1x1", "cat3x3", "add", "sub", "stacksum")


def source(rng: random.Random) -> tuple[str, dict]:
    dims = rng.choice([1, 2, 2, 3])
    levels = rng.randint(1, 3)
    fusion = rng.choice(FUSIONS)
    loop, helper = rng.random() < 0.5, rng.random() < 0.4
    shared = fusion in ("add", "sub", "stacksum") and rng.random() < 0.4
    conv = f"nn.Conv{dims}d"
    c = 4
    lines = ["import torch, torch.nn.functional as F\nfrom torch import nn\n\n\nclass Decoder(nn.Module):",
             "    def __init__(self):", "        super().__init__()",
             f"        self.fine = {conv}(1, {c}, 3, padding=1)",
             f"        self.coarse = nn.ModuleList({conv}(1, {c}, 3, stride={2} ** (i + 1), padding=1) "
             f"for i in range({levels}))",
             f"        self.proj = {conv}({c}, {c}, 1)"]
    if fusion.startswith("cat"):
        k = 1 if fusion == "cat1x1" else 3
        lines.append(f"        self.fuse = {conv}({c * (levels + 1)}, 2, {k}, padding={k // 2})")
    else:
        lines.append(f"        self.fuse = {conv}({c}, 2, 1)")
    up = f"F.interpolate({{x}}, size=size, mode='{MODES[dims]}')"
    if helper:
        lines += ["", "    def up(self, x, size):", f"        return {up.format(x='x')}"]
        call = "self.up({x}, size)"
    else:
        call = up
    branch = "self.proj({u})" if shared else "{u}"
    lines += ["", "    def forward(self, x):", "        f = self.fine(x)", "        size = f.shape[2:]"]
    if loop:
        lines.append("        ups = [" + branch.format(u=call.format(x="torch.relu(c(x))")) + " for c in self.coarse]")
    else:
        lines += [f"        u{i} = " + branch.format(u=call.format(x=f"torch.relu(self.coarse[{i}](x))"))
                  for i in range(levels)]
        lines.append("        ups = [" + ", ".join(f"u{i}" for i in range(levels)) + "]")
    if fusion.startswith("cat"):
        lines.append("        return self.fuse(torch.cat([f, *ups], 1))")
    elif fusion == "stacksum":
        lines.append("        return self.fuse(torch.stack([f, *ups]).sum(0))")
    else:
        op = "+" if fusion == "add" else "-"
        lines += ["        out = f", "        for u in ups:", f"            out = out {op} u",
                  "        return self.fuse(out)"]
    kind = dict(dims=dims, levels=levels, fusion=fusion, loop=loop, helper=helper, shared=shared)
    return "\n".join(lines) + "\n", kind


def check(code: str, kind: dict, folder: Path, name: str) -> str:
    """Run one decoder through the pipeline; returns the fold outcome, raises on anything wrong."""
    import se_surgery as se

    path = folder / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.Decoder().eval()
    size = {1: 64, 2: 32, 3: 16}[kind["dims"]]
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 1, *[size] * kind["dims"], generator=g) for _ in range(2)]
    eq = se.equalize(model, (data[0],), data, progress=False)
    sites = len(se.equalizers(eq))
    if sites != kind["levels"]:
        raise AssertionError(f"{name}: {sites} sites, the generator made {kind['levels']} levels\n{code}")
    other = torch.randn(3, 1, *[size + 8 * 2] * kind["dims"], generator=g)
    folded = se.fold(eq)
    with torch.no_grad():
        a, b = folded(other), eq(other)
    if not (a - b).abs().max() <= 1e-4 * b.abs().max():
        raise AssertionError(f"{name}: fold differs by {(a - b).abs().max().item():.3g}\n{code}")
    se.export_onnx(eq, (data[0],), folder / f"{name}.onnx")  # raises unless onnxruntime confirms
    return "folded away" if not se.equalizers(folded) else "equalizers left"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    counts, failed, start = Counter(), [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.count):
            code, kind = source(rng)
            try:
                outcome = check(code, kind, Path(tmp), f"decoder_{i}")
            except Exception as error:  # noqa: BLE001 - counted and shown
                failed.append((i, f"{type(error).__name__}: {str(error)[:300]}"))
                continue
            counts.update([f"{kind['dims']}-D", kind["fusion"], outcome] + [k for k in ("loop", "helper", "shared")
                                                                            if kind[k]])
    print(f"{args.count} decoders, {len(failed)} failed, {time.perf_counter() - start:.0f} s")
    print(dict(sorted(counts.items())))
    for i, why in failed:
        print(f"decoder {i}: {why}", file=sys.stderr)


if __name__ == "__main__":
    main()
