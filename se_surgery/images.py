"""Reading a folder of images (and their label maps) into batches, for the command line."""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _image_files(folder: str, limit: int | None):
    """The images under ``folder``, sorted by path: the one order images and their label maps are read in."""
    from pathlib import Path

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--data {folder}: not a folder of images.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"--data {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it.")
    return files


def read_images(folder: str, size: int, batch_size: int = 4, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                limit: int | None = None, progress: bool = True) -> list:
    """Batches of the images in ``folder`` (sorted by name): RGB, shorter side resized to ``size`` (bilinear,
    antialiased), centre-cropped to ``size`` x ``size``, scaled to [0, 1], then normalized by ``mean``/``std``."""

    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF
    from tqdm.auto import tqdm

    images = []
    for path in tqdm(_image_files(folder, limit), desc="reading images", disable=not progress, leave=False):
        try:
            image = decode_image(str(path), mode=ImageReadMode.RGB)
        except Exception as error:
            raise ValueError(f"--data: cannot read {path} ({error}).") from error
        image = TF.center_crop(TF.resize(image, size, antialias=True), [size, size])
        images.append(TF.normalize(image.float() / 255, list(mean), list(std)))
    return list(torch.stack(images).split(batch_size))


def read_labels(labels: str, folder: str, size: int, batch_size: int = 4, limit: int | None = None) -> list:
    """Label maps for the images of ``read_images(folder, ...)``: for ``folder/a/b.jpg``, ``labels/a/b.png`` (class
    ids as pixel values, 255 = ignore; greyscale or palette PNG), resized (nearest) and cropped like the image."""
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    maps = []
    for path in _image_files(folder, limit):
        label = Path(labels) / path.relative_to(folder).with_suffix(".png")
        if not label.exists():
            raise ValueError(f"--labels: no label map {label} for the image {path}.")
        with Image.open(label) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"--labels: {label} is a {image.mode} image; label maps hold one class id per "
                                 f"pixel (greyscale or palette PNG).")
            ids = torch.from_numpy(np.array(image).astype(np.int64))[None]
        ids = TF.resize(ids, size, interpolation=InterpolationMode.NEAREST_EXACT)
        maps.append(TF.center_crop(ids, [size, size])[0])
    return list(torch.stack(maps).split(batch_size))
