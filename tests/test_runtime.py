"""The runtime at the seams where other code meets it: how an owner's forward is written (its first parameter,
decorators, ``super().forward``), subclasses of ``nn.Upsample``, and how a call reaches it."""

import functools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import se_surgery as se


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _data(n=3, size=32):
    return [torch.randn(2, 3, size, size) for _ in range(n)]


class NotSelf(nn.Module):
    """conv -> interpolate -> cat -> conv, written with ``s`` for ``self``: 1 site, owned by the root."""

    def __init__(s):
        super().__init__()
        s.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        s.fuse = nn.Conv2d(7, 2, 1)

    def forward(s, x):
        return s.fuse(torch.cat([F.interpolate(s.a(x), scale_factor=2, mode="bilinear"), x], 1))


class This(NotSelf):
    def forward(this, x):  # noqa: N805 (some codebases spell it so)
        up = F.interpolate(this.a(x), scale_factor=2, mode="bilinear")
        return this.fuse(torch.cat([up, x], 1))


def _logged(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class Decorated(NotSelf):
    @_logged
    def forward(me, x):  # noqa: N805
        up = F.interpolate(me.a(x), scale_factor=2, mode="bilinear")
        return me.fuse(torch.cat([up, x], 1))


class CallsSuper(NotSelf):
    """A subclass whose forward calls ``super().forward(x)``: the site is in the base class's forward."""

    def forward(self, x):
        return super().forward(x) * 2


class Up(nn.Upsample):
    """An ``nn.Upsample`` subclass with a forward of its own."""

    def forward(self, x):
        return super().forward(x) + 0


class WithUp(nn.Module):
    """An ``nn.Upsample`` subclass feeding a concatenation: 1 site, owned by ``up``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = Up(scale_factor=2, mode="bilinear")
        self.fuse = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        return self.fuse(torch.cat([self.up(self.a(x)), x], 1))


def _by_hand(model, eq, x):
    """What the equalized model must compute: the plain model with the one site's resize output equalized."""
    (e,) = se.equalizers(eq)
    up = F.interpolate(model.a(x), scale_factor=2, mode="bilinear")
    return model.fuse(torch.cat([(up - e.mean) / e.std, x], 1))


@pytest.mark.parametrize("cls", [NotSelf, This, Decorated, CallsSuper, WithUp])
def test_an_owner_is_known_by_its_call_whatever_its_forward_calls_its_first_parameter(cls):
    model = cls().eval()
    data = _data()
    eq = se.equalize(model, (data[0],), data, progress=False)
    assert len(se.equalizers(eq)) == 1
    for x in (data[0], torch.randn(1, 3, 48, 48)):  # the example size and another
        with torch.no_grad():
            expected = _by_hand(model, eq, x) * (2 if cls is CallsSuper else 1)
            torch.testing.assert_close(eq(x), expected)
            assert not torch.allclose(eq(x), model(x))
    # capturing the equalized model (torch.export runs the forward through its own tracer) finds the same site
    report = se.scale_report(eq, (data[0],), data, progress=False)
    assert [r.equalized for r in report.rows] == [True, False]


def test_a_plain_model_of_the_owners_class_called_inside_its_forward_is_left_alone():
    teacher = NotSelf().eval()
    model = NotSelf().eval()
    data = _data()
    eq = se.equalize(model, (data[0],), data, progress=False)
    taught = []
    eq.register_forward_pre_hook(lambda m, args: taught.append(teacher(args[0])))  # inside the owner's mode
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(eq(x), _by_hand(model, eq, x))
        torch.testing.assert_close(taught[0], teacher(x))


@pytest.mark.slow
@pytest.mark.parametrize("order", ["plain compiled first", "compiled, then equalized in place"])
def test_torch_compile_never_reuses_code_compiled_for_a_plain_model_of_the_same_classes(order):
    import segmentation_models_pytorch as smp

    x = torch.randn(2, 3, 64, 64)
    data = [x, torch.randn(2, 3, 64, 64)]
    plain = smp.FPN("resnet18", encoder_weights=None, classes=5).eval()
    compiled_plain = torch.compile(plain, backend="eager")
    with torch.no_grad():
        compiled_plain(x)
        if order == "plain compiled first":
            eq = se.equalize(smp.FPN("resnet18", encoder_weights=None, classes=5).eval(), (x,), data, progress=False)
            compiled_eq = torch.compile(eq, backend="eager")
            compiled_plain(x)  # the plain model again, before the equalized one
        else:
            reference = se.equalize(plain, (x,), data, progress=False)
            eq = se.equalize(plain, (x,), data, progress=False, inplace=True)
            compiled_eq = compiled_plain
        expected = eq(x)
        assert (compiled_eq(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
        if order == "plain compiled first":
            torch.testing.assert_close(compiled_plain(x), plain(x))
        else:
            torch.testing.assert_close(expected, reference(x))


class InPlace(nn.Module):
    """``a.add_(up(b))`` / ``a += up(b)`` / ``a.sub_(up(b))``: an addition that changes its first operand."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.a(x)
        up = F.interpolate(self.b(x), scale_factor=2, mode="bilinear")
        if self.spelling == "add_":
            a.add_(up)
        elif self.spelling == "+=":
            a += up
        else:
            a.sub_(up)
        return self.head(a)


@pytest.mark.parametrize("spelling", ["add_", "+=", "sub_"])
def test_an_in_place_fusion_with_every_input_equalized_changes_the_users_tensor(spelling):
    model = InPlace(spelling).eval()
    data = _data()
    eq = se.equalize(model, (data[0],), data, progress=False, branches="all")
    stats = {e.site.kind: (e.mean, e.std) for e in se.equalizers(eq)}
    assert set(stats) == {"upsample", "branch"}
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        a = (model.a(x) - stats["branch"][0]) / stats["branch"][1]
        up = (F.interpolate(model.b(x), scale_factor=2, mode="bilinear") - stats["upsample"][0]) / stats["upsample"][1]
        expected = model.head(a - up if spelling == "sub_" else a + up)
        torch.testing.assert_close(eq(x), expected)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit, Interrupted])
def test_a_forward_interrupted_by_ctrl_c_leaves_nothing_behind_on_its_thread(kind):
    from decoders import Small

    model = Small().eval()
    data = _data()
    eq = se.equalize(model, (data[0],), data, progress=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = eq(x)
    fired = []

    def interrupt(module, args, out):
        if not fired:
            fired.append(1)
            raise kind()

    handle = eq.head.lat[1].register_forward_hook(interrupt)  # inside the owner's forward, its mode entered
    with pytest.raises(kind), torch.no_grad():
        eq(x)
    handle.remove()
    with torch.no_grad():
        for _ in range(3):  # every later call as before
            torch.testing.assert_close(eq(x), expected)
    assert torch._C._len_torch_function_stack() == 0


class Recursive(nn.Module):
    """A forward that calls itself until ``depth`` is 0, whose base case returns its input (no tensor operation)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(8, 4, 1)

    def forward(self, x, depth=2):
        if depth == 0:
            return x
        inner = self(self.down(x), depth - 1)
        return self.fuse(torch.cat([F.interpolate(inner, size=x.shape[-2:], mode="bilinear"), x], 1))


class Shared(nn.Module):
    """One block called twice, the first time with nothing to do (it returns its input)."""

    def __init__(self):
        super().__init__()
        self.block = Gated()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        f = self.stem(x)
        f = self.block(f, None)
        return self.block(f, f[..., ::2, ::2])


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fuse = nn.Conv2d(8, 4, 1)

    def forward(self, x, coarse):
        if coarse is None:
            return x
        return self.fuse(torch.cat([x, F.interpolate(coarse, scale_factor=2, mode="bilinear")], 1))


@pytest.mark.parametrize("cls", [Recursive, Shared])
def test_an_owner_call_that_returns_its_input_untouched_is_not_a_call_of_the_graph(cls):
    model = cls().eval()
    data = [torch.randn(2, cls is Recursive and 4 or 3, 32, 32) for _ in range(3)]
    eq = se.equalize(model, (data[0],), data, progress=False)
    assert se.equalizers(eq)
    seen = {e.name: [] for e in se.equalizers(eq)}
    for e in se.equalizers(eq):
        e.register_forward_hook(lambda m, i, o: seen[m.name].append(o))
    with torch.no_grad():
        eq(data[0])
    assert all(len(v) == 1 for v in seen.values())


def test_a_resize_in_a_hook_of_a_module_the_owner_calls_is_not_the_owners_call():
    model = NotSelf().eval()
    data = _data()
    eq = se.equalize(model, (data[0],), data, progress=False)
    shown = []
    eq.a.register_forward_hook(lambda m, i, o: shown.append(F.interpolate(o, scale_factor=2, mode="bilinear")))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(eq(x), _by_hand(model, eq, x))
        torch.testing.assert_close(shown[0], F.interpolate(model.a(x), scale_factor=2, mode="bilinear"))


def test_an_owners_forward_called_directly_is_equalized_as_its_module_call():
    from decoders import Small

    data = _data()
    for model, call in [(NotSelf().eval(), lambda m, x: (m.forward(x), m(x))),
                        (Small().eval(), lambda m, x: (m.head.forward(x), m.head(x)))]:
        eq = se.equalize(model, (data[0],), data, progress=False)
        x = torch.randn(1, 3, 32, 32)
        if isinstance(model, Small):  # the head takes three 4-channel levels
            x = torch.cat([x, x[:, :1]], 1)
            x = [x[:, :, ::2, ::2], x[:, :, ::4, ::4], x[:, :, ::8, ::8]]
        with torch.no_grad():
            direct, called = call(eq, x)
            plain, _ = call(model, x)
        assert torch.equal(direct, called) and not torch.equal(direct, plain)


def test_two_owners_swapped_are_replaced_everywhere_until_recalibrated():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.h1, self.h2 = NotSelf(), NotSelf()

        def forward(self, x):
            return self.h1(x) + self.h2(x * 2)

    data = _data()
    eq = se.equalize(Two().eval(), (data[0],), data, progress=False)
    eq.h1, eq.h2 = eq.h2, eq.h1
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(se.SiteMismatchError, match="h1, h2 of Two is not the module its equalizers"):
        eq(x)
    assert "NOT ACTING: h1, h2" in se.describe(eq)
    with pytest.raises(se.SiteMismatchError):
        se.fold(eq)
    se.calibrate(eq, data)  # the equalizers are attached to the modules now at each path and measured again
    back = se.restore(Two(), eq.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(x), eq(x))


class AtenResize(NotSelf):
    def forward(self, x):
        up = torch.ops.aten.upsample_bilinear2d.vec(self.a(x), None, False, [2.0, 2.0])
        return self.fuse(torch.cat([up, x], 1))


def test_a_resize_called_as_an_aten_op_is_equalized():
    model = AtenResize().eval()
    data = _data()
    eq = se.equalize(model, (data[0],), data, progress=False)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(eq(x), _by_hand(model, eq, x))


def test_an_owner_replaced_by_a_module_of_another_class_says_to_equalize_afresh():
    from decoders import Head, Small

    class OtherHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Head()

        def forward(self, feats):
            return self.inner(feats)

    data = _data()
    eq = se.equalize(Small().eval(), (data[0],), data, progress=False)
    eq.head = OtherHead()
    with pytest.raises(se.UsageError, match=r"head is now a OtherHead, but its equalizer sites were found in "
                                            r"Head\.forward.*afresh"):
        se.calibrate(eq, data)


def test_a_model_holding_a_compiled_submodule_is_refused_with_what_to_do():
    from decoders import Small

    model = Small().eval()
    model.head = torch.compile(model.head)
    with pytest.raises(se.UsageError, match="head of Small is a torch.compile'd module.*then compile"):
        se.equalize(model, (_data()[0],), _data(), progress=False)


def test_an_upsampled_feature_times_a_gate_is_a_site_an_upsampled_gate_is_not():
    from decoders import Attention, Gate

    data = _data()
    model = Attention().eval()
    eq = se.equalize(model, (data[0],), data, progress=False)
    assert [e.site.name for e in se.equalizers(eq)] == ["model.call0_resize0", "model.call0_resize1"]
    seen = []
    for e in se.equalizers(eq):
        e.register_forward_hook(lambda m, i, o: seen.append(o.std().item()))
    with torch.no_grad():
        eq(data[0])
    assert len(seen) == 2
    with pytest.warns(UserWarning, match="no interpolating upsampling feeds a fusion"):
        assert se.equalizers(se.equalize(Gate(), (data[0],), progress=False)) == []


class Threaded(NotSelf):
    """The site's resize made on a worker thread inside the forward, once ``threaded`` is set (torch.export cannot
    capture a thread: the model is equalized without it)."""

    threaded = False

    def forward(self, x):
        from concurrent.futures import ThreadPoolExecutor

        a = self.a(x)
        if not self.threaded:
            return self.fuse(torch.cat([F.interpolate(a, scale_factor=2, mode="bilinear"), x], 1))
        with ThreadPoolExecutor(1) as pool:
            up = pool.submit(lambda: F.interpolate(a, scale_factor=2, mode="bilinear")).result()
        return self.fuse(torch.cat([up, x], 1))


def test_a_site_call_on_a_worker_thread_is_named_as_a_cause():
    data = _data()
    eq = se.equalize(Threaded().eval(), (data[0],), data, progress=False)
    eq.threaded = True
    with pytest.raises(se.SiteMismatchError, match="was not met .* another thread"):
        eq(data[0])


class DirectForward(nn.Module):
    """A submodule's forward called directly (``self.block.forward(x)``), which skips its hooks."""

    def __init__(self):
        super().__init__()
        self.block = NotSelf()

    def forward(self, x):
        return self.block.forward(x)


def test_a_submodules_forward_called_directly_is_left_out_with_the_cause_and_the_fix():
    data = _data()
    with pytest.warns(UserWarning, match=r"NotSelf\.forward.*\.forward\(\.\.\.\) is called directly.*module\(x\)"):
        eq = se.equalize(DirectForward().eval(), (data[0],), data, progress=False)
    assert se.equalizers(eq) == []


COMPILE_AFTER_LOAD = """
import sys, torch
sys.path.insert(0, {tests!r})
from decoders import Small
import se_surgery  # noqa: F401  (as a user's script imports it)
default = torch._dynamo.config.skip_nnmodule_hook_guards
eq = torch.load({path!r}, weights_only=False).eval()
plain = Small().eval()
plain.load_state_dict({{k: v for k, v in eq.state_dict().items() if not k.startswith("scale_equalizers")}})
x = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    torch.compile(plain, backend="eager")(x)  # the plain twin first: its code must not serve the equalized model
    got, expected, unequalized = torch.compile(eq, backend="eager")(x), eq(x), plain(x)
assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, unequalized), "wrong compiled code"
assert torch._dynamo.config.skip_nnmodule_hook_guards == default, "a torch setting changed"
print("ok")
"""


@pytest.mark.slow
def test_no_torch_setting_changes_and_a_pickled_model_compiles_right_in_a_new_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from decoders import Small

    default = torch._dynamo.config.skip_nnmodule_hook_guards
    data = _data()
    eq = se.equalize(Small().eval(), (data[0],), data, progress=False)
    se.fold(eq)
    se.restore(Small(), eq.state_dict())
    assert torch._dynamo.config.skip_nnmodule_hook_guards == default  # equalize, fold, restore: no torch setting
    torch.save(eq, tmp_path / "eq.pt")
    script = tmp_path / "run.py"
    script.write_text(COMPILE_AFTER_LOAD.format(tests=str(Path(__file__).parent), path=str(tmp_path / "eq.pt")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


class Projected(nn.Module):
    """``u = up(proj(relu(pb(x))))`` fused with ``pa(x)``: the site's line also calls a submodule (``proj``)."""

    def __init__(self):
        super().__init__()
        self.pa, self.pb, self.proj, self.fuse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1), \
            nn.Conv2d(4, 4, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        u = F.interpolate(self.proj(torch.relu(self.pb(x))), scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([self.pa(x), u], 1))


@pytest.mark.parametrize("kind", ["forward hook", "pre-hook", "forward hook with kwargs"])
def test_a_callee_hook_that_resizes_is_not_taken_for_the_site(kind):
    data = _data()
    eq = se.equalize(Projected().eval(), (data[0],), data, progress=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = eq(x)
    maps = {}

    def look(t):  # a visualisation: resizes the callee's map, returns nothing (the module's output stays)
        maps["p"] = F.interpolate(t, size=(64, 64), mode="bilinear")

    if kind == "forward hook":
        eq.proj.register_forward_hook(lambda m, a, out: look(out))
    elif kind == "pre-hook":
        eq.proj.register_forward_pre_hook(lambda m, a: look(a[0]))
    else:
        eq.proj.register_forward_hook(lambda m, a, kw, out: look(out), with_kwargs=True)
    with torch.no_grad():
        assert torch.equal(eq(x), expected)
    assert maps["p"].shape == (1, 4, 64, 64)


class Wrapped(nn.Module):
    """:class:`Projected` as a submodule (the owner is ``inner``, not the model) behind a stem."""

    def __init__(self):
        super().__init__()
        self.stem, self.inner = nn.Conv2d(3, 3, 1), Projected()

    def forward(self, x):
        return self.inner(self.stem(x))


@pytest.mark.parametrize("callee", ["proj", "pa", "fuse"])
def test_a_resizing_hook_on_any_callee_of_a_submodule_owner_is_not_taken_for_the_site(callee):
    data = _data()
    eq = se.equalize(Wrapped().eval(), (data[0],), data, progress=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = eq(x)
    maps = []
    getattr(eq.inner, callee).register_forward_hook(
        lambda m, a, out: maps.append(F.interpolate(out, size=(64, 64), mode="bilinear")))
    with torch.no_grad():
        assert torch.equal(eq(x), expected)
    assert len(maps) == 1 and maps[0].shape[-2:] == (64, 64)


@pytest.mark.slow
def test_a_resizing_hook_on_a_callee_of_smp_upernets_decoder_is_not_taken_for_a_site():
    from zoo import batches, build, inputs

    torch.manual_seed(0)
    eq = se.equalize(build("smp_UPerNet").eval(), inputs("smp_UPerNet", torch.randn(2, 3, 128, 128)),
                     batches("smp_UPerNet"), progress=False)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = eq(x)
    maps = []
    for block in (eq.decoder.fpn_conv_blocks[0], eq.decoder.fusion_block):  # callees of the decoder, an owner
        block.register_forward_hook(lambda m, a, out: maps.append(F.interpolate(out, scale_factor=2,
                                                                                 mode="bilinear")))
    with torch.no_grad():
        assert torch.equal(eq(x), expected)
    assert len(maps) == 2


class BaseCase(nn.Module):
    """A recursion whose base case only reads its input's shape and returns it: two sites, the graph's calls."""

    def __init__(self):
        super().__init__()
        self.stem, self.down, self.fuse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x, depth=2):
        if x.shape[1] == 3:
            x = self.stem(x)
        if depth == 0:
            return x
        y = self(torch.relu(self.down(x)), depth - 1)
        return self.fuse(torch.cat([x, F.interpolate(y, scale_factor=2, mode="bilinear")], 1))


def test_a_recursions_base_case_that_reads_its_inputs_shape_is_no_site_call():
    data = _data()
    eq = se.equalize(BaseCase().eval(), (data[0],), data, progress=False)
    assert len(se.equalizers(eq)) == 2
    with torch.no_grad():
        eq(torch.randn(1, 3, 32, 32))
    eq.train()(data[0]).sum().backward()


class _Shared(nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, x):
        return self.decoder(x)


def test_a_module_shared_by_two_models_is_refused_in_place_and_copied_otherwise():
    data = _data()
    decoder = Projected()
    first, second = _Shared(decoder).eval(), _Shared(decoder).eval()
    se.equalize(first, (data[0],), data, progress=False, inplace=True)
    with torch.no_grad():
        expected = first(data[0])
    with pytest.raises(se.UsageError, match=r"decoder of _Shared already hold\(s\) the sites of another equalized "
                                            r"model.*nothing was changed"):
        se.equalize(second, (data[0],), data, progress=False, inplace=True)
    copied = se.equalize(second, (data[0],), data, progress=False)  # its own copy of the decoder
    with torch.no_grad():
        assert torch.equal(first(data[0]), expected)  # the first model is untouched and still runs
        copied(data[0])
    assert len(se.equalizers(copied)) == 1


def test_a_plain_module_of_an_owners_class_sharing_a_conv_with_it_runs():
    data = _data()
    eq = se.equalize(Projected().eval(), (data[0],), data, progress=False)
    plain = Projected().eval()
    plain.pa = eq.pa  # shares a callee of the owner
    with torch.no_grad():
        plain(data[0])
        with pytest.raises(se.SiteMismatchError, match=r"Projected.forward was called on an equalized owner without"):
            Projected.forward(eq, data[0])


class _Helper(nn.Module):
    """The site's resize sits in a helper method: its owner runs in its mode, not bound."""

    def __init__(self):
        super().__init__()
        self.pa, self.pb, self.fuse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(8, 5, 1)

    def up(self, x):
        return F.interpolate(x, scale_factor=2, mode="bilinear")

    def forward(self, x):
        return self.fuse(torch.cat([self.pa(x), self.up(self.pb(x))], 1))


class _Stored(nn.Module):
    """The resize is a ``functools.partial`` kept on the instance: no check of the code sees it; verifying the
    equalizers on the example does, and the owner falls back to its mode."""

    def __init__(self):
        super().__init__()
        self.pa, self.pb, self.fuse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(8, 5, 1)
        self.resize = functools.partial(F.interpolate, scale_factor=2, mode="bilinear")

    def forward(self, x):
        return self.fuse(torch.cat([self.pa(x), self.resize(self.pb(x))], 1))


class _Deprecated(nn.Module):
    """The resize through ``F.upsample_bilinear`` (a deprecated wrapper of F.interpolate): bound as well."""

    def __init__(self):
        super().__init__()
        self.pa, self.pb, self.fuse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.fuse(torch.cat([self.pa(x), F.upsample_bilinear(self.pb(x), scale_factor=2)], 1))


@pytest.mark.filterwarnings("ignore:.*upsample_bilinear.*deprecated")
@pytest.mark.parametrize("cls, bound", [(Projected, True), (_Deprecated, True), (_Helper, False), (_Stored, False)])
def test_an_owner_runs_bound_where_its_forward_reaches_every_site_and_in_its_mode_elsewhere(cls, bound):
    data = _data()
    eq = se.equalize(cls().eval(), (data[0],), data, progress=False)
    (owner,) = eq.scale_equalizers.owners.values()
    assert owner.bound is bound
    seen = []
    (equalizer,) = se.equalizers(eq)
    equalizer.register_forward_hook(lambda m, a, out: seen.append(out))  # (after its resize while hooked)
    with torch.no_grad():
        for x in data:
            eq(x)
    out = torch.cat(seen)
    assert len(seen) == len(data) and abs(out.mean().item()) < 1e-4 and abs(out.std(unbiased=False).item() - 1) < 1e-3


_GAIN = 1.0  # read by _ReadsAGlobal.forward at each call


class _ReadsAGlobal(nn.Module):
    """Its forward reads a module-level setting that the user may change between calls."""

    def __init__(self):
        super().__init__()
        self.pa, self.pb, self.fuse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        up = F.interpolate(self.pb(x), scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([self.pa(x) * _GAIN, up], 1))


def test_a_bound_owner_reads_the_globals_of_its_module_as_they_are_at_each_call(monkeypatch):
    data = _data()
    eq = se.equalize(_ReadsAGlobal().eval(), (data[0],), data, progress=False)
    assert eq.scale_equalizers.owners[""].bound
    folded = se.fold(eq)  # (the 1x1 fusion conv takes the equalizer: the class's own forward, no runtime)
    with torch.no_grad():
        torch.testing.assert_close(eq(data[0]), folded(data[0]), rtol=1e-4, atol=1e-5)
        monkeypatch.setattr(sys.modules[__name__], "_GAIN", 3.0)
        changed = eq(data[0])
        torch.testing.assert_close(changed, folded(data[0]), rtol=1e-4, atol=1e-5)
        calls, cat = [], torch.cat  # torch's own names are read when used, too (a user's patch of torch.cat)
        monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or cat(*a, **k))
        torch.testing.assert_close(eq(data[0]), changed)
        assert calls


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smp_UPerNet", "smp_PSPNet", "smp_FPN", "hf_segformer", "tv_deeplabv3"])
def test_the_zoos_owners_run_bound(name):
    from zoo import batches, build, inputs

    torch.manual_seed(0)
    eq = se.equalize(build(name).eval(), inputs(name, torch.randn(2, 3, 128, 128)), batches(name), progress=False)
    owners = eq.scale_equalizers.owners
    assert owners and all(owner.bound for owner in owners.values()), {p: o.bound for p, o in owners.items()}
