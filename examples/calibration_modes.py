"""Which statistics do the equalizers need? The equalizers' output std in training and in eval mode, with statistics
measured on eval-mode running statistics (``norm="running"``) and on batch statistics (``norm="batch"``).

Models: smp PSPNet and UPerNet as ``examples/evidence.py`` builds and warms them up (seed 0, "shapes" scenes, eight
training-mode batches for the BatchNorm statistics, then calibration on those eight batches), and torchvision's
LR-ASPP with random weights (BatchNorm statistics untouched), calibrated on eight batches of random images.
Measured on the next eight batches of the same data. ``python examples/calibration_modes.py`` prints the table
(about a minute on 2 cores).
"""

from __future__ import annotations

import warnings

import torch

import se_surgery as se


def _outputs(eq, batches, train: bool) -> list[float]:
    seen = {e.name: [] for e in se.equalizers(eq)}
    hooks = [e.register_forward_hook(lambda m, i, o: seen[m.name].append(o.detach().flatten()))
             for e in se.equalizers(eq)]
    eq.train(train)
    try:
        with torch.no_grad():
            for x in batches:
                eq(x)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(v).std(correction=0).item() for v in seen.values()]


def _models():
    from evidence import build, shapes

    images, _ = shapes(384, 64, 1000)
    for name in ("PSPNet", "UPerNet"):
        torch.manual_seed(0)
        model = build(name, 5)
        order = torch.Generator().manual_seed(0)
        batches = [images[torch.randint(0, len(images), (8,), generator=order)] for _ in range(16)]
        model.train()
        with torch.no_grad():
            for x in batches[:8]:
                model(x)
        yield f"smp {name}, evidence setup", model, batches[:8], batches[8:]
    import torchvision.models.segmentation as tvs

    torch.manual_seed(0)
    model = tvs.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)
    batches = [torch.randn(2, 3, 128, 128) for _ in range(16)]
    yield "torchvision LR-ASPP, random weights", model, batches[:8], batches[8:]


def measure():
    """Per model and statistics: (label, norm, the equalizers' output stds in training mode, in eval mode)."""
    for label, model, calibration, held_out in _models():
        for norm in ("running", "batch"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (norm='running' on untrained norm layers warns: measured anyway)
                eq = se.equalize(model.train(), (calibration[0],), calibration, norm=norm, progress=False)
            evaluated = _outputs(eq, held_out, False)  # (first: training-mode forwards move the running statistics)
            yield label, norm, _outputs(eq, held_out, True), evaluated


def main() -> None:
    rows = ["| model | statistics | equalizers' output std, training mode | eval mode |", "|---|---|---|---|"]
    for label, norm, train, evaluated in measure():
        rows.append(f"| {label} | `norm={norm!r}` | {' / '.join(f'{s:.3g}' for s in train)} | "
                    f"{' / '.join(f'{s:.3g}' for s in evaluated)} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
