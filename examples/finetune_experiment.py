"""Does scale equalization help training? Three arms, several seeds, on a CPU in under 30 minutes.

Model: smp PSPNet (ResNet-18 encoder to 1/8, random init: no ImageNet weights offline): its pyramid pooling
module upsamples four pooled maps (bins 1, 2, 3, 6) bilinearly and concatenates them with the 1/8 map before a 1x1
conv, so preserve_function is exact (smp UPerNet's top-down *additions* cannot be compensated; see README). Task:
generated "shapes" (no real segmentation data set ships in an installable package): bright textured squares and
discs, small or large, on a textured background; 5 classes = background + {square, disc} x {small, large}. Object
pixels all share one brightness and texture, so the class of a pixel depends on the extent and outline of its
object (coarse levels) and the boundary on the fine level: multi-level fusion matters.

Arms (same total number of SGD steps, same data order per seed):
  baseline      the model as is
  equalized     se.equalize at the start (the paper's default: scalar statistics, upsampled branches)
  preserve      baseline for the first third, then se.equalize(preserve_function=True), then the rest

Optimizer: SGD, momentum 0.9, lr 0.01, polynomial decay (mmsegmentation's ResNet schedule): a plain SGD is what
the paper's gradient-scale argument is about (Adam rescales each parameter's gradient). Logged every 20 steps:
the RMS gradient of the PSP fusion conv's weight slice per branch (the 1/8 map and the four upsampled pooled maps).

    python examples/finetune_experiment.py        # 3 seeds x 3 arms x 1200 steps (time measured: README)
    python examples/finetune_experiment.py --steps 60 --seeds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

import se_surgery as se

CLASSES = 5
ARMS = ("baseline", "equalized", "preserve")


def shapes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (3 x size x size) and label maps: textured squares and discs, small or large."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images = torch.randn(n, 3, size, size, generator=gen) * 0.6
    images += F.interpolate(torch.randn(n, 3, size // 8, size // 8, generator=gen), size=(size, size),
                            mode="bilinear") * 0.4  # low-frequency background clutter
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(2, 5, (1,), generator=gen))):
            large = bool(torch.randint(0, 2, (1,), generator=gen))
            disc = bool(torch.randint(0, 2, (1,), generator=gen))
            radius = size * (0.16 + 0.06 * float(torch.rand(1, generator=gen)) if large
                             else 0.045 + 0.02 * float(torch.rand(1, generator=gen)))
            cy, cx = (torch.rand(2, generator=gen) * size).tolist()
            inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2) if disc else \
                (((yy - cy).abs() < radius * 0.886) & ((xx - cx).abs() < radius * 0.886))  # same area as a disc
            masks[i][inside] = 1 + 2 * int(disc) + int(large)
            images[i, :, inside] += 1.0
    return images, masks


def miou(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    model.eval()
    confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    with torch.no_grad():
        for k in range(0, len(images), 16):
            pred = model(images[k:k + 16]).argmax(1)
            confusion += torch.bincount(masks[k:k + 16].flatten() * CLASSES + pred.flatten(),
                                        minlength=CLASSES**2).view(CLASSES, CLASSES)
    inter = confusion.diag().float()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    return (inter / union.clamp_min(1)).mean().item()


def fusion_slices(model: torch.nn.Module, example: torch.Tensor, data: list) -> dict[str, tuple[str, slice]]:
    """The fusion conv's weight slice per branch, found by se.scale_report (labels: 1/8 or the upsampling factor)."""
    report = se.scale_report(model, (example,), data[:1], progress=False)
    final = [r for r in report.rows if r.consumer and r.fusion == report.rows[-1].fusion]
    return {(f"x{r.factor:.3g}" if r.factor else "1/8"): (r.consumer, slice(*r.channels)) for r in final}


def run_arm(arm: str, seed: int, args, train, test, log: list) -> float:
    torch.manual_seed(seed)
    model = smp.PSPNet("resnet18", encoder_weights=None, classes=CLASSES)
    images, masks = train
    order = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(images), (args.batch,), generator=order) for _ in range(args.steps)]
    calibration = [images[b] for b in batches[:8]]
    model.train()
    with torch.no_grad():  # BatchNorm statistics of the data before calibration (random init has 0/1)
        for x in calibration:
            model(x)
    if arm == "equalized":
        model = se.equalize(model, (calibration[0],), calibration, progress=False)
    slices = fusion_slices(model, calibration[0], calibration)
    switch = args.steps // 3 if arm == "preserve" else -1
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    for step, b in enumerate(batches):
        if step == switch:
            model = se.equalize(model, (calibration[0],), [images[bb] for bb in batches[step:step + 8]],
                                preserve_function=True, progress=False)
            state = optimizer.state_dict()  # same parameters, same order: keep the momentum
            optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
            optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (1 - step / args.steps) ** 0.9
        model.train()
        loss = F.cross_entropy(model(images[b]), masks[b])
        optimizer.zero_grad()
        loss.backward()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{arm} seed {seed}: loss diverged at step {step}")
        if step % 20 == 0 or step == args.steps - 1:
            grads = {label: model.get_parameter(key).grad[:, sl].pow(2).mean().sqrt().item()
                     for label, (key, sl) in slices.items()}
            log.append({"arm": arm, "seed": seed, "step": step, "loss": loss.item(), "grad_rms": grads})
        optimizer.step()
    return miou(model, *test)


def plot(results: dict, log: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ARMS) + 1, figsize=(15, 3.6))
    for ax, arm in zip(axes, ARMS):
        rows = [r for r in log if r["arm"] == arm]
        steps = sorted({r["step"] for r in rows})
        for label in rows[0]["grad_rms"]:
            mean = [statistics.mean(r["grad_rms"][label] for r in rows if r["step"] == s) for s in steps]
            ax.plot(steps, mean, label=label)
        ax.set_yscale("log")
        ax.set_title(f"{arm}: fusion-conv grad RMS per branch", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    for k, arm in enumerate(ARMS):
        values = results[arm]
        ax.bar(k, statistics.mean(values), yerr=statistics.pstdev(values), capsize=4)
        ax.plot([k] * len(values), values, "k.", ms=4)
    ax.set_xticks(range(len(ARMS)), ARMS)
    ax.set_title("test mIoU (mean, std, seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/finetune"))
    parser.add_argument("--report", action="store_true", help="only write results.md and the plot from OUT/log.json")
    args = parser.parse_args()
    if args.report:
        recorded = json.loads((args.out / "log.json").read_text())
        report(recorded["results"], recorded["log"], args.out)
        return
    torch.set_num_threads(args.threads)
    train = shapes(512, args.size, seed=1000)
    test = shapes(128, args.size, seed=2000)
    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    log: list = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        for arm in ARMS:
            results[arm].append(run_arm(arm, seed, args, train, test, log))
            print(f"seed {seed} {arm:9s} mIoU {results[arm][-1]:.4f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    print(f"total {time.perf_counter() - start:.0f} s; {args.seeds} seeds x {len(ARMS)} arms x {args.steps} steps")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "log.json").write_text(json.dumps({"results": results, "log": log, "args": vars(args)}, default=str))
    report(results, log, args.out)


def report(results: dict[str, list[float]], log: list, out: Path) -> None:
    """``out/results.md`` (the table) and ``out/finetune.png`` from the runs' results and log."""
    lines = ["| arm | test mIoU, mean | std | per seed |", "|---|---|---|---|"]
    for arm in ARMS:
        v = results[arm]
        lines.append(f"| {arm} | {statistics.mean(v):.4f} | {statistics.pstdev(v):.4f} | "
                     f"{', '.join(f'{x:.4f}' for x in v)} |")
    first = {arm: next(r for r in log if r["arm"] == arm and r["step"] == 0)["grad_rms"] for arm in ARMS}
    lines += ["", "Fusion-conv grad RMS at step 0, per branch, seed 0:", ""]
    lines += [f"- {arm}: " + ", ".join(f"{k} {v:.3g}" for k, v in first[arm].items()) for arm in ARMS]
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    plot(results, log, out / "finetune.png")

if __name__ == "__main__":
    main()
