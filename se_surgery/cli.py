"""The se-surgery command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """Equalize a zoo UPerNet on generated data, calibrate, take one fine-tuning step, print the sites."""
    import torch

    import se_surgery as se

    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        print("se-surgery demo needs the zoo extra: pip install 'se_surgery[zoo]'", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    size, classes = args.size, 5
    model = smp.UPerNet("resnet18", encoder_weights=None, classes=classes)  # random weights: nothing downloaded
    images, masks = synthetic_segmentation(args.batches * 2, size, classes)
    calibration = [images[i:i + 2] for i in range(0, len(images), 2)]
    start = time.perf_counter()
    eq = se.equalize(model, (images[:2],), calibration, progress=not args.quiet)
    took = time.perf_counter() - start
    print(se.describe(eq))
    print(f"equalize (capture, find, insert, calibrate on {len(calibration)} batches): {took:.2f} s")
    eq.train()
    optimizer = torch.optim.SGD(eq.parameters(), lr=0.01, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(eq(images[:2]), masks[:2])
    loss.backward()
    optimizer.step()
    print(f"one fine-tuning step: loss {loss.item():.4f}; the equalized {type(eq).__name__} trains as before")
    return 0


def _fold(args: argparse.Namespace) -> int:
    """Fold the scale equalizers of an ONNX file, checked by onnxruntime."""
    from .onnx import fold_onnx

    print(fold_onnx(args.input, args.output))
    return 0


def load_model(spec: str):
    """A model from a SPEC: torchvision:NAME, smp:NAME?key=value&..., hf:CONFIG_OR_FOLDER, path/file.py:factory.

    Zoo models are built with random weights (nothing is downloaded); load trained weights with --weights.
    """
    import importlib.util
    from urllib.parse import parse_qsl

    kind, _, rest = spec.partition(":")
    name, _, query = rest.partition("?")
    options = {k: _literal(v) for k, v in parse_qsl(query)}
    if kind == "torchvision":
        import torchvision.models.segmentation as tvs

        return getattr(tvs, name)(weights=None, weights_backbone=None, **options)
    if kind == "smp":
        import segmentation_models_pytorch as smp

        return getattr(smp, name)(**{"encoder_weights": None, **options})
    if kind == "hf":
        from transformers import AutoConfig, AutoModelForSemanticSegmentation

        return AutoModelForSemanticSegmentation.from_config(AutoConfig.from_pretrained(name))
    if rest and spec.endswith(f":{rest}") and kind.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("se_surgery_user_model", kind)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return getattr(module, name)(**options)
    raise ValueError(f"unknown model SPEC {spec!r}: use torchvision:NAME, smp:NAME?key=value, hf:PATH or "
                     f"file.py:factory")


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _export(args: argparse.Namespace) -> int:
    """Equalize a model (calibrated on generated data unless weights bring statistics), fold, export to ONNX."""
    import torch

    import se_surgery as se

    model = load_model(args.model).eval()
    x = torch.randn(1, 3, args.size, args.size)
    example = {"pixel_values": x} if args.model.startswith("hf:") else (x,)
    images, _ = synthetic_segmentation(args.synthetic, args.size, 5)
    data = [({"pixel_values": images[i:i + 1]} if isinstance(example, dict) else images[i:i + 1])
            for i in range(len(images))]
    eq = se.equalize(model, example, data, progress=not args.quiet)
    if args.weights:
        from safetensors.torch import load_file

        state = load_file(args.weights) if args.weights.endswith(".safetensors") else \
            torch.load(args.weights, weights_only=True, map_location="cpu")
        eq.load_state_dict(state)
    print(se.export_onnx(eq, example, args.output, dynamic_spatial=not args.static))
    return 0


def synthetic_segmentation(n: int, size: int, classes: int, seed: int = 0):
    """Images with filled discs of several sizes (one class each) on noise, and their masks."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.randn(n, 3, size, size, generator=gen) * 0.3
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(4):
            cls = int(torch.randint(1, classes, (1,), generator=gen))
            radius = float(size) / 2 ** float(torch.randint(2, 5, (1,), generator=gen))
            cy, cx = (torch.rand(2, generator=gen) * size).tolist()
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            masks[i][disc] = cls
            images[i, :, disc] += torch.linspace(-1, 1, classes)[cls] + torch.randn(3, 1, generator=gen) * 0.2
    return images, masks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="se-surgery",
        description="Scale equalization for multi-level feature fusion (Kim & Kim, TMLR 2024): find the bilinear "
                    "upsamplings that feed a fusion in a segmentation model, insert calibrated scale equalizers, "
                    "and fold them away for deployment.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="equalize a random-weight smp UPerNet on generated data and print the "
                                            "sites (no downloads, about 10 s on a CPU)")
    demo.add_argument("--size", type=int, default=128, help="image size (a multiple of 32; default 128)")
    demo.add_argument("--batches", type=int, default=4, help="calibration batches of 2 images (default 4)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    fold = commands.add_parser("fold", help="fold the scale equalizers of an ONNX file (e.g. from torch.onnx.export)"
                                            " into the convolutions around them, checked by onnxruntime")
    fold.add_argument("input", help="the ONNX file to read (never overwritten)")
    fold.add_argument("-o", "--output", required=True, help="where to write the folded ONNX file")
    fold.set_defaults(run=_fold)

    export = commands.add_parser("export", help="equalize a model, then export it to ONNX with the equalizers "
                                                "folded (dynamic batch/height/width), checked by onnxruntime")
    export.add_argument("--model", required=True, help="torchvision:NAME, smp:NAME?key=value&..., hf:CONFIG_OR_DIR "
                                                       "or path/file.py:factory (zoo models get random weights)")
    export.add_argument("--weights", help="an equalized state_dict (.safetensors or a torch.save file; loaded with "
                                          "weights_only=True) to load before exporting")
    export.add_argument("--size", type=int, default=512, help="example image size (default 512)")
    export.add_argument("--synthetic", type=int, default=8, help="generated calibration images (default 8)")
    export.add_argument("--static", action="store_true", help="fixed height/width (models whose export bakes "
                                                              "the size in, e.g. adaptive pooling to fixed bins)")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    export.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    export.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 the work failed (bad model or data), 2 bad command line."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as error:
        if args.debug:
            raise
        print(f"se-surgery: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
