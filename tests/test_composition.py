"""Composition: an equalized model stays right wherever PyTorch code takes it (threads, nested owners, moved code,
standard input, FX tracers, copied and replaced owners, wrappers, other models of the same class, recursion,
TorchScript, float16, framework checkpoints, training-only calls, every fusion spelling), or says why it cannot."""

import copy
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from decoders import FUSIONS, Gate, Head, Nested, Recursive, RootOwner, Small, Spelled, TwoPaths
from torch import nn

import se_surgery as se
from se_surgery import ops

HERE = Path(__file__).parent


def _data(shape=(2, 3, 32, 32), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _eq(model, shape=(2, 3, 32, 32), **kw):
    data = _data(shape)
    return se.equalize(model.eval(), (data[0],), data, progress=False, **kw)


@pytest.mark.slow
def test_threads_on_one_zoo_model_give_the_single_threaded_results():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.UPerNet("resnet18", encoder_weights=None, classes=3, decoder_channels=32).eval()
    eq = _eq(model, (1, 3, 128, 128), norm="running")  # (batches of one: no batch statistics)
    inputs = [torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(i))
              for i, s in enumerate([128, 160, 192, 128] * 100)]
    with torch.no_grad():
        expected = [eq(x) for x in inputs]

    def run(i):
        with torch.no_grad():
            return i, eq(inputs[i])

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, range(len(inputs))))
    finally:
        torch.set_num_threads(2)
    assert len(results) == 400
    for i, out in results:
        torch.testing.assert_close(out, expected[i], rtol=1e-5, atol=1e-5)


def test_threads_on_a_small_decoder():
    eq = _eq(Small())
    inputs = [torch.randn(1, 3, s, s) for s in [32, 48, 64, 40] * 100]
    with torch.no_grad():
        expected = [eq(x) for x in inputs]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(eq, inputs))
    assert all(torch.equal(a, b) for a, b in zip(results, expected))


def test_owners_nested_in_owners_of_the_same_class():
    eq = _eq(Nested())
    assert len(se.equalizers(eq)) == 3
    counts = {e.name: 0 for e in se.equalizers(eq)}
    for e in se.equalizers(eq):
        e.register_forward_hook(lambda m, i, o: counts.__setitem__(m.name, counts[m.name] + 1))
    outs = {}
    for e in se.equalizers(eq):
        e.register_forward_hook(lambda m, i, o: outs.setdefault(m.name, []).append(o))
    with torch.no_grad():
        eq(_data()[0])
    assert set(counts.values()) == {1}
    for name, (o,) in outs.items():
        assert abs(o.mean().item()) < 0.5 and 0.5 < o.std().item() < 2, name


def _run(code: str, cwd: Path, *, stdin: str | None = None, args=()):
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    done = subprocess.run([sys.executable, *args], input=stdin if stdin is not None else code, text=True,
                          capture_output=True, cwd=cwd, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_a_saved_model_loads_where_its_code_lives_at_another_path(tmp_path):
    first, second = tmp_path / "clone_a", tmp_path / "clone_b"
    first.mkdir()
    shutil.copy(HERE / "decoders.py", first / "decoders.py")
    _run(textwrap.dedent("""
        import torch, se_surgery as se
        from decoders import Small
        torch.manual_seed(0)
        data = [torch.randn(2, 3, 32, 32) for _ in range(3)]
        eq = se.equalize(Small().eval(), (data[0],), data, progress=False)
        torch.save(eq, "model.pt")
        torch.save(eq(torch.ones(1, 3, 48, 48)), "out.pt")
    """), first)
    pickled = (first / "model.pt").read_bytes()
    assert str(first).encode() not in pickled and b"decoders.py" not in pickled
    second.mkdir()
    # another checkout: the same code at another path, with a line added above the model (offsets still hold)
    (second / "decoders.py").write_text("# moved\n" + (HERE / "decoders.py").read_text())
    shutil.move(first / "model.pt", second / "model.pt")
    shutil.move(first / "out.pt", second / "out.pt")
    shutil.rmtree(first)
    out = _run(textwrap.dedent("""
        import torch
        eq = torch.load("model.pt", weights_only=False)
        print(torch.equal(eq(torch.ones(1, 3, 48, 48)), torch.load("out.pt")))
    """), second)
    assert out.strip() == "True"


STDIN_SCRIPT = """
import torch, torch.nn.functional as F, se_surgery as se
from torch import nn
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.f = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(8, 2, 1)
    def forward(self, x):
        up = F.interpolate(self.a(x), size=x.shape[-2:], mode="bilinear")
        return self.f(torch.cat([up, self.b(x)], 1))
data = [torch.randn(2, 3, 32, 32) for _ in range(3)]
eq = se.equalize(M().eval(), (data[0],), data, progress=False)
e = se.equalizers(eq)[0]
got = []
e.register_forward_hook(lambda m, i, o: got.append(o.std().item()))
with torch.no_grad():
    eq(data[0])
print(len(se.equalizers(eq)), len(got), round(got[0]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_code_from_standard_input_and_python_c(tmp_path, how):
    if how == "stdin":
        out = _run("", tmp_path, stdin=STDIN_SCRIPT, args=["-"])
    else:
        out = _run("", tmp_path, stdin="", args=["-W", "ignore", "-c", STDIN_SCRIPT])
    assert out.split()[-3:] == ["1", "1", "1"]


@pytest.mark.parametrize("model", [Small, RootOwner])
def test_fx_tracers_refuse_instead_of_dropping_the_equalizers(model):
    from torchvision.models.feature_extraction import create_feature_extractor

    eq = _eq(model())
    with pytest.raises(se.CaptureError, match="fold"):
        torch.fx.symbolic_trace(eq)
    with pytest.raises(se.CaptureError, match="fold"):
        create_feature_extractor(eq, return_nodes={"fuse" if model is RootOwner else "head.fuse": "out"})
    # the plain model traces; the folded one too (everything folds away here)
    torch.fx.symbolic_trace(model())
    folded = se.fold(eq)
    assert not se.equalizers(folded)
    x = torch.randn(1, 3, 40, 40)
    torch.testing.assert_close(torch.fx.symbolic_trace(folded)(x), eq(x), rtol=1e-5, atol=1e-5)


def test_a_deep_copied_owner_put_back_uses_the_models_equalizers():
    eq = _eq(Small())
    x = _data()[0]
    with torch.no_grad():
        ref = eq(x)
    eq.head = copy.deepcopy(eq.head)  # what peft's modules_to_save does
    se.calibrate(eq, _data(), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(eq(x), ref)
    folded = se.fold(eq)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_peft_modules_to_save_then_merge_and_fold():
    from peft import LoraConfig, get_peft_model

    eq = _eq(Small())
    x = _data()[0]
    peft_model = get_peft_model(eq, LoraConfig(r=2, target_modules=["stem.0"], modules_to_save=["head"]))
    se.calibrate(peft_model.base_model.model, _data(), progress=False)
    with torch.no_grad():
        ref = peft_model(x)
    merged = peft_model.merge_and_unload()
    folded = se.fold(merged)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_equalizing_a_wrapper_of_an_equalized_model_refuses():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    eq = _eq(Small())
    with pytest.raises(se.UsageError, match="'inner'"):
        se.equalize(Wrapper(eq), (_data()[0],))
    # equalizing the equalized model itself adds nothing
    with pytest.warns(UserWarning, match="nothing added"):
        again = se.equalize(eq, (_data()[0],))
    assert len(se.equalizers(again)) == 2


def test_float16_calibration_sums_in_float32():
    model = Small().half().eval()
    data = [10 * x.half() for x in _data()]
    eq = se.equalize(model, (data[0],), data, progress=False)
    plain = Small().half().eval()
    plain.load_state_dict({k: v for k, v in eq.state_dict().items() if not k.startswith("scale_")})
    for e in se.equalizers(eq):
        assert e.mean.dtype == torch.float16

    # reference: the upsampled maps of the plain model, in float64
    captured = []
    orig = F.interpolate

    def spy(*a, **k):
        out = orig(*a, **k)
        captured.append(out.double())
        return out

    F.interpolate = spy
    try:
        with torch.no_grad():
            for x in data:
                plain(x)
    finally:
        F.interpolate = orig
    for i, e in enumerate(se.equalizers(eq)):
        ref = torch.cat([c.flatten() for c in captured[i::2]])
        assert torch.isfinite(ref).all() and ref.abs().max() < 65504
        assert abs(e.mean.double().item() - ref.mean().item()) <= 1e-3 * ref.std().item() + 1e-3
        assert abs(e.std.double().item() / ref.std(correction=0).item() - 1) <= 1e-3


@pytest.mark.parametrize("wrap", ["lightning", "ddp", "compiled", "nested"])
def test_restore_finds_the_entries_under_a_frameworks_prefix(tmp_path, wrap):
    eq = _eq(Small())
    state = eq.state_dict()
    saved = {"lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
             "ddp": {f"module.{k}": v for k, v in state.items()},
             "compiled": {f"_orig_mod.{k}": v for k, v in state.items()},
             "nested": {"model": state, "optimizer": {"state": {}, "param_groups": []}}}[wrap]
    torch.save(saved, tmp_path / "ckpt.pt")
    with pytest.warns(UserWarning, match="prefix|entry"):
        back = se.restore(Small(), tmp_path / "ckpt.pt")
    for k, v in state.items():
        assert torch.equal(back.state_dict()[k], v), k


def test_restore_asks_which_model_when_a_checkpoint_holds_two():
    state = _eq(Small()).state_dict()
    two = {**{f"student.{k}": v for k, v in state.items()}, **{f"teacher.{k}": v for k, v in state.items()}}
    with pytest.raises(se.UsageError, match="prefix="):
        se.restore(Small(), two)
    back = se.restore(Small(), two, prefix="teacher.")
    assert torch.equal(back.state_dict()["scale_equalizers.head_call0_resize0.std"],
                       state["scale_equalizers.head_call0_resize0.std"])


@pytest.mark.parametrize("data", [None, 3, torch.zeros(2, 3, 8, 8), "images/"])
def test_calibrate_with_something_that_is_not_batches(data):
    eq = se.equalize(Small().eval(), (_data()[0],))
    with pytest.raises(se.UsageError, match="iterable of batches"):
        se.calibrate(eq, data)


def test_a_training_only_call_of_an_owner_passes_through():
    model = TwoPaths()
    data = _data()
    eq = se.equalize(model.train(), (data[0],), None, progress=False)
    se.calibrate(eq, data, progress=False)
    (e,) = se.equalizers(eq)
    calls = []
    e.register_forward_hook(lambda *a: calls.append(1))
    eq.train()
    y, rec = eq(data[0])
    (y.sum() + rec.sum()).backward()
    assert len(calls) == 1
    with torch.no_grad():
        torch.testing.assert_close(rec, F.interpolate(eq.a(data[0]) * 0.5, scale_factor=2, mode="bilinear"))
    eq.eval()
    eq(data[0])
    assert len(calls) == 2


def test_a_training_only_call_the_graph_does_not_know_raises():
    model = TwoPaths().eval()
    data = _data()
    eq = se.equalize(model, (data[0],), data, progress=False)
    eq.scale_equalizers.owners["up"].train_calls = None  # as if the training graph could not be captured
    eq.train()
    with pytest.raises(se.SiteMismatchError, match=r"up \(Upsample\) was called 2 times in this training forward"):
        eq(data[0])


def test_a_training_only_call_is_known_when_equalized_in_eval_mode():
    eq = se.equalize(TwoPaths().eval(), (_data()[0],), _data(), progress=False)  # a pretrained model, put in eval
    eq.train()
    y, rec = eq(_data()[0])
    with torch.no_grad():
        torch.testing.assert_close(rec, F.interpolate(eq.a(_data()[0]) * 0.5, scale_factor=2, mode="bilinear"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_segresnetvae_trains_equalized_where_its_decoder_fuses(mode):
    from monai.networks.nets import SegResNetVAE

    torch.manual_seed(0)
    model = SegResNetVAE(input_image_size=(32, 32, 32), spatial_dims=3, init_filters=8, in_channels=1,
                         out_channels=2, blocks_down=(1, 1, 1), blocks_up=(1, 1))
    data = [torch.randn(1, 1, 32, 32, 32) for _ in range(2)]
    eq = se.equalize(model.train(mode == "train"), (data[0],), data, progress=False)
    assert len(se.equalizers(eq)) == 2
    calls = {e.name: 0 for e in se.equalizers(eq)}
    for e in se.equalizers(eq):
        e.register_forward_hook(lambda m, *a: calls.__setitem__(m.name, calls[m.name] + 1))
    eq.train()
    out, vae_loss = eq(data[0])
    (out.mean() + vae_loss).backward()
    assert set(calls.values()) == {1}
    eq.eval()
    with torch.no_grad():
        eq(data[0])
    assert set(calls.values()) == {2}


@pytest.mark.parametrize("spelling", sorted(FUSIONS))
def test_every_fusion_spelling_is_a_site_on_both_sides(spelling):
    eq = _eq(Spelled(spelling))
    (e,) = se.equalizers(eq)
    got = []
    e.register_forward_hook(lambda m, i, o: got.append(o))
    with torch.no_grad():
        eq(_data()[0])
    assert len(got) == 1 and abs(got[0].std().item() - 1) < 0.2


def test_the_fusion_table_is_what_every_reader_meets():
    # Each spelling of the test decoders meets exactly one table entry on each side (the runtime's torch function,
    # the graph pass's aten op), the same entry; together the spellings cover every function of the table.
    met = set()

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            met.update({func} & set(ops.FUSION_FUNCS))
            return func(*args, **(kwargs or {}))

    a, b = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    funcs = set()
    for spelling, fuse in FUSIONS.items():
        met.clear()
        with Recording():
            fuse(a.clone(), b)
        graph = torch.export.export(_Fuse(fuse), (a, b), strict=False).graph
        atens = [n.target for n in graph.nodes if n.target in ops.FUSION_OPS]
        assert len(met) == 1 and len(atens) == 1, (spelling, met, atens)
        assert ops.FUSION_FUNCS[next(iter(met))] is ops.FUSION_OPS[atens[0]], spelling
        funcs |= met
    # no spelling of the table untested (torch reports the operators a + b, a += b as the methods add, add_)
    dunders = {f for f in ops.FUSION_FUNCS if f.__name__.startswith("__")}
    assert funcs == set(ops.FUSION_FUNCS) - dunders, set(ops.FUSION_FUNCS) - dunders - funcs
    kinds = {f.kind for f in ops.FUSIONS}
    assert {ops.FUSION_FUNCS[f].kind for f in funcs} == kinds == set(ops.NOUNS)
    assert {ops.ONNX_FUSIONS[t].kind for t in ops.ONNX_FUSIONS} == {"cat", "add", "sub"}  # stack: Concat in ONNX


class _Fuse(nn.Module):
    def __init__(self, fuse):
        super().__init__()
        self.fuse = fuse

    def forward(self, a, b):
        return self.fuse(a.clone(), b)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_helper_method_raises_instead_of_giving_wrong_gradients(reentrant):
    from decoders import Helper

    eq = _eq(Helper(checkpointed=reentrant))
    eq.train()
    with pytest.raises(se.SiteMismatchError, match=r"inside torch.utils.checkpoint of a method .* Checkpoint a "
                                                   r"submodule instead"):
        eq(_data()[0]).square().mean().backward()


def _outputs_of(eq):
    """Every equalizer's outputs during the next forwards, by name."""
    seen = {e.name: [] for e in se.equalizers(eq)}
    for e in se.equalizers(eq):
        e.register_forward_hook(lambda m, args, out: seen[m.name].append(out.detach()))
    return seen


def test_a_replaced_owner_refuses_everywhere_until_calibrated():
    eq, x = _eq(Small()), _data()[0]
    eq.head = Head()  # a new decoder head, as fine-tuning code does
    message = r"head of Small is not the module its equalizers were attached to .* se_surgery.calibrate"
    with pytest.raises(se.SiteMismatchError, match=message):
        eq(x)
    for tool in (se.fold, lambda m: se.export_onnx(m, (x,), "unused.onnx"),
                 lambda m: se.scale_report(m, (x,), [x], progress=False)):
        with pytest.raises(se.SiteMismatchError, match=message):
            tool(eq)
    assert "NOT ACTING: head was replaced" in se.describe(eq)
    se.calibrate(eq, _data(), progress=False)  # attaches the equalizers to the new head and measures them
    assert "NOT ACTING" not in se.describe(eq)
    seen = _outputs_of(eq)
    with torch.no_grad():
        out = eq(x)
    assert all(len(v) == 1 for v in seen.values())  # they act on the new module
    plain = Small()
    plain.load_state_dict({k: v for k, v in eq.state_dict().items() if not k.startswith("scale_equalizers")})
    assert not torch.allclose(out, plain(x))
    torch.testing.assert_close(se.fold(eq)(x), out, rtol=1e-5, atol=1e-5)


def test_equalize_again_after_replacing_an_owner_measures_the_new_module():
    eq = _eq(Small())
    eq.head = Head()
    again = se.equalize(eq, (_data()[0],), progress=False)  # not "already equalized": the new head is not
    assert all(not e.is_calibrated for e in se.equalizers(again))
    with pytest.raises(se.NotCalibratedError):
        again(_data()[0])
    se.calibrate(again, _data(), progress=False)
    again(_data()[0])


@pytest.mark.slow
def test_a_replaced_zoo_decoder_is_never_silently_plain():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    data = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    eq = se.equalize(smp.UPerNet("resnet18", encoder_weights=None, classes=5), (data[0],), data, progress=False)
    eq.decoder = smp.UPerNet("resnet18", encoder_weights=None, classes=5).decoder
    with pytest.raises(se.SiteMismatchError, match="decoder"):
        eq(data[0])
    se.calibrate(eq, data, progress=False)
    seen = _outputs_of(eq)
    eq.eval()(data[0])
    assert len(seen) == 7 and all(len(v) == 1 for v in seen.values())


def test_an_upsampled_gate_is_not_a_fusion():
    with pytest.warns(UserWarning, match="no interpolating upsampling feeds a fusion"):
        eq = se.equalize(Gate(), (_data()[0],), progress=False)
    assert se.equalizers(eq) == []


def test_torchscript_refuses_with_equalizers_and_scripts_after_fold():
    eq = _eq(RootOwner())
    with pytest.raises(se.CaptureError, match="se_surgery.fold the model first"):
        torch.jit.script(eq)
    folded = se.fold(eq)
    x = _data()[0]
    torch.testing.assert_close(torch.jit.script(folded)(x), eq(x), rtol=1e-5, atol=1e-5)


def test_a_plain_model_of_the_owners_class_inside_its_forward_is_left_alone():
    eq, x = _eq(Small()), _data()[0]
    with torch.no_grad():
        want = eq(x)
    teacher = Small()
    eq.head.register_forward_pre_hook(lambda module, args: (teacher.head(args[0]), None)[1])
    seen = _outputs_of(eq)
    with torch.no_grad():
        torch.testing.assert_close(eq(x), want)
    assert all(len(v) == 1 for v in seen.values())


def test_a_model_that_calls_itself():
    data = _data(n=4)
    eq = se.equalize(Recursive(), (data[0],), data, progress=False)
    assert len(se.equalizers(eq)) == 2
    seen = _outputs_of(eq)
    with torch.no_grad():
        for x in data:
            eq(x)
    for outs in seen.values():
        everything = torch.cat(outs)
        assert abs(everything.mean().item()) < 1e-4 and abs(everything.std(correction=0).item() - 1) < 1e-3
    eq(torch.randn(1, 3, 48, 48))  # at another size too


def test_a_model_called_from_outside_the_module_tree_is_not_equalized_and_says_so():
    teacher = _eq(Small())

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Small()

        def forward(self, x):
            return self.body(x) + teacher(x)

    with pytest.warns(UserWarning, match="Head.forward, a module outside Student's module tree"):
        eq = se.equalize(Student(), (_data()[0],), _data(), progress=False)
    assert [e.name for e in se.equalizers(eq)] == ["body.head.call0_resize0", "body.head.call0_resize1"]
    seen, taught = _outputs_of(eq), _outputs_of(teacher)
    eq(_data()[0])
    assert all(len(v) == 1 for v in [*seen.values(), *taught.values()])


def test_state_dicts_that_lost_their_recipe_or_belong_elsewhere_are_refused():
    eq = _eq(Small())
    state = eq.state_dict()
    dropped = {k: v for k, v in state.items() if not k.endswith("_extra_state")}  # as smp's loader drops it
    before = {k: v.clone() for k, v in eq.state_dict().items()}
    with pytest.raises(se.UsageError, match="without their se_surgery recipe"):
        eq.load_state_dict(dropped, strict=False)
    other = _eq(Nested())
    with pytest.raises(se.UsageError, match="saved from equalizers at other sites"):
        eq.load_state_dict(other.state_dict(), strict=False)
    assert all(torch.equal(before[k], v) for k, v in eq.state_dict().items())


def test_the_runtime_dispatches_only_the_calls_an_owner_makes_itself(monkeypatch):
    """Issue 21: the modules an owner calls run without its TorchFunctionMode, and an ``nn.Upsample`` owner needs no
    mode at all; the equalizers act as before (standardized on the calibration data, folded exactly)."""
    from se_surgery import dispatch

    seen = []
    handle = dispatch._OwnerMode.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(func.__name__)
        return handle(self, func, types, args, kwargs)

    monkeypatch.setattr(dispatch._OwnerMode, "__torch_function__", spy)
    data = _data()
    eq = _eq(Small())
    (owner,) = eq.scale_equalizers.owners.values()
    assert owner.bound  # the head's forward runs bound to the site finder: no mode at all
    seen.clear()
    with torch.no_grad():
        expected = eq(data[0])
    assert seen == []
    owner.bound = False  # in its mode (as under torch.compile), the head's own calls only
    with torch.no_grad():
        assert torch.equal(eq(data[0]), expected)
    assert "conv2d" not in seen and seen.count("interpolate") == 2 and "cat" in seen

    model, ups = TwoPaths(), []
    model.up.register_forward_hook(lambda m, args, out: ups.append(out))  # the user's, from before: sees the
    eq = _eq(model)                                                        # equalized map, as the forward made it
    seen.clear()
    ups.clear()
    with torch.no_grad():
        outs = [eq(x) for x in data]
    assert seen == []
    up = torch.cat(ups)
    assert abs(up.mean().item()) < 1e-5 and abs(up.std(unbiased=False).item() - 1) < 1e-4
    folded = se.fold(eq)  # the equalizer moves before the upsampling (the addition cannot absorb it)
    (e,) = se.equalizers(folded)
    assert e.before_resize
    with torch.no_grad():
        for x, want in zip(data, outs):
            torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
    assert seen == []


@pytest.mark.parametrize("build", [Small, TwoPaths], ids=["function_resize", "module_resize"])
def test_an_equalizer_acts_on_its_resize_input_in_eager_runs_only(build):
    """Issue 21: eagerly an upsampling's equalizer acts on the low-resolution input (1/factor^d of the work) and
    gives the same map as acting on the output; hooked on the equalizer, calibrating or traced, it acts after."""
    data = _data()
    eq = _eq(build())
    widths = []

    def watch(e, args, out):  # forward hooks on an equalizer see what enters the fusion: the upsampled map
        widths.append(args[0].shape[-1])

    with torch.no_grad():
        fast = [eq(x) for x in data]
        assert all(e.before_resize for e in se.equalizers(eq))
        handles = [e.register_forward_hook(watch) for e in se.equalizers(eq)]
        assert not any(e.before_resize for e in se.equalizers(eq))
        paper = [eq(x) for x in data]
    for a, b in zip(fast, paper):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for h in handles:
        h.remove()
    shapes = []
    for e in se.equalizers(eq):  # no hook on it now (a hook would move it after the resize): watch its forward
        e.forward = lambda x, source=None, e=e: (shapes.append(x.shape[-1]), type(e).forward(e, x, source))[1]
    with torch.no_grad():
        eq(data[0])
    assert len(shapes) == len(se.equalizers(eq)) and all(a < b for a, b in zip(shapes, widths))
    graph = torch.export.export(eq, (data[0],), strict=False).graph  # traced: the paper's placement, after it
    subs = [n for n in graph.nodes if n.op == "call_function" and "sub" in str(n.target)]
    assert len(subs) == len(se.equalizers(eq)) and all("upsample" in str(n.args[0].target) for n in subs)
