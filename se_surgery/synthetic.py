"""Generated segmentation data: what the command line calibrates on when no --data is given."""

from __future__ import annotations


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
