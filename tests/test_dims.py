"""1-D and 3-D models: every interpolating upsampler (linear 1-D, bilinear/bicubic 2-D with antialias, trilinear
3-D), through equalize -> calibrate -> a fine-tuning step -> fold -> ONNX, on MONAI models and hand-written
1-D/bicubic decoders."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, FlexibleUNet, SegResNet
from torch import nn
from zoo import warm_up

import se_surgery as se
from se_surgery.calibrate import RunningMoments

pytestmark = pytest.mark.slow  # zoo models, subprocesses or ONNX exports: not in the fast tier


class UNet1d(nn.Module):
    """An audio/time-series U-Net: two linear (1-D) upsamplings, each concatenated with a skip."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv1d(1, 8, 3, padding=1)
        self.enc2 = nn.Conv1d(8, 16, 3, stride=2, padding=1)
        self.enc3 = nn.Conv1d(16, 32, 3, stride=2, padding=1)
        self.dec2 = nn.Conv1d(48, 16, 3, padding=1)
        self.dec1 = nn.Conv1d(24, 8, 1)
        self.head = nn.Conv1d(8, 2, 1)

    def forward(self, x):
        e1 = torch.relu(self.enc1(x))
        e2 = torch.relu(self.enc2(e1))
        e3 = torch.relu(self.enc3(e2))
        d2 = torch.relu(self.dec2(torch.cat([F.interpolate(e3, scale_factor=2, mode="linear"), e2], 1)))
        d1 = torch.relu(self.dec1(torch.cat([F.interpolate(d2, scale_factor=2, mode="linear"), e1], 1)))
        return self.head(d1)


class Bicubic(nn.Module):
    """A decoder with bicubic upsamplings (one antialiased) and a bilinear-antialias one, fused by cat and add."""

    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.coarse = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.fuse = nn.Conv2d(24, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        size = x.shape[-2:]
        fine = torch.relu(self.fine(x))
        mid = F.interpolate(torch.relu(self.mid(x)), size=size, mode="bicubic", align_corners=False)
        coarse = F.interpolate(torch.relu(self.coarse(x)), size=size, mode="bicubic", antialias=True)
        fused = self.fuse(torch.cat([fine, mid, coarse], 1))
        return self.head(fused + F.interpolate(self.head.weight.new_ones(1) * fused[:, :, ::2, ::2], size=size,
                                               mode="bilinear", antialias=True))


# name: (builder, input shape, sites read off the source, (mode, fusion) of each)
MODELS = {
    # SegResNet decodes with x = up(x) + skip; up = 1x1 conv then UpSample("nontrainable"), trilinear in 3-D:
    # one site per entry of blocks_up.
    "segresnet3d": (lambda: SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3,
                                      blocks_down=(1, 2, 2), blocks_up=(1, 1)), (2, 1, 32, 32, 32), 2,
                    ("trilinear", "add")),
    "segresnet2d": (lambda: SegResNet(spatial_dims=2, init_filters=8, in_channels=3, out_channels=3,
                                      blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)), (2, 3, 64, 64), 3,
                    ("bilinear", "add")),
    # BasicUNet: four UpCat blocks; "nontrainable" upsampling is trilinear in 3-D, concatenated with the skip.
    "basicunet3d": (lambda: BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4),
                                      upsample="nontrainable"), (2, 1, 32, 32, 32), 4, ("trilinear", "cat")),
    # FlexibleUNet (EfficientNet-B0): five decoder blocks upsample; the last has no skip to concatenate: 4 sites.
    "flexunet2d": (lambda: FlexibleUNet(in_channels=3, out_channels=2, backbone="efficientnet-b0", pretrained=False,
                                        interp_mode="bilinear"), (2, 3, 64, 64), 4, ("bilinear", "cat")),
    "unet1d": (UNet1d, (2, 1, 256), 2, ("linear", "cat")),
    # two bicubic (one antialiased) into the concat; the antialiased bilinear into the final add
    "bicubic2d": (Bicubic, (2, 3, 32, 32), 3, None),
}


def _build(name):
    torch.manual_seed(0)
    builder, shape, _, _ = MODELS[name]
    return warm_up(builder(), lambda m, x: m(x), shape)


def _data(shape, n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_dimension_end_to_end(name, tmp_path):
    _, shape, count, kinds = MODELS[name]
    model = _build(name)
    data = _data(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = se.equalize(model, (data[0],), data, progress=False)
    eqs = se.equalizers(eq)
    assert len(eqs) == count, se.describe(eq)
    if kinds:
        assert {(e.site.mode, e.site.fusion) for e in eqs} == {kinds}
    else:
        assert sorted(e.site.mode for e in eqs) == ["bicubic", "bicubic", "bilinear"]

    # calibrated in the equalized model: mean 0, std 1 at every equalizer on the calibration data
    moments = {e.name: RunningMoments() for e in eqs}
    hooks = [e.register_forward_hook(lambda m, i, o: moments[m.name].update(o.double())) for e in eqs]
    with torch.no_grad():
        for x in data:
            eq(x)
    for h in hooks:
        h.remove()
    for site, m in moments.items():
        assert abs(m.mean.item()) < 1e-4 and abs(m.std.item() - 1) < 1e-4, site

    # a fine-tuning step reaches every parameter, and the equalizers stay frozen
    eq.train(), model.train()
    eq(data[0]).square().mean().backward()
    model(data[0]).square().mean().backward()
    assert {n for n, p in eq.named_parameters() if p.grad is not None} == \
        {n for n, p in model.named_parameters() if p.grad is not None}
    eq.eval()

    # fold: exact, at another size too
    folded = se.fold(eq)
    other = torch.randn(1, *shape[1:-1], shape[-1] + 16) if len(shape) == 3 else torch.randn(
        1, shape[1], *[s + 16 for s in shape[2:]])
    with torch.no_grad():
        for x in (data[0], other):
            ref, out = eq(x), folded(x)
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()

    # ONNX: folded, exact against the equalized model, dynamic batch and every spatial dim
    report = se.export_onnx(eq, (data[0][:1],), tmp_path / "m.onnx")
    assert len(report.folds) == count and report.max_abs_error <= 1e-5 and report.export_error <= 1e-3
    assert all(isinstance(d, str) for d in report.inputs[next(iter(report.inputs))][2:])
    assert [s[0] for s in report.checked_shapes] == [1, 3]


def test_bicubic_sites_fold_into_their_conv_and_preserve_function_is_exact():
    model = _build("bicubic2d")
    data = _data((2, 3, 32, 32))
    eq = se.equalize(model, (data[0],), data, preserve_function=True, progress=False)
    concat = [e for e in se.equalizers(eq) if e.site.fusion == "cat"]
    assert len(concat) == 2 and all(e.compensation == se.Compensation.EXACT for e in concat)
    assert "exact, in fuse" in se.describe(eq)


def test_no_site_warning_says_which_resizes_it_saw():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)

        def forward(self, x):
            y = self.down(x)
            a = F.interpolate(y, scale_factor=2, mode="nearest")
            b = F.interpolate(y, scale_factor=2, mode="nearest")
            return a + b + self.up(y)

    with pytest.warns(UserWarning, match=r"2 nearest upsampling\(s\) \(keep the variance\), 1 transposed conv\(s\) "
                                         r"\(learned, not a resize\)"):
        se.equalize(Plain(), (torch.randn(1, 3, 16, 16),), progress=False)


def test_conv3d_weight_slices_in_the_scale_report_and_per_channel_statistics():
    model = _build("basicunet3d")
    data = _data((2, 1, 32, 32, 32), n=2)
    report = se.scale_report(model, (data[0],), data, progress=False)
    upsampled = [r for r in report.rows if r.factor]
    assert len(upsampled) == 4 and all(r.grad_rms and r.grad_rms > 0 for r in upsampled)  # Conv3d slices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = se.equalize(model, (data[0],), data, per_channel=True, progress=False)
    for e in se.equalizers(eq):
        assert e.mean.shape == (e.site.shape[1],)
    with torch.no_grad():
        torch.testing.assert_close(se.fold(eq)(data[0]), eq(data[0]), rtol=1e-5, atol=1e-5)
