"""se_surgery.fold: exact on every zoo model and returns the model; fold and preserve_function are exact, or
leave the equalizer in place and say why, whatever wraps or shares the consumer conv."""

import pytest
import torch
from decoders import SharedProj, Small
from torch import nn
from torch.nn.utils import parametrizations
from zoo import BUILDERS, SITES, build, call, equalized

import se_surgery as se
from se_surgery.state import FoldAction, FoldReason

EQUALIZED = sorted(n for n in BUILDERS if SITES[n])


def _data(n=3, size=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, size, size, generator=g) for _ in range(n)]


def _eq(model, **kw):
    data = _data()
    return se.equalize(model.eval(), (data[0],), data, progress=False, **kw)


def _close(a, b, tol=1e-5):
    assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()


def test_a_consumer_shared_by_two_branches_is_not_folded_into():
    eq = _eq(SharedProj())
    assert all(e.site.consumer is not None and e.site.consumer.shared for e in se.equalizers(eq))
    with pytest.warns(UserWarning, match=r"fold left 2 of 2 equalizer\(s\) of SharedProj in the runtime "
                                         r"\(model.call0_resize0: moved \(shared consumer\);"):
        folded = se.fold(eq)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        _close(folded(x), eq(x))
    text = se.describe(folded)
    assert "proj also serves other branches" in text and "folded into" not in text
    assert {s.reason for s in folded.scale_equalizers.folds} == {se.FoldReason.SHARED_CONSUMER}


def test_preserve_function_with_a_shared_consumer_never_says_exact():
    with pytest.warns(UserWarning, match="could not keep the function exactly at 2 site"):
        eq = _eq(SharedProj(), preserve_function=True)
    assert {e.compensation for e in se.equalizers(eq)} == {se.Compensation.SHARED_CONSUMER}
    assert "exact" not in se.describe(eq).replace("exactly", "")


def test_lora_on_the_consumer_then_merged():
    from peft import LoraConfig, get_peft_model

    eq = _eq(Small())
    lora = get_peft_model(eq, LoraConfig(r=2, target_modules=["head.fuse"], init_lora_weights=False))
    inner = lora.base_model.model
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        ref = lora(x)
    folded = se.fold(inner)  # unmerged LoRA: the consumer is a wrapper, not a plain conv
    assert {s.reason for s in folded.scale_equalizers.folds} == {se.FoldReason.NOT_PLAIN_CONSUMER}
    with torch.no_grad():
        _close(folded(x), ref)
    merged = lora.merge_and_unload()
    folded = se.fold(merged)
    assert not se.equalizers(folded)
    with torch.no_grad():
        _close(folded(x), ref)


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_parametrized_consumers(wrap):
    eq = _eq(Small())
    getattr(parametrizations, wrap)(eq.head.fuse)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        eq.eval()
        ref = eq(x)
        folded = se.fold(eq)
        _close(folded(x), ref)
    assert {s.reason for s in folded.scale_equalizers.folds} == {se.FoldReason.NOT_PLAIN_CONSUMER}


def test_old_weight_norm_says_to_pass_inplace():
    model = Small().eval()
    torch.nn.utils.weight_norm(model.head.fuse)
    data = _data()
    with pytest.raises(se.UsageError, match="inplace=True"):
        se.equalize(model, (data[0],), data, progress=False)
    eq = se.equalize(model, (data[0],), data, progress=False, inplace=True)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        ref = eq(x)
        folded = se.fold(eq, inplace=True)
        _close(folded(x), ref)


def test_a_grouped_consumer():
    model = Small().eval()
    model.head.fuse = nn.Conv2d(12, 4, 1, groups=2)
    eq = _eq(model)
    x = torch.randn(1, 3, 40, 40)
    folded = se.fold(eq)
    with torch.no_grad():
        _close(folded(x), eq(x))
    # nothing is absorbed into a grouped conv, and the record says why (not "meets an addition")
    assert [(s.action, s.reason) for s in folded.scale_equalizers.folds] == \
        [(FoldAction.MOVED, FoldReason.NOT_PLAIN_CONSUMER)] * 2
    assert torch.equal(folded.head.fuse.weight, eq.head.fuse.weight)
    assert "head.fuse is not a plain conv of its weight (grouped" in se.describe(folded)

# ---------------------------------------------------------------------------------------------------------------
# Zoo models


@pytest.mark.slow
@pytest.mark.parametrize("name", EQUALIZED)
def test_fold_in_pytorch_is_exact(name):
    eq = equalized(name)
    folded = se.fold(eq)
    steps = folded.scale_equalizers.folds
    assert len(steps) == SITES[name] and se.equalizers(eq)  # the equalized model itself is kept
    for size in (128, 160):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref, out = call(eq, name, x), call(folded, name, x)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    left = {e.site.name for e in se.equalizers(folded)}
    assert left == {s.site for s in steps if s.action != "folded"}
    # What could not fold into a conv now acts on the low-resolution side of its resize, as in ONNX.
    assert all(e.before_resize for e in se.equalizers(folded) if e.site.kind == "upsample")
    if not left:  # everything folded: the original model's state_dict keys, nothing else
        assert folded.state_dict().keys() == build(name).state_dict().keys()


@pytest.mark.slow
def test_fold_returns_the_model_and_a_fully_folded_one_loads_into_the_plain_class():
    eq = equalized("smp_PSPNet")
    folded = se.fold(eq)
    assert isinstance(folded, type(eq)) and not se.equalizers(folded)
    assert [s.action for s in folded.scale_equalizers.folds] == ["folded"] * 4
    assert "folded by se_surgery.fold" in se.describe(folded)
    plain = build("smp_PSPNet")
    plain.load_state_dict(folded.state_dict())  # strict: no key beyond the plain model's
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), eq(x), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="no scale equalizers to fold"):
        same = se.fold(plain)
    assert isinstance(same, type(plain))
