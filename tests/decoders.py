"""Small decoders defined in a source file (the runtime places calls by their source lines), for the composition,
fold and file tests. Each docstring gives its sites."""

import torch
import torch.nn.functional as F
from torch import nn


class Head(nn.Module):
    """Two coarse levels upsampled and concatenated with the fine one into a 1x1 conv: 2 sites, in ``head``."""

    def __init__(self, c=4):
        super().__init__()
        self.lat = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(3))
        self.fuse = nn.Conv2d(3 * c, 2, 1)

    def forward(self, feats):
        fine = self.lat[0](feats[0])
        ups = [F.interpolate(self.lat[i](f), size=fine.shape[-2:], mode="bilinear") for i, f in
               enumerate(feats[1:], 1)]
        return self.fuse(torch.cat([fine, *ups], 1))


class Small(nn.Module):
    """A stem making three levels and a :class:`Head`: 2 sites, owned by ``head``."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.ModuleList(nn.Conv2d(3, c, 3, stride=s, padding=1) for s in (2, 4, 8))
        self.head = Head(c)

    def forward(self, x):
        return self.head([torch.relu(conv(x)) * (i + 1) for i, conv in enumerate(self.stem)])


class RootOwner(nn.Module):
    """The model's own forward makes the site call: 1 site, owned by the root."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fuse = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        up = F.interpolate(self.a(x), size=x.shape[-2:], mode="bilinear")
        return self.fuse(torch.cat([up, self.b(x)], 1))


class Block(nn.Module):
    """A recursive U-Net level, ``depth`` Blocks deep; each resizes its inner result and concatenates it with its
    input: ``depth`` sites, one per Block."""

    def __init__(self, depth, c=4):
        super().__init__()
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.inner = Block(depth - 1, c) if depth > 1 else None
        self.fuse = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        h = torch.relu(self.down(x))
        if self.inner is not None:
            h = self.inner(h)
        up = F.interpolate(h, size=x.shape[-2:], mode="bilinear")
        return self.fuse(torch.cat([x, up], 1))


class Nested(nn.Module):
    """Three Blocks inside each other: 3 sites (every Block concatenates its resized inner result)."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = Block(3, c)

    def forward(self, x):
        return self.body(self.stem(x))


class SharedProj(nn.Module):
    """``f0 + proj(u1) + proj(u2)``: one conv module serves two upsampled branches (2 sites, shared consumer)."""

    def __init__(self, c=4):
        super().__init__()
        self.f0 = nn.Conv2d(3, c, 3, padding=1)
        self.f1 = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.f2 = nn.Conv2d(3, c, 3, stride=4, padding=1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        size = x.shape[-2:]
        u1 = F.interpolate(self.f1(x), size=size, mode="bilinear")
        u2 = F.interpolate(self.f2(x), size=size, mode="bilinear")
        return self.f0(x) + self.proj(u1) + self.proj(u2)


class Helper(nn.Module):
    """The site's resize sits in a helper method that ``forward`` may checkpoint: 1 site."""

    def __init__(self, c=4, checkpointed=None):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, c, 3, padding=1)
        self.fuse = nn.Conv2d(2 * c, 2, 1)
        self.checkpointed = checkpointed  # None, or use_reentrant

    def body(self, x):
        up = F.interpolate(self.a(x), size=x.shape[-2:], mode="bilinear")
        return self.fuse(torch.cat([up, self.b(x)], 1))

    def forward(self, x):
        if self.training and self.checkpointed is not None:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.body, x, use_reentrant=self.checkpointed)
        return self.body(x)


FUSIONS = {
    "cat": lambda a, b: torch.cat([a, b], 1), "concat": lambda a, b: torch.concat([a, b], 1),
    "concatenate": lambda a, b: torch.concatenate([a, b], 1), "cat_kw": lambda a, b: torch.cat(tensors=[a, b], dim=1),
    "stack": lambda a, b: torch.stack([a, b]).sum(0), "add": torch.add, "sub": torch.sub, "subtract": torch.subtract,
    "plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "method_add": lambda a, b: a.add(b),
    "method_sub": lambda a, b: a.sub(b), "method_subtract": lambda a, b: a.subtract(b),
    "iadd": lambda a, b: a.__iadd__(b), "isub": lambda a, b: a.__isub__(b), "add_": lambda a, b: a.add_(b),
    "sub_": lambda a, b: a.sub_(b), "subtract_": lambda a, b: a.subtract_(b),
}


class Spelled(nn.Module):
    """One upsampled branch fused with a fine one by the fusion spelled ``FUSIONS[spelling]``: 1 site."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        up = F.interpolate(self.a(x), size=x.shape[-2:], mode="bilinear")
        return FUSIONS[self.spelling](self.b(x), up) * 1.5


class TwoPaths(nn.Module):
    """Like MONAI's SegResNetVAE: in training the same upsampler runs a second time, on a path with no fusion."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, c, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        y = self.out(self.up(self.a(x)) + self.b(x))
        if self.training:
            return y, self.up(self.a(x) * 0.5)  # a reconstruction path: not fused
        return y


class Trilinear(nn.Module):
    """3-D: two coarse levels upsampled trilinearly in a helper method and fused by a stack-sum: 2 sites."""

    def __init__(self, c=4):
        super().__init__()
        self.levels = nn.ModuleList(nn.Conv3d(1, c, 3, stride=s, padding=1) for s in (1, 2, 4))
        self.out = nn.Conv3d(c, 2, 1)

    def up(self, x, size):
        return F.interpolate(x, size=size, mode="trilinear")

    def forward(self, x):
        f0, f1, f2 = (conv(x) for conv in self.levels)
        return self.out(torch.stack([f0, self.up(f1, f0.shape[2:]), self.up(f2, f0.shape[2:])]).sum(0))


class FixedSize(nn.Module):
    """A decoder that runs at 32 px only (as some transformers models check their input size): 1 site."""

    def __init__(self):
        super().__init__()
        self.inner = RootOwner()

    def forward(self, x):
        if x.shape[-1] != 32:
            raise ValueError(f"input width {x.shape[-1]} is not the configured 32")
        return self.inner(x)


class Gate(nn.Module):
    """An attention gate: a sigmoid map upsampled and multiplied into the features. Not a fusion of levels: 0 sites."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1), \
            nn.Conv2d(4, 2, 1)

    def forward(self, x):
        f = self.a(x)
        att = F.interpolate(torch.sigmoid(self.b(f)), size=f.shape[-2:], mode="bilinear")
        return self.c(f + f * att)


class Recursive(nn.Module):
    """A model whose forward calls itself on a pooled input, ``depth`` times: ``depth`` sites, owned by the root."""

    def __init__(self, depth=2):
        super().__init__()
        self.depth = depth
        self.a, self.fuse = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(6, 3, 1)

    def forward(self, x, depth: int | None = None):
        depth = self.depth if depth is None else depth
        if depth == 0:
            return self.a(x)
        inner = F.interpolate(self(F.avg_pool2d(x, 2), depth - 1), size=x.shape[-2:], mode="bilinear")
        return self.fuse(torch.cat([self.a(x), inner], 1))


class Attention(nn.Module):
    """smp MAnet's decoder block with bilinear upsampling: the upsampled *feature* multiplied by a gate made of two
    squeeze-excitations (each ending in a sigmoid), then concatenated with the skip: 1 site per block (2)."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.ModuleList(nn.Conv2d(3, c, 3, stride=s, padding=1) for s in (2, 4, 8))
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(2))
        self.se_hl = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.Sigmoid())
                                   for _ in range(2))
        self.se_ll = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.Sigmoid())
                                   for _ in range(2))
        self.fuse = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for _ in range(2))

    def forward(self, x):
        f4, f8, f16 = (torch.relu(conv(x)) for conv in self.stem)
        y = f16
        for i, skip in enumerate((f8, f4)):
            y = F.interpolate(self.convs[i](y), scale_factor=2, mode="bilinear")
            att = self.se_hl[i](y) + self.se_ll[i](skip)
            y = y * att
            y = self.fuse[i](torch.cat([y, skip], 1))
        return y


def _cbr3(i, o):
    return nn.Sequential(nn.Conv3d(i, o, 3, 2, 1, bias=False), nn.BatchNorm3d(o), nn.ReLU())


class Deep3D(nn.Module):
    """Four 3-D levels upsampled to the first and summed, through BatchNorm/Dropout/Identity: 4 sites, of which the
    two deepest start at 1 x 1 x 1 at 16^3 (torch.onnx records that size as fixed)."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr3(1, 8)
        self.down = nn.ModuleList([_cbr3(8, 8) for _ in range(4)])
        self.pre = nn.ModuleList([nn.BatchNorm3d(8), nn.Dropout(0.1), nn.Identity(), nn.BatchNorm3d(8)])
        self.aligns = [False, False, True, False]
        self.consumer = nn.Conv3d(8, 3, 1)

    def _up(self, x, ref, k):
        return F.interpolate(x, size=ref.shape[2:], mode="trilinear", align_corners=self.aligns[k])

    def forward(self, x):
        f = f0 = self.stem(x)
        feats = [f0]
        for k in range(4):
            f = self.down[k](f)
            feats.append(self.pre[k](self._up(f, f0, k)))
        y = self.consumer(torch.stack(feats).sum(0))
        return F.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)
