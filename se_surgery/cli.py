"""The se-surgery command line."""

from __future__ import annotations

import argparse
import sys
import time

from .images import IMAGENET_MEAN, IMAGENET_STD, read_images, read_labels
from .integrations.zoo import load_model
from .synthetic import synthetic_segmentation


def _demo(args: argparse.Namespace) -> int:
    """Equalize a zoo PSPNet on generated data, calibrate, take one fine-tuning step, print the sites.

    PSPNet: its pyramid's upsampled levels meet at one concatenation (the final merge), the placement the evidence
    supports (docs/evidence); UPerNet's chained top-down additions lose there.
    """
    import torch

    import se_surgery as se

    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        print("se-surgery demo needs the zoo extra: pip install 'se_surgery[zoo]'", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    size, classes = args.size, 5
    model = smp.PSPNet("resnet18", encoder_weights=None, classes=classes)  # random weights: nothing downloaded
    images, masks = synthetic_segmentation(args.batches * 2, size, classes)
    calibration = [images[i:i + 2] for i in range(0, len(images), 2)]
    start = time.perf_counter()
    eq = se.equalize(model, (images[:2],), calibration, progress=not args.quiet)
    took = time.perf_counter() - start
    print(se.describe(eq))
    print(f"equalize (capture, find, insert, calibrate on {len(calibration)} batches): {took:.2f} s")
    before = se.scale_report(model, (images[:2],), calibration, progress=not args.quiet)
    after = se.scale_report(eq, (images[:2],), calibration, progress=not args.quiet)
    print("\nbranch scales entering each fusion, before -> after (se-surgery inspect gives the full table):")
    for fusion in dict.fromkeys(r.fusion for r in after.rows):
        old = [r for r in before.rows if r.fusion == fusion]
        new = [r for r in after.rows if r.fusion == fusion]
        line = f"  {fusion}: std {_range(r.std for r in old)} -> {_range(r.std for r in new)}"
        if all(r.grad_rms for r in old + new):
            line += (f"; fusion-weight grad RMS spread {_spread(r.grad_rms for r in old):.2f}x -> "
                     f"{_spread(r.grad_rms for r in new):.2f}x")
        print(line)
    eq.train()
    optimizer = torch.optim.SGD(eq.parameters(), lr=0.01, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(eq(images[:2]), masks[:2])
    loss.backward()
    optimizer.step()
    print(f"one fine-tuning step: loss {loss.item():.4f}; the equalized {type(eq).__name__} trains as before")
    return 0


def _range(values) -> str:
    values = list(values)
    return f"{min(values):.3g}-{max(values):.3g}"


def _spread(values) -> float:
    values = list(values)
    return max(values) / min(values)


def _fold(args: argparse.Namespace) -> int:
    """Fold the scale equalizers of an ONNX file, checked by onnxruntime."""
    import os

    from .onnx import fold_onnx

    if not os.path.isfile(args.input):
        raise ValueError(f"{args.input}: no such file.")
    print(fold_onnx(args.input, args.output))
    return 0


def _as_input(spec: str, x):
    """The input form the model takes: transformers models take ``pixel_values=``."""
    return {"pixel_values": x} if spec.startswith("hf:") else (x,)


def _batches(args: argparse.Namespace) -> list:
    if args.data:
        images = read_images(args.data, args.size, args.batch_size, args.mean, args.std, args.max_images,
                             progress=not args.quiet)
    else:
        import torch

        generated, _ = synthetic_segmentation(args.synthetic, args.size, 5)
        images = list(torch.split(generated, args.batch_size))
    return [_as_input(args.model, x) for x in images]


def load_weighted(args: argparse.Namespace):
    """The model of --model with --weights loaded; a checkpoint of an equalized model gives it back equalized
    (``se_surgery.restore``), whatever made it: ``se-surgery equalize -o``, torch.save, safetensors."""
    import se_surgery as se
    from se_surgery.checkpoint import RECIPE_KEY, plain_entries, read_state_dict

    model = load_model(args.model).eval()
    if not args.weights:
        return model
    try:
        state = read_state_dict(args.weights)
    except se.SeSurgeryError as error:
        raise ValueError(f"--weights {error}") from error
    if any(isinstance(k, str) and k.endswith(RECIPE_KEY) for k in state):  # (under a wrapper's prefix too)
        return se.restore(model, args.weights).eval()
    try:
        model.load_state_dict(plain_entries(state, model, args.weights))
    except (RuntimeError, se.UsageError) as error:
        lines = str(error).splitlines()
        raise ValueError(f"--weights {args.weights}: not a state_dict of --model {args.model} "
                         f"({lines[1].strip() if isinstance(error, RuntimeError) and len(lines) > 1 else error})."
                         ) from error
    return model


def _export(args: argparse.Namespace) -> int:
    """Equalize a model (calibrated on the data, unless --weights is an equalized file), fold, export to ONNX."""
    import se_surgery as se

    model = load_weighted(args)
    data = _batches(args)
    example = _one(data[0])
    if not se.equalizers(model):
        model = se.equalize(model, example, data, where=_where(args), progress=not args.quiet)
    print(se.export_onnx(model, example, args.output, dynamic_spatial=False if args.static else None))
    return 0


def _one(batch):
    """The first image of a batch, in the same form (the export example)."""
    if isinstance(batch, dict):
        return {k: v[:1] for k, v in batch.items()}
    return tuple(t[:1] for t in batch)


def _inspect(args: argparse.Namespace) -> int:
    """Scales entering every fusion, before and after equalization (calibrated on the same data)."""
    import se_surgery as se

    model = load_weighted(args)
    data = _batches(args)
    example = data[0]
    targets = None
    if args.labels:
        if not args.data:
            raise ValueError("--labels goes with --data: label maps for the images there.")
        targets = read_labels(args.labels, args.data, args.size, args.batch_size, args.max_images)
    already = bool(se.equalizers(model))
    reports = []
    if already:
        print(se.describe(model))
    else:
        shown = None if _where(args).measured is not None else _where(args)  # (measured: decided when equalizing)
        reports.append(("before (the model as given)", se.scale_report(model, example, data, targets=targets,
                                                                      max_batches=None, progress=not args.quiet,
                                                                      where=shown)))
        if not reports[0][1].rows:
            print(reports[0][1])
            return 0
        model = se.equalize(model, example, data, where=_where(args), progress=not args.quiet)
    reports.append(("after (equalized)" if not already else "equalized, as loaded",
                    se.scale_report(model, example, data, targets=targets, max_batches=None,
                                    progress=not args.quiet)))
    for title, report in reports:
        print(f"\n## {title}\n")
        print(report.to_markdown() if args.markdown else report)
    grads = [r.grad_rms for _, report in reports for r in report.rows if r.grad_rms is not None]
    if grads and not any(grads):
        print("\nnote: every gradient is 0: the model has one output class (smp's default is classes=1), and the "
              "cross-entropy of one class is constant. Pass classes=N in the model SPEC.")
    if args.plot:
        before = reports[0][1] if len(reports) == 2 else None
        note = ", ".join(what for what, random in (("random weights", not args.weights),
                                                    ("generated data", not args.data)) if random)
        print(f"\nplot: {reports[-1][1].plot(args.plot, before=before, note=note or None)}")
    return 0


def _equalize(args: argparse.Namespace) -> int:
    """Equalize and calibrate a model; save its state_dict with what is needed to rebuild it."""
    import os

    import torch

    import se_surgery as se

    from .files import atomic_write

    model = load_weighted(args)
    if se.equalizers(model):
        raise ValueError(f"--weights {args.weights} is already equalized.")
    data = _batches(args)
    eq = se.equalize(model, data[0], data, per_channel=args.per_channel, branches=args.branches, where=_where(args),
                     preserve_function=args.preserve_function, progress=not args.quiet)
    print(se.describe(eq))
    sites = [e.site.name for e in se.equalizers(eq)]
    if not sites:
        raise ValueError(f"{args.model}: no interpolating upsampling feeds a fusion; nothing to save.")
    state = eq.state_dict()  # a plain state_dict: what rebuilding needs rides in it (se_surgery.restore)
    if args.output.endswith(".safetensors"):
        from safetensors.torch import save_file

        def save(tmp: str) -> None:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    else:
        def save(tmp: str) -> None:
            torch.save(state, tmp)
    path = atomic_write(args.output, save, [args.weights] if args.weights else [])
    print(f"saved {len(sites)} calibrated equalizer(s) and the weights to {os.fspath(path)}; load it with "
          f"--model '{args.model}' --weights {os.fspath(path)}, or in Python: "
          f"se_surgery.restore(model, {os.fspath(path)!r})")
    return 0


def _model_options(parser: argparse.ArgumentParser, size: int = 256) -> None:
    parser.add_argument("--model", required=True,
                        help="torchvision:NAME?key=value, smp:NAME?key=value&..., hf:CONFIG_JSON_OR_FOLDER or "
                             "path/file.py:factory?key=value (zoo models are built with random weights: nothing is "
                             "downloaded; give trained ones with --weights)")
    parser.add_argument("--weights", help="a state_dict to load: .safetensors, or a torch.save file (loaded with "
                                          "weights_only=True, never unpickling code); a file written by "
                                          "'se-surgery equalize' gives the equalized model")
    parser.add_argument("--size", type=int, default=size, help=f"image size in pixels (default {size})")


def _where_options(parser: argparse.ArgumentParser) -> None:
    from .where import PRESET_HELP

    group = parser.add_argument_group("where to equalize (combined with 'and')")
    group.add_argument("--where", choices=list(PRESET_HELP), default="every",
                       help="which fusions: " + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()) +
                            " (default every)")
    group.add_argument("--include", action="append", default=[], metavar="PATTERN",
                       help="equalize only sites whose name, owner module path, fusion or fusion owner matches "
                            "(a glob, e.g. 'decoder.psp*'; 're:' starts a regular expression); repeatable")
    group.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                       help="leave alone the sites that match (as --include); repeatable")


def _where(args: argparse.Namespace):
    from .where import Where, resolve

    preset = resolve(args.where)
    if not args.include and not args.exclude:
        return preset
    return Where(fusions=preset.fusions, place=preset.place, rule=preset.rule, measured=preset.measured,
                 include=tuple(args.include), exclude=tuple(args.exclude))


def _data_options(parser: argparse.ArgumentParser, synthetic: int) -> None:
    group = parser.add_argument_group("data (calibration and measurement)")
    group.add_argument("--data", help="a folder of images (jpg, png, ...; searched recursively, sorted by name): "
                                      "RGB, shorter side resized to --size, centre-cropped to a square, scaled to "
                                      "[0, 1], normalized with --mean/--std")
    group.add_argument("--synthetic", type=int, default=synthetic,
                       help=f"without --data: this many generated images (discs on noise; default {synthetic})"
                       if synthetic else "without --data: this many generated images, to try the command (the "
                                         "statistics of real data are what a deployed model needs)")
    group.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    group.add_argument("--max-images", type=int, help="read at most this many images from --data")
    group.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, metavar=("R", "G", "B"),
                       help="normalization mean (default ImageNet's 0.485 0.456 0.406)")
    group.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, metavar=("R", "G", "B"),
                       help="normalization std (default ImageNet's 0.229 0.224 0.225)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="se-surgery",
        description="Scale equalization for multi-level feature fusion (Kim & Kim, TMLR 2024): find the bilinear "
                    "upsamplings that feed a fusion in a segmentation model, insert calibrated scale equalizers, "
                    "and fold them away for deployment.",
        epilog="examples:\n"
               "  se-surgery demo\n"
               "  se-surgery inspect --model torchvision:deeplabv3_resnet50 --data images/ --plot scales.png\n"
               "  se-surgery equalize --model 'smp:PSPNet?encoder_name=resnet18&classes=19' --weights trained.pt "
               "--data images/ -o equalized.pt\n"
               "  se-surgery export --model 'smp:PSPNet?encoder_name=resnet18&classes=19' --weights equalized.pt "
               "--static -o model.onnx\n"
               "  se-surgery fold exported.onnx -o folded.onnx\n"
               "Run 'se-surgery COMMAND --help' for a command's options. Exit codes: 0 done, 1 the work failed "
               "(bad model, weights or data: one-line message, --debug for the traceback), 2 bad command line.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    common = argparse.ArgumentParser(add_help=False)  # also accepted after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                                   parents=[common])

    demo = command("demo", "equalize a random-weight smp PSPNet on generated data, print the sites and the "
                           "branch scales before/after (no downloads)")
    demo.add_argument("--size", type=int, default=128, help="image size (a multiple of 32; default 128)")
    demo.add_argument("--batches", type=int, default=4, help="calibration batches of 2 images (default 4)")
    demo.set_defaults(run=_demo)

    fold = command("fold", "fold the scale equalizers of an ONNX file (e.g. from torch.onnx.export, external "
                           "data beside it) into a self-contained file, checked by onnxruntime")
    fold.add_argument("input", help="the ONNX file to read (never overwritten)")
    fold.add_argument("-o", "--output", required=True, help="where to write the folded ONNX file")
    fold.set_defaults(run=_fold)

    inspect = command("inspect", "measure the scale (mean, std, E[x^2]) of every branch entering a fusion and the "
                                 "gradient of the fusion weights per branch, before and after equalization")
    _model_options(inspect)
    _data_options(inspect, synthetic=8)
    inspect.add_argument("--labels", help="a folder of label maps for --data (same relative names, .png; class ids, "
                                          "255 = ignore): the gradients are of the loss against them instead of "
                                          "against the model's own predictions")
    _where_options(inspect)
    inspect.add_argument("--markdown", action="store_true", help="print Markdown tables")
    inspect.add_argument("--plot", help="write a before/after bar plot (e.g. scales.png)")
    inspect.set_defaults(run=_inspect)

    equalize = command("equalize", "insert scale equalizers, calibrate them on your images and save the model's "
                                   "state_dict (reload with --model SPEC --weights FILE or se_surgery.restore)")
    _model_options(equalize)
    _data_options(equalize, synthetic=0)
    equalize.add_argument("--per-channel", action="store_true", help="one mean/std per channel (default: one "
                                                                      "scalar per site, the paper's)")
    equalize.add_argument("--branches", choices=["upsampled", "all"], default="upsampled",
                          help="equalize only the upsampled inputs of a fusion (paper, default) or all of them")
    _where_options(equalize)
    equalize.add_argument("--preserve-function", action="store_true", help="compensate the consumers so the "
                                                                          "model computes what it did before")
    equalize.add_argument("-o", "--output", required=True, help="the state_dict to write: .safetensors, else "
                                                                "torch.save (never over --weights)")
    equalize.set_defaults(run=_equalize)

    export = command("export", "equalize a model, then export it to ONNX with the equalizers folded, checked by "
                               "onnxruntime (dynamic batch; dynamic height/width unless the model pools adaptively "
                               "to fixed bins, as PSPNet and UPerNet do: export those once per deployment --size)")
    _model_options(export, size=512)
    _data_options(export, synthetic=8)
    _where_options(export)
    export.add_argument("--static", action="store_true", help="fixed height/width (models whose export bakes "
                                                              "the size in, e.g. adaptive pooling to fixed bins)")
    export.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    export.set_defaults(run=_export)
    return parser


def _writable(path: str) -> None:
    """Refuse an output path that cannot be written before any work starts, naming the path as given."""
    import os

    if os.path.isdir(path):
        raise ValueError(f"-o {path}: is a folder; give a file name.")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"-o {path}: cannot write there ({folder} is not a writable folder).")


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 the work failed (bad model or data), 2 bad command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "synthetic", 1) < 1 and not args.data:
        parser.error(f"{args.command} needs --data DIR (a folder of images), or --synthetic N to try it.")
    try:
        if getattr(args, "output", None):
            _writable(args.output)
        return args.run(args)
    except Exception as error:
        if args.debug:
            raise
        print(f"se-surgery: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
