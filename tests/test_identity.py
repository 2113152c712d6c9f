"""Site identity: an equalizer acts on exactly the tensor the graph pass found, or the forward raises
SiteMismatchError.

Each case below failed (silently or with a crash) on the counting runtime of se_surgery 0.1.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from zoo import batches, build, call

import se_surgery as se


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # each test draws the same numbers whatever runs before it


def _by_hand(eq_model, name):
    """(mean, std) of one equalizer, to recompute what the model should give."""
    e = next(e for e in se.equalizers(eq_model) if e.site.name == name)
    return e.mean, e.std


class SizeDependent(nn.Module):
    """A decoder whose first resize happens only below 32 px: a counting runtime shifts the site onto it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.b = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = 16 * self.a(x), 0.3 * self.b(x)
        if x.shape[-1] < 32:
            b = F.interpolate(b, scale_factor=2, mode="bilinear")
        up = F.interpolate(a, size=b.shape[-2:], mode="bilinear")
        return self.fuse(torch.cat([up, b], 1)), up, b


def test_a_resize_that_happens_only_at_some_sizes_does_not_move_the_equalizer():
    model = SizeDependent().eval()
    data = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    eq = se.equalize(model, (data[0],), data, progress=False)
    assert [e.site.name for e in se.equalizers(eq)] == ["model.call0_resize0"]
    mean, std = _by_hand(eq, "model.call0_resize0")
    x = torch.randn(2, 3, 16, 16)  # at 16 px the first resize runs too
    with torch.no_grad():
        out, up, b = model(x)
        expected = model.fuse(torch.cat([(up - mean) / std, b], 1))
        got = eq(x)[0]
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_dpt_depth_equalized_at_128_runs_at_144():
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    model = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=128,
        patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64],
        fusion_hidden_size=32, head_hidden_size=16)).eval()
    data = [{"pixel_values": torch.randn(2, 3, 128, 128)} for _ in range(2)]
    eq = se.equalize(model, data[0], data, progress=False)
    assert len(se.equalizers(eq)) == 3
    seen = {}
    for e in se.equalizers(eq):
        e.register_forward_hook(lambda m, i, o: seen.setdefault(m.site.name, []).append((i[0].shape, o.std())))
    # At 144 px the fusion layers resize the residual first (shapes differ): an extra interpolate on another line.
    resized = {}
    for layer in model.neck.fusion_stage.layers:
        layer.register_forward_hook(lambda m, i, o: resized.setdefault(id(m), o.shape))
    with torch.no_grad():
        eq(pixel_values=torch.randn(2, 3, 144, 144))
    assert set(seen) == {e.site.name for e in se.equalizers(eq)}
    for name, calls in seen.items():
        (shape, std), = calls  # exactly one tensor: the upsampling's output, standardized to about 1
        assert shape[1] == 32 and 0.5 < std < 2, (name, calls)


class Loop(nn.Module):
    """Sites inside a loop whose trip count depends on the input size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = x
        for _ in range(x.shape[-1] // 16):
            y = y + F.interpolate(self.conv(x[..., ::2, ::2]), size=y.shape[-2:], mode="bilinear")
        if x.shape[-1] == 32:
            y = torch.cat([y, F.interpolate(x[..., ::4, ::4], size=y.shape[-2:], mode="bilinear")], 1)
        return y


def test_calls_the_graph_did_not_have_raise_site_mismatch():
    x = torch.randn(1, 4, 32, 32)
    eq = se.equalize(Loop(), (x,), [x], progress=False)
    assert len(se.equalizers(eq)) == 3  # two loop iterations and the cat branch
    with torch.no_grad():
        eq(torch.randn(1, 4, 32, 32))
        with pytest.raises(se.SiteMismatchError, match=r"made 3 resize calls.*graph found 2"):
            eq(torch.randn(1, 4, 48, 48))  # a third loop iteration: which call is which?
    small = se.equalize(Loop(), (torch.randn(1, 4, 16, 16),), [torch.randn(1, 4, 16, 16)], progress=False)
    assert len(se.equalizers(small)) == 1
    with torch.no_grad(), pytest.raises(se.SiteMismatchError, match=r"model.call0_resize0 .*was not met"):
        small(torch.randn(1, 4, 8, 8))  # no loop iteration at 8 px: the site never runs
    assert issubclass(se.SiteMismatchError, se.SeSurgeryError)


class Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fuse = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = 5 * self.a(x)
        torch._dynamo.graph_break()  # inside the owner's forward
        up = F.interpolate(a, scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([up, self.b(x)], 1))


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_with_a_graph_break_inside_the_owner(backend):
    x = torch.randn(2, 3, 16, 16)
    eq = se.equalize(Breaks().eval(), (x,), [x], progress=False)
    with torch.no_grad():
        expected = eq(x)
        torch._dynamo.reset()
        compiled = torch.compile(eq, backend=backend)
        torch.testing.assert_close(compiled(x), expected)
        torch.testing.assert_close(compiled(x), expected)  # the second call runs the cached code


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_on_chained_sites_in_loops(backend):
    eq = se.equalize(build("smp_UPerNet"), (torch.randn(2, 3, 128, 128),), batches("smp_UPerNet"), progress=False)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = eq(x)
        torch._dynamo.reset()
        got = torch.compile(eq, fullgraph=True, backend=backend)(x)
    # aot_eager decomposes the resizes: float32 rounding differs, a misplaced equalizer would not be close.
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.coarse = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fine = nn.Conv2d(3, 4, 3, padding=1)
        self.fuse = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        coarse = self.coarse(x)
        with torch.no_grad():  # exported as a wrap_with_set_grad_enabled subgraph
            up = F.interpolate(3 * coarse, scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([up, self.fine(x)], 1))


def test_sites_inside_no_grad_regions_are_found_and_equalized():
    x = torch.randn(2, 3, 16, 16)
    eq = se.equalize(NoGrad().eval(), (x,), [x, torch.randn(2, 3, 16, 16)], progress=False)
    assert [e.site.name for e in se.equalizers(eq)] == ["model.call0_resize0"]
    for e in se.equalizers(eq):
        outs = []
        e.register_forward_hook(lambda m, i, o: outs.append(o))
        with torch.no_grad():
            eq(x)
        assert abs(outs[0].std().item() - 1) < 0.3


class Block(nn.Module):
    """A decoder block with its site mid-forward, as transformers/timm layers are checkpointed."""

    def __init__(self):
        super().__init__()
        self.coarse = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        up = F.interpolate(torch.relu(self.coarse(x)), scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([x, up], 1))


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.reentrant = reentrant

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            # active only in training, as transformers and timm do it
            x = checkpoint(block, x, use_reentrant=self.reentrant) if self.training else block(x)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    eq = se.equalize(Checkpointed(reentrant), (x,), [x], progress=False)
    assert len(se.equalizers(eq)) == 2
    plain = se.equalize(Checkpointed(reentrant), (x,), [x], progress=False)
    plain.load_state_dict(eq.state_dict())
    eq.train(), plain.train()
    plain.forward = lambda inp: [inp := b(inp) for b in [plain.stem, *plain.blocks]][-1]  # no checkpointing
    eq(x).square().mean().backward()
    plain(x).square().mean().backward()
    for (name, p), q in zip(eq.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_subtraction_is_a_fusion():
    class Sub(nn.Module):
        def forward(self, fine, coarse):
            return fine - F.interpolate(coarse, scale_factor=2, mode="bilinear")

    fine, coarse = torch.randn(1, 2, 8, 8), 4 * torch.randn(1, 2, 4, 4)
    eq = se.equalize(Sub(), (fine, coarse), [(fine, coarse)], progress=False)
    (e,) = se.equalizers(eq)
    assert e.site.fusion == "sub"
    with torch.no_grad():
        expected = fine - (F.interpolate(coarse, scale_factor=2, mode="bilinear") - e.mean) / e.std
        torch.testing.assert_close(eq(fine, coarse), expected)


@pytest.mark.slow
def test_max_batches_reads_only_what_it_uses_from_an_endless_generator():
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield torch.randn(2, 3, 128, 128), torch.zeros(2, 128, 128, dtype=torch.long)  # (image, label)

    # smp UPerNet: 4 levels of chained sites, each one pass over the same 3 batches.
    eq = se.equalize(build("smp_UPerNet"), (torch.randn(2, 3, 128, 128),), endless(), max_batches=3,
                     progress=False)
    assert len(pulled) == 3 and all(e.is_calibrated for e in se.equalizers(eq))


class Padded(nn.Module):
    def __init__(self, padding):
        super().__init__()
        self.fine = nn.Conv2d(3, 4, 3, padding=1)
        self.coarse = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(8, 2, 3 if padding == "same" else 1, padding=padding)

    def forward(self, x):
        up = F.interpolate(2 + 3 * self.coarse(x), scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([torch.relu(self.fine(x)), up], 1))


def test_a_folded_model_refuses_recalibration():
    x = torch.randn(2, 3, 16, 16)
    folded = se.fold(se.equalize(Padded("same"), (x,), [x], progress=False))
    (kept,) = se.equalizers(folded)
    assert kept.folded and kept.before_resize
    with torch.no_grad():
        before = folded(x)
    with pytest.raises(se.UsageError, match="folded into the model's weights"):
        se.calibrate(folded, [torch.randn(2, 3, 16, 16) * 5])
    with torch.no_grad():
        assert torch.equal(folded(x), before)


@pytest.mark.parametrize("padding, exact", [("same", False), ("valid", True)])
def test_padding_same_and_valid_consumers(padding, exact):
    x = torch.randn(2, 3, 16, 16)
    model = Padded(padding).eval()
    (site,) = se.find_sites(torch.export.export(model, (x,), strict=False))
    assert site.consumer is not None and site.consumer.weight == "fuse.weight"
    assert site.consumer.zero_padded is not exact and site.consumer.channels == (4, 8)
    eq = se.equalize(model, (x,), [x], progress=False)
    folded = se.fold(eq)
    assert len(se.equalizers(folded)) == (0 if exact else 1)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), eq(x), rtol=1e-5, atol=1e-5)


def test_per_channel_equalizers_take_the_models_dtype():
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    model = Padded("valid").to(torch.bfloat16)
    eq = se.equalize(model, (x,), [x], per_channel=True, progress=False)
    assert all(e.mean.dtype == torch.bfloat16 for e in se.equalizers(eq))
    with torch.no_grad():
        assert eq(x).dtype == torch.bfloat16


def test_a_near_dead_branch_is_refused_by_name():
    model = Padded("valid").eval()
    with torch.no_grad():
        model.coarse.weight.mul_(1e-6)  # the branch is 2 + a variation near float32 rounding
        model.coarse.bias.zero_()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(se.CalibrationError, match=r"model\.call0_resize0 has no real variance.*dead branch"):
        se.equalize(model, (x,), [x], progress=False)


@pytest.mark.slow
def test_a_branch_of_rounding_noise_gets_a_warning_that_names_it():
    import torchvision.models.segmentation as tvs

    torch.manual_seed(0)  # random weights, no BatchNorm statistics: the LR-ASPP branch is ~1e-9 everywhere
    model = tvs.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    with pytest.warns(UserWarning, match=r"site classifier\.call0_resize0: its input has std .*e-1\d"):
        se.equalize(model, (torch.randn(2, 3, 128, 128),), [torch.randn(2, 3, 128, 128)], progress=False,
                    norm="running")  # (the default measures with batch statistics here: std 0.2, no warning)


def test_a_residual_of_the_upsampled_map_itself_is_not_a_fusion():
    class Padder(nn.Module):
        """MobileViT at 160 px: a 5x5 map resized to 6x6 for patches, then transformer residuals h + f(h)."""

        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            h = F.interpolate(x, size=(6, 6), mode="bilinear").flatten(2).transpose(1, 2)
            h = h + self.mlp(torch.relu(h))
            h = h + self.mlp(torch.relu(h))
            return self.norm(h)

    assert se.find_sites(torch.export.export(Padder(), (torch.randn(1, 4, 5, 5),), strict=False)) == []


@pytest.mark.slow
def test_mobilevit_at_160_px():
    from transformers import MobileViTConfig, MobileViTForSemanticSegmentation

    torch.manual_seed(0)
    model = MobileViTForSemanticSegmentation(MobileViTConfig(
        num_labels=5, image_size=160, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 96],
        num_attention_heads=2))
    model.train()
    with torch.no_grad():  # BatchNorm statistics of a few batches, as for the zoo models
        model(pixel_values=torch.randn(4, 3, 160, 160))
    model.eval()
    sites = se.find_sites(torch.export.export(model, (), {"pixel_values": torch.randn(2, 3, 160, 160)},
                                              strict=False))
    # Only the DeepLabV3 head's ASPP pooling branch; none of the padding resizes before the transformers.
    assert [s.name for s in sites] == ["segmentation_head.aspp.convs.4.call0_resize0"]


@pytest.mark.slow
def test_import_needs_torch_alone_and_every_error_is_a_se_surgery_error(tmp_path):
    script = tmp_path / "no_onnx.py"
    script.write_text(
        "import sys\n"
        "for name in ('onnx', 'onnx_ir', 'onnxruntime', 'onnxscript', 'matplotlib'):\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "import torch, se_surgery as se\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, a, b):\n"
        "        return a + torch.nn.functional.interpolate(b, scale_factor=2, mode='bilinear')\n"
        "a, b = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)\n"
        "eq = se.equalize(M(), (a, b), [(a, b)], progress=False)\n"
        "print(len(se.equalizers(eq)))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    for name in ("CalibrationError", "CaptureError", "OnnxError", "SiteMismatchError", "UsageError",
                 "NotCalibratedError"):
        assert issubclass(getattr(se, name), se.SeSurgeryError)


@pytest.mark.slow
def test_equalizers_is_a_list_and_the_model_holds_one_declared_state_object():
    eq = se.equalize(build("smp_DeepLabV3Plus"), (torch.randn(2, 3, 128, 128),), batches("smp_DeepLabV3Plus"),
                     progress=False)
    assert isinstance(se.equalizers(eq), list) and len(se.equalizers(eq)) == 2
    added = {k for k in vars(eq) if k not in vars(build("smp_DeepLabV3Plus"))}
    assert added <= {"_modules"} or added == set()
    assert not [m for m in eq.modules() for k in vars(m) if k.startswith("_se_")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = se.fold(eq)
    with torch.no_grad():
        x = torch.randn(1, 3, 128, 128)
        torch.testing.assert_close(call(folded, "smp_DeepLabV3Plus", x), call(eq, "smp_DeepLabV3Plus", x))


def test_a_call_that_does_not_look_like_the_site_raises():
    class Switch(nn.Module):
        mode = "bilinear"

        def forward(self, fine, coarse):
            return fine + F.interpolate(coarse, scale_factor=2, mode=self.mode)

    fine, coarse = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)
    eq = se.equalize(Switch(), (fine, coarse), [(fine, coarse)], progress=False)
    eq.mode = "bicubic"  # the same line now makes another kind of call
    with torch.no_grad(), pytest.raises(se.SiteMismatchError, match=r"expected a bilinear resize.*met a bicubic"):
        eq(fine, coarse)
    eq.mode = "bilinear"
    with torch.no_grad(), pytest.raises(se.SiteMismatchError, match=r"with 2 channels, met .* with 3 channels"):
        eq(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4))
