"""Behaviour of equalize/calibrate on zoo models beyond the zoo sweep: training semantics, errors,
preserve_function, the first call with nothing else, and calibration data as users have it."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import batches, build, call, inputs

import se_surgery as se

pytestmark = pytest.mark.slow  # zoo models: not in the fast tier


def _eq(name, **kw):
    return se.equalize(build(name), inputs(name, torch.randn(2, 3, 128, 128)), batches(name), progress=False, **kw)


def test_train_eval_state_dict_and_inplace():
    model = build("smp_PSPNet")
    eq = se.equalize(model, (torch.randn(2, 3, 128, 128),), batches("smp_PSPNet"), progress=False)
    # .train()/.eval() switch BatchNorm/Dropout: two train-mode calls on the same input differ only in BN stats use.
    x = torch.randn(2, 3, 128, 128)
    eq.eval()
    with torch.no_grad():
        a, b = eq(x), eq(x)
    assert torch.equal(a, b)
    eq.train()
    bn = next(m for m in eq.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    eq(x)
    assert not torch.equal(before, bn.running_mean)
    # state_dict round-trips into a fresh equalized copy, statistics included.
    fresh = se.equalize(build("smp_PSPNet", seed=5), (x,), progress=False)
    assert not any(e.is_calibrated for e in se.equalizers(fresh))
    fresh.load_state_dict(eq.state_dict())
    assert all(e.is_calibrated for e in se.equalizers(fresh))
    eq.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(eq(x), fresh(x))
    # Whole-model save/load (pickle) and deepcopy keep the equalizers working.
    buffer = io.BytesIO()
    torch.save(eq, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), eq(x))
        assert torch.equal(copy.deepcopy(eq)(x), eq(x))
    # inplace=True edits and returns the caller's model.
    same = se.equalize(model, (x,), batches("smp_PSPNet"), inplace=True, progress=False)
    assert same is model and len(list(se.equalizers(model))) == 4


def test_equalizing_twice_adds_nothing():
    eq = _eq("smp_DeepLabV3Plus")
    with pytest.warns(UserWarning, match="already equalized"):
        again = se.equalize(eq, (torch.randn(2, 3, 128, 128),), progress=False)
    assert again.state_dict().keys() == eq.state_dict().keys()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(again(x), eq(x))


def test_uncalibrated_equalizers_refuse_to_run_then_calibrate_fixes_it():
    eq = se.equalize(build("smp_FPN"), (torch.randn(2, 3, 128, 128),), progress=False)
    eq.train()
    with pytest.raises(RuntimeError, match="not calibrated.*se_surgery.calibrate"):
        eq(torch.randn(2, 3, 128, 128))
    assert eq.training  # calibration below restores the caller's mode
    se.calibrate(eq, iter(batches("smp_FPN")), progress=False)  # a one-shot iterator is fine
    assert eq.training and all(e.is_calibrated for e in se.equalizers(eq))
    eq(torch.randn(2, 3, 128, 128)).mean().backward()


def test_torch_compile_fullgraph_matches_eager():
    eq = _eq("smp_PSPNet")
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = eq(x)
        compiled = torch.compile(eq, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected)


def test_per_channel_and_all_branches():
    name = "smp_UPerNet"
    with pytest.warns(UserWarning, match="channels are constant"):
        eq = _eq(name, per_channel=True, branches="all")
    found = list(se.equalizers(eq))
    upsampled = [e for e in found if e.site.kind == "upsample"]
    others = [e for e in found if e.site.kind == "branch"]
    assert len(upsampled) == 9
    # The other inputs: the PPM's own map and its 6-bin branch (resized *down* at 128 px, so not a site) (2), the
    # three laterals added to upsampled maps (3), and the finest FPN output in the fusion concat (1).
    assert len(others) == 6, se.describe(eq)
    assert all(e.mean.shape == (e.site.shape[1],) for e in found)
    for e in found:
        outs = []
        hook = e.register_forward_hook(lambda m, i, o: outs.append(o.double().transpose(0, 1).flatten(1)))
        with torch.no_grad():
            for (x,) in batches(name):
                eq(x)
        hook.remove()
        per = torch.cat(outs, 1)
        std = per.std(1, unbiased=False)
        live = std > 1e-6  # constant (dead) channels come out as 0
        assert per.mean(1).abs().max() < 1e-4 and (std[live] - 1).abs().max() < 1e-4, e.site.name
        assert live.float().mean() > 0.9


@pytest.mark.parametrize("name", ["tv_deeplabv3", "tv_lraspp", "smp_PSPNet", "hf_segformer"])
def test_preserve_function_is_exact_where_the_consumer_is_unpadded(name):
    model = build(name)
    eq = _eq(name, preserve_function=True)
    assert all(e.compensation == se.Compensation.EXACT for e in se.equalizers(eq)), se.describe(eq)
    assert eq.state_dict().keys() - model.state_dict().keys() == {
        k for k in eq.state_dict() if k.startswith("scale_equalizers.")}
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref, out = call(model, name, x), call(eq, name, x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # ...while the equalizers are really there and standardize their branch.
    assert all(e.is_calibrated and e.std.item() != 1 for e in se.equalizers(eq))


def test_preserve_function_reports_sites_it_cannot_keep():
    name = "smp_UPerNet"  # top-down additions and a 3x3 zero-padded fusion conv
    with pytest.warns(UserWarning, match="could not keep the function exactly") as record:
        eq = _eq(name, preserve_function=True)
    reasons = {e.site.name: e.compensation for e in se.equalizers(eq)}
    assert se.Compensation.ZERO_PADDED in reasons.values() and se.Compensation.NO_CONSUMER in reasons.values()
    assert "zero-padded" in se.describe(eq) and "not possible: the branch meets an addition" in se.describe(eq)
    assert eq.scale_equalizers.output_change > 0
    assert "moved the output" in se.describe(eq) and "relative" in str(record[0].message)


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(3, 4, 3, padding=1)
        self.coarse = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.fuse = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        up = F.interpolate(self.coarse(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([torch.relu(self.fine(x)), up], 1))


def test_bad_calibration_data_gets_errors_that_name_the_site():
    x = torch.randn(2, 3, 32, 32)
    model = _TwoBranch()
    with pytest.raises(se.CalibrationError, match="no batches"):
        se.equalize(model, (x,), [], progress=False)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(se.CalibrationError, match=r"model\.call0_resize0.*NaN or Inf.*batch 1"):
        se.equalize(model, (x,), [x, bad], progress=False)
    with pytest.raises(se.CalibrationError, match=r"batch 0 is a dict, .*1 positional.*input_fn="):
        se.equalize(model, (x,), [{"image": x}], progress=False)
    with pytest.raises(se.CalibrationError, match=r"lacks the keyword input\(s\) \['pixel_values'\]"):
        se.equalize(build("hf_segformer"), {"pixel_values": x.repeat(1, 1, 2, 2)}, [{"image": x}], progress=False)
    dead = _TwoBranch()
    nn.init.zeros_(dead.coarse.weight), nn.init.zeros_(dead.coarse.bias)
    with pytest.raises(se.CalibrationError, match=r"model\.call0_resize0 has zero variance.*dead branch"):
        se.equalize(dead, (x,), [x], progress=False)
    assert not list(se.equalizers(model))  # the caller's model was never touched


@pytest.mark.parametrize("name", ["smp_UPerNet", "hf_segformer", "tv_deeplabv3"])
def test_equalize_with_nothing_else(name):
    model = build(name)
    with pytest.warns(UserWarning, match=r"no example_inputs given.*\(1, 3, 512, 512\)"):
        eq = se.equalize(model)
    assert len(se.equalizers(eq)) > 0 and not any(e.is_calibrated for e in se.equalizers(eq))
    images = torch.randn(4, 3, 128, 128)
    labels = torch.randint(0, 5, (4, 128, 128))
    if name.startswith("hf_"):  # transformers batches: dicts with labels
        loader = [{"pixel_values": images[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2)]
    else:  # what segmentation code has: a DataLoader of (image, label) pairs
        loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    se.calibrate(eq, loader, progress=False)
    assert all(e.is_calibrated for e in se.equalizers(eq))


def test_calibration_data_errors_say_what_to_do():
    eq = se.equalize(build("smp_FPN"), (torch.randn(2, 3, 128, 128),), progress=False)
    dataset = TensorDataset(torch.randn(4, 3, 128, 128))
    with pytest.raises(se.CalibrationError, match=r"TensorDataset.*DataLoader\(dataset, batch_size"):
        se.calibrate(eq, dataset, progress=False)
    with pytest.raises(se.CalibrationError, match="input_fn"):
        se.calibrate(eq, [{"image": torch.randn(2, 3, 128, 128)}], progress=False)
    # input_fn handles any other form.
    se.calibrate(eq, [{"image": torch.randn(2, 3, 128, 128)}], input_fn=lambda b: b["image"], progress=False)
    assert all(e.is_calibrated for e in se.equalizers(eq))
