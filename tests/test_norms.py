"""Scales as training sees them: calibration with the norm layers' batch statistics (``norm="batch"``) or running
statistics (``norm="running"``), the default that follows the model's mode, the running statistics left untouched,
the checks that keep a model from going NaN later, and the message where equalizing drives a fusion's branches
further apart (the paper's premise does not hold)."""

import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import BUILDERS

import se_surgery as se
from se_surgery.state import registry


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _norm_state(model):
    """Every norm layer's running statistics and batch count, cloned."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _assert_same(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _outputs_std(eq, batches, train):
    """The std of each equalizer's output over ``batches``, with the model in training or eval mode."""
    seen = {e.name: [] for e in se.equalizers(eq)}
    hooks = [e.register_forward_hook(lambda m, i, o: seen[m.name].append(o.detach())) for e in se.equalizers(eq)]
    eq.train(train)
    try:
        with torch.no_grad():
            for x in batches:
                eq(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat([o.flatten() for o in outs]).std(correction=0).item() for name, outs in seen.items()}


class Norms(nn.Module):
    """Every norm layer that keeps running statistics, in front of one site: 1 site."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.sync = nn.SyncBatchNorm(4)
        self.inorm = nn.InstanceNorm2d(4, track_running_stats=True, affine=True)
        self.bn1 = nn.BatchNorm1d(4)
        self.bn3 = nn.BatchNorm3d(4)
        self.drop = nn.Dropout(0.5)
        self.fuse = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        a = self.inorm(self.sync(self.bn(self.a(x))))
        n, c, h, w = a.shape
        a = self.bn1(a.reshape(n, c, h * w)).reshape(n, c, h, w)
        a = self.drop(self.bn3(a.unsqueeze(2)).squeeze(2))
        return self.fuse(torch.cat([F.interpolate(a, scale_factor=2, mode="bilinear"), x], 1))


def _warmed(model, batches):
    """Train-mode forwards: the running statistics describe the data (as a trained model's do)."""
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model


def test_batch_statistics_leave_every_running_statistic_bit_for_bit_and_follow_the_models_mode():
    data = [torch.randn(4, 3, 16, 16) * 2 + 1 for _ in range(4)]
    model = _warmed(Norms(), data[:2])
    before = _norm_state(model)
    eq = se.equalize(model, (data[0],), data, progress=False, inplace=True)  # in training mode: batch statistics
    assert registry(eq).norm == "batch"
    _assert_same(before, _norm_state(eq))
    se.calibrate(eq, data, norm="batch")
    _assert_same(before, _norm_state(eq))
    # Dropout is off while measuring: two calibrations give the same statistics.
    (e,) = se.equalizers(eq)
    first = e.std.clone()
    se.calibrate(eq, data)
    assert torch.equal(first, e.std)
    # In training mode (dropout off for the check), the equalizer's output has unit scale on held-out batches.
    eq.drop.p = 0.0
    assert _outputs_std(eq, [torch.randn(4, 3, 16, 16) * 2 + 1 for _ in range(4)], train=True)[e.name] == \
        pytest.approx(1, abs=0.05)
    # A model in eval mode is measured with its running statistics.
    eval_eq = se.equalize(_warmed(Norms(), data[:2]).eval(), (data[0],), data, progress=False)
    assert registry(eval_eq).norm == "running"


def test_untrained_running_statistics_switch_to_batch_statistics_or_fail_and_name_the_layers():
    data = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    model = Norms().eval()
    with pytest.warns(UserWarning, match=r"bn, sync, inorm.*hold their initial running statistics") as caught:
        eq = se.equalize(model, (data[0],), data, progress=False)
    assert registry(eq).norm == "batch"
    assert any(w.filename == __file__ for w in caught)  # pointed at the caller's line
    with pytest.warns(UserWarning, match=r"norm='running'.*bn, sync, inorm.*initial values.*norm='batch'"):
        assert registry(se.equalize(model, (data[0],), data, progress=False, norm="running")).norm == "running"
    with pytest.raises(se.UsageError, match="norm='train'"):
        se.equalize(model, (data[0],), data, progress=False, norm="train")


def test_batches_of_one_under_batch_statistics_say_what_to_do():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            pooled = self.bn(self.a(F.adaptive_avg_pool2d(x, 1)))  # one value per channel at batch 1
            return torch.cat([F.interpolate(pooled, size=x.shape[-2:], mode="bilinear"), x], 1)

    data = [torch.randn(1, 3, 8, 8) for _ in range(2)]
    with pytest.raises(se.CalibrationError, match="batches of at least 2 samples.*norm='running'"):
        se.equalize(Pooled(), (data[0],), data, progress=False, norm="batch")


def test_the_norm_mode_and_the_scale_are_kept_by_recalibration_save_and_restore(tmp_path):
    data = [torch.randn(4, 3, 16, 16) * 2 + 1 for _ in range(3)]
    model = _warmed(Norms(), data).eval()
    eq = se.equalize(model, (data[0],), data, progress=False, scale="restore", norm="batch")
    (e,) = se.equalizers(eq)
    stats = e.mean.clone(), e.std.clone()
    assert "restore scale with batch statistics" in se.describe(eq)
    se.calibrate(eq, data)  # recalibration keeps both
    assert registry(eq).norm == "batch" and registry(eq).scale == "restore"
    torch.testing.assert_close((e.mean, e.std), stats)
    torch.save(eq.state_dict(), tmp_path / "eq.pt")
    back = se.restore(Norms(), tmp_path / "eq.pt")
    assert registry(back).norm == "batch" and registry(back).scale == "restore"
    se.calibrate(back, data)
    torch.testing.assert_close((se.equalizers(back)[0].mean, se.equalizers(back)[0].std), stats)
    se.calibrate(eq, data, norm="running", scale="unit")  # unless the caller says otherwise
    assert registry(eq).norm == "running" and registry(eq).scale == "unit"


def test_an_equalizer_far_from_its_target_in_the_other_mode_gets_a_warning_naming_it():
    model = _warmed(Norms(), [torch.randn(4, 3, 16, 16) * 5 for _ in range(3)])  # running stats of other data
    data = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    with pytest.warns(UserWarning, match=r"running statistics \(as eval mode sees them\), 1 of 1 equalizer.*"
                                         r"model\.call0_resize0 .*norm='running'"):
        se.equalize(model, (data[0],), data, progress=False)  # in training mode: batch statistics


class Larger(nn.Module):
    """A smooth upsampled branch that arrives larger than the skip it joins (as on pretrained U-Net encoders)."""

    def __init__(self):
        super().__init__()
        self.coarse = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(3, 4, 3, padding=1)
        self.fuse = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        smooth = F.avg_pool2d(self.coarse(x), 5, 1, 2)
        up = F.interpolate(smooth, scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([up, 0.05 * self.skip(x)], 1))


def test_upsampled_branches_that_arrive_larger_get_the_message_and_all_branches_balance_them():
    data = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    with pytest.warns(UserWarning, match=r"further apart than before.*model\.call0_fusion0: spread .*upsampled "
                                         r"branches arrive at std .*where='measured' leaves such fusions alone, "
                                         r"se_surgery.Where\(exclude=\['model.call0_fusion0'\]\).*branches='all'.*"
                                         r"or leave the model unequalized"):
        eq = se.equalize(Larger(), (data[0],), data, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not se.equalizers(se.equalize(Larger(), (data[0],), data, progress=False, where="measured"))
    ((before, after),) = registry(eq).spreads.values()
    assert after > before > 1.5
    assert "FURTHER APART after equalizing: model.call0_fusion0" in se.describe(eq)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balanced = se.equalize(Larger(), (data[0],), data, progress=False, branches="all")
    ((before, after),) = registry(balanced).spreads.values()
    assert after == pytest.approx(1, abs=0.05) and before > 1.5  # (measured on half the calibration batches)
    x = torch.randn(1, 3, 40, 40)
    folded = se.fold(balanced)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), balanced(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smp_PSPNet", "smp_UPerNet"])
@pytest.mark.parametrize("backbone", ["scratch", "trained backbone, new decoder"])
def test_zoo_models_leave_unit_scale_in_training_mode_on_held_out_batches(name, backbone):
    model = BUILDERS[name]()  # random weights, in training mode, as built
    batch = lambda: torch.randn(4, 3, 64, 64) * 0.5 + 0.2  # noqa: E731
    if backbone != "scratch":  # the encoder's running statistics describe the data, the decoder's are new
        _warmed(model.encoder, [batch() for _ in range(4)])
    before = _norm_state(model)
    data = [batch() for _ in range(6)]
    eq = se.equalize(model, (data[0],), data, progress=False)
    assert registry(eq).norm == "batch"
    _assert_same(before, _norm_state(model))
    stds = _outputs_std(eq, [batch() for _ in range(6)], train=True)
    assert all(0.95 <= s <= 1.05 for s in stds.values()), stds


@pytest.mark.slow
def test_lraspp_with_random_weights_trains_without_nan_right_after_equalizing():
    import torchvision.models.segmentation as tvs

    model = tvs.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)
    loader = [(torch.randn(2, 3, 128, 128), torch.randint(0, 5, (2, 128, 128))) for _ in range(4)]
    x = loader[0][0]
    eq = se.equalize(model, example_inputs=(x,), calibration_data=loader, progress=False)  # the README's Use
    (e,) = se.equalizers(eq)
    assert e.std.item() > 1e-3  # batch statistics, not the 1e-9 of the untrained running statistics
    optimizer = torch.optim.SGD(eq.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for images, labels in loader * 2:
        loss = F.cross_entropy(eq(images)["out"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] < 10


class FrozenBN(nn.Module):
    """The toy of issue 37: a BatchNorm on the coarse branch, warmed on other data (running statistics far from
    the batch's), then frozen by the user inside a model that trains."""

    def __init__(self, norm=nn.BatchNorm2d):
        super().__init__()
        self.pa, self.pb, self.bn, self.fuse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1), norm(4), \
            nn.Conv2d(8, 5, 1)

    def forward(self, x):
        u = F.interpolate(torch.relu(self.bn(self.pb(x))), scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([self.pa(x), u], 1))


class NormEval(FrozenBN):
    """mmsegmentation's ``norm_eval``: ``train()`` puts the norm layers back in eval mode."""

    def train(self, mode=True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def _equalizer_std_in_training(model, data, freeze):
    """The equalizer's output std as the user's training forward (with its frozen layers) sees it."""
    outs = []
    hook = se.equalizers(model)[0].register_forward_hook(lambda _m, _i, out: outs.append(out.std().item()))
    model.train()
    freeze(model)
    with torch.no_grad():
        for x in data:
            model(x)
    hook.remove()
    return statistics.mean(outs)


@pytest.mark.parametrize("make, freeze", [
    (FrozenBN, lambda m: m.bn.eval()),   # a BN put in eval mode inside a training model
    (NormEval, lambda m: None),          # mmseg-style norm_eval
])
def test_norm_auto_follows_each_norm_layer_s_own_mode(make, freeze):
    data = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    model = make().train()
    with torch.no_grad():
        for x in data:
            model(x * 2 + 0.5)  # running statistics of other data
    freeze(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = se.equalize(model, (data[0],), data, progress=False)
    assert registry(eq).norm == "batch" and registry(eq).frozen_norms == {"bn"}
    assert _equalizer_std_in_training(eq, data, freeze) == pytest.approx(1, abs=0.05)
    assert "1 frozen norm layer(s) on their running statistics, as training runs them (bn)" in se.describe(eq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        se.calibrate(eq, data, progress=False)  # keeps the choice
        back = se.restore(make(), eq.state_dict())
    assert registry(eq).frozen_norms == registry(back).frozen_norms == {"bn"}
    forced = se.equalize(model, (data[0],), data, progress=False, norm="batch")  # explicit: every layer on batches
    assert registry(forced).frozen_norms == frozenset()
    assert _equalizer_std_in_training(forced, data, freeze) < 0.9


def test_torchvision_frozen_batchnorm_keeps_its_statistics():
    from torchvision.ops import FrozenBatchNorm2d

    data = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    model = FrozenBN(FrozenBatchNorm2d).train()
    model.bn.running_mean.fill_(0.3)
    model.bn.running_var.fill_(4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = se.equalize(model, (data[0],), data, progress=False)
    assert _equalizer_std_in_training(eq, data, lambda m: None) == pytest.approx(1, abs=0.05)


def test_weights_loaded_after_equalizing_mark_the_statistics_stale_until_calibrated():
    data = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = se.equalize(FrozenBN().train(), (data[0],), data, progress=False)
    downstream = {k: v for k, v in FrozenBN().state_dict().items() if k.startswith("fuse.")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # weights after the site: the statistics still hold, nothing said
        eq.load_state_dict(downstream, strict=False)
        eq.load_state_dict({k: v for k, v in eq.state_dict().items() if "scale_equalizers" not in k}, strict=False)
    eq(data[0])
    pretrained = FrozenBN().state_dict()
    with pytest.warns(UserWarning, match=r"load_state_dict changed 2 weight\(s\) upstream of 1 of the 1 "
                                         r"equalizer\(s\) of FrozenBN \(pb.bias, pb.weight\).*se_surgery.calibrate"):
        missing = eq.load_state_dict(pretrained, strict=False).missing_keys
    assert all(k.startswith("scale_equalizers.") for k in missing)
    with pytest.raises(se.NotCalibratedError, match="changed 2 weight.*upstream of it.*se_surgery.calibrate"):
        eq(data[0])
    assert "uncalibrated" in se.describe(eq)
    se.calibrate(eq, data, progress=False)
    assert _equalizer_std_in_training(eq, data, lambda m: None) == pytest.approx(1, abs=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = se.equalize(FrozenBN().train(), (data[0],), data, progress=False).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole state_dict brings its own statistics
        eq.load_state_dict(other)


@pytest.mark.slow
def test_pretrained_weights_loaded_into_an_equalized_smp_pspnet_are_detected():
    data = [torch.randn(2, 3, 128, 128) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = se.equalize(BUILDERS["smp_PSPNet"]().train(), (data[0],), data, progress=False)
    other = BUILDERS["smp_PSPNet"]().state_dict()
    with pytest.warns(UserWarning, match="upstream of 4 of the 4 equalizer"):
        eq.load_state_dict(other, strict=False)
    with pytest.raises(se.NotCalibratedError, match="load_state_dict changed"):
        eq(data[0])


class Cumulative(FrozenBN):
    """BatchNorm with ``momentum=None`` (a cumulative average): its training path is data-dependent for export."""

    def __init__(self):
        super().__init__(lambda c: nn.BatchNorm2d(c, momentum=None))


def test_a_cumulative_batchnorm_equalizes_quietly(capfd):
    data = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = se.equalize(Cumulative().train(), (data[0],), data, progress=False)
    assert len(se.equalizers(eq)) == 1
    printed = capfd.readouterr()
    assert "def forward" not in printed.err + printed.out and "symbolic_shapes" not in printed.err
