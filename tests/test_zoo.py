"""Every zoo model: exact site counts, calibrated statistics, and a trainable result."""

import warnings

import pytest
import torch
from zoo import BUILDERS, HF, SITES, batches, build, call, inputs

import se_surgery as se
from se_surgery.calibrate import RunningMoments

pytestmark = pytest.mark.slow  # zoo models, subprocesses or ONNX exports: not in the fast tier


def _equalized(name):
    model = build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eq = se.equalize(model, inputs(name, torch.randn(2, 3, 128, 128)), batches(name), progress=False)
    return model, eq, [str(w.message) for w in caught if "se_surgery" in str(w.message)]


def _output_moments(eq, data):
    """Mean/std of every equalizer's output over the calibration data, in float64."""
    moments = {}
    hooks = []
    for e in se.equalizers(eq):
        moments[e.site.name] = RunningMoments()
        hooks.append(e.register_forward_hook(lambda m, i, o, r=moments[e.site.name]: r.update(o)))
    with torch.no_grad():
        for batch in data:
            eq(**batch) if isinstance(batch, dict) else eq(*batch)
    for h in hooks:
        h.remove()
    return moments


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_zoo_model(name):
    model, eq, messages = _equalized(name)
    found = list(se.equalizers(eq))
    assert len(found) == SITES[name], se.describe(eq)

    if SITES[name] == 0:
        # Left unchanged, and it says so.
        assert any("returned unchanged" in m for m in messages)
        assert eq.state_dict().keys() == model.state_dict().keys()
        return

    # Calibrated in the equalized model: every equalizer's output is standardized on the calibration data.
    for site, moments in _output_moments(eq, batches(name)).items():
        assert abs(moments.mean.item()) < 1e-4, site
        assert abs(moments.std.item() - 1) < 1e-4, site

    # Same class, caller's model untouched, original keys plus only equalizer buffers.
    assert type(eq) is type(model)
    assert not list(se.equalizers(model))
    extra = set(eq.state_dict()) - set(model.state_dict())
    assert set(model.state_dict()) <= set(eq.state_dict())
    assert "scale_equalizers._extra_state" in extra  # what se.restore needs
    assert all(k.startswith("scale_equalizers.") and k.rsplit(".", 1)[1] in ("mean", "std", "calibrated")
               for k in extra - {"scale_equalizers._extra_state"})

    # The equalizers act: outputs differ from the original model's.
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert not torch.allclose(call(eq, name, x), call(model, name, x))

    # Another input size works (smp needs multiples of 32).
    with torch.no_grad():
        out = call(eq, name, torch.randn(1, 3, 160, 160))
    assert torch.isfinite(out).all()

    # One training step with autograd reaches every parameter that the original model trains.
    eq.train()
    logits = call(eq, name, x)
    logits.float().pow(2).mean().backward()
    trained = [n for n, p in eq.named_parameters() if p.grad is not None]
    assert trained and all(e.training for e in se.equalizers(eq))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in eq.parameters())

    # Its recipe is complete (tensor inputs only, shapes and dtypes recorded): it restores into a fresh build.
    fresh = BUILDERS[name]()
    se.restore(fresh, eq.state_dict())
    assert [e.name for e in se.equalizers(fresh)] == [e.name for e in se.equalizers(eq)]


def test_hf_labels_still_give_a_loss():
    name = "hf_segformer"
    eq = se.equalize(build(name), inputs(name, torch.randn(2, 3, 128, 128)), batches(name), progress=False)
    out = eq(pixel_values=torch.randn(2, 3, 128, 128), labels=torch.randint(0, 5, (2, 128, 128)))
    assert out.loss is not None and out.loss.requires_grad
    out.loss.backward()


def test_names_are_stable_and_documented_in_describe():
    name = "smp_UPerNet"
    eq = _equalized(name)[1]
    table = se.describe(eq)
    for e in se.equalizers(eq):
        assert e.site.name in table
    levels = sorted({e.site.level for e in se.equalizers(eq)})
    assert levels == [0, 1, 2, 3]  # PPM, then the chained top-down path
    assert name not in HF
