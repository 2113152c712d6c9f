"""Calibration: the running moments, and the target scale (the paper's unit scale, or ``scale="restore"``: the
scale before the upsampling)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from decoders import Small

import se_surgery as se
from se_surgery.calibrate import RunningMoments


def _data(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(n)]


def _branches(model, data):
    """Per site (in order): the concatenated upsampled branch and the map it was upsampled from, over ``data``."""
    before, after = {1: [], 2: []}, {1: [], 2: []}
    with torch.no_grad():
        for x in data:
            feats = [torch.relu(conv(x)) * (i + 1) for i, conv in enumerate(model.stem)]
            fine = model.head.lat[0](feats[0])
            for i in (1, 2):
                coarse = model.head.lat[i](feats[i])
                before[i].append(coarse)
                after[i].append(F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear"))
    return [(torch.cat(after[i]), torch.cat(before[i])) for i in (1, 2)]


@pytest.mark.parametrize("per_channel", [False, True])
def test_restore_gives_each_upsampled_branch_its_scale_before_the_resize(per_channel):
    torch.manual_seed(0)
    model, data = Small(), _data()
    eq = se.equalize(model, (data[0],), data, scale="restore", per_channel=per_channel, progress=False)
    dims = (0, 2, 3) if per_channel else None
    for equalizer, (up, source) in zip(se.equalizers(eq), _branches(model, data)):
        out = equalizer(up)
        mean = up.mean(dims) if dims else up.mean()
        std = (out.std(dims, correction=0) if dims else out.std(correction=0))
        want = source.std(dims, correction=0) if dims else source.std(correction=0)
        torch.testing.assert_close(std, want, rtol=1e-4, atol=1e-6)  # the std the resize took away, given back
        torch.testing.assert_close(out.mean(dims) if dims else out.mean(), mean, rtol=1e-4, atol=1e-5)
        assert bool(((up.std(dims, correction=0) if dims else up.std(correction=0)) < want).all())  # it shrank
    # Still (x - mean) / std: it folds exactly like the paper's equalizer.
    x = _data(1, seed=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(se.fold(eq)(x), eq(x), rtol=1e-5, atol=1e-5)
    # The default standardizes; recalibrating with another scale switches the statistics.
    unit = se.calibrate(eq, data, scale="unit", progress=False)
    for equalizer, (up, _) in zip(se.equalizers(unit), _branches(model, data)):
        assert equalizer(up).std(correction=0).item() == pytest.approx(1, rel=1e-4)


def test_restore_is_refused_where_it_has_no_meaning():
    model, data = Small(), _data()
    with pytest.raises(se.UsageError, match="branches='all'"):
        se.equalize(model, (data[0],), data, scale="restore", branches="all", progress=False)
    with pytest.raises(se.UsageError, match="pass calibration_data"):
        se.equalize(model, (data[0],), scale="restore", progress=False)
    with pytest.raises(se.UsageError, match="use one of"):
        se.calibrate(se.equalize(model, (data[0],), progress=False), data, scale="fine", progress=False)


def test_running_moments_match_numpy_on_a_large_badly_offset_input():
    gen = np.random.default_rng(0)
    chunks = [1e6 + gen.standard_normal(size) * 1e-2 for size in (10, 100_000, 3, 250_000, 1, 40_000)]
    moments = RunningMoments()
    for c in chunks:
        moments.update(torch.from_numpy(c))
    everything = np.concatenate(chunks)
    assert moments.count == everything.size
    assert moments.mean.item() == pytest.approx(everything.mean(), rel=1e-15, abs=1e-9)
    assert moments.std.item() == pytest.approx(everything.std(), rel=1e-9)
    # Per channel (dim 1 kept) equals numpy over the other axes.
    x = gen.standard_normal((20, 3, 7, 5)) * np.array([1, 10, 100])[None, :, None, None] + 5
    per = RunningMoments(dims=(0, 2, 3))
    for part in np.split(x, 4):
        per.update(torch.from_numpy(part))
    np.testing.assert_allclose(per.mean.numpy(), x.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(per.std.numpy(), x.std(axis=(0, 2, 3)), rtol=1e-12)


class Reader:
    """A one-pass iterable that is not an Iterator: its ``__iter__`` drains a list (issue 37, case 3)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __iter__(self):
        while self.batches:
            yield self.batches.pop(0)


class Stream(torch.utils.data.IterableDataset):
    """Streaming data: an IterableDataset without ``__len__`` (issue 37, case 5)."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        yield from (x for batch in self.data for x in batch)


def _statistics(model):
    return [(eq.mean.clone(), eq.std.clone()) for eq in se.equalizers(model)]


@pytest.mark.parametrize("wrap", [Reader, iter, lambda d: torch.utils.data.DataLoader(Stream(d), batch_size=2)])
def test_any_iterable_is_read_once_and_calibrates_as_a_list_does(wrap):
    torch.manual_seed(0)
    model, data = Small().train(), _data()
    as_list = se.equalize(model, (data[0],), data, progress=False)
    streamed = se.equalize(model, (data[0],), wrap(list(data)), progress=False)
    for (m1, s1), (m2, s2) in zip(_statistics(as_list), _statistics(streamed)):
        torch.testing.assert_close(m1, m2)
        torch.testing.assert_close(s1, s2)
    se.calibrate(streamed, wrap(list(data)), progress=False)  # calibrate too
    assert [float(s) for _, s in _statistics(streamed)] == pytest.approx([float(s) for _, s in _statistics(as_list)])


def test_equalizing_under_inference_mode_gives_a_model_that_trains():
    torch.manual_seed(0)
    data = _data()
    with torch.inference_mode():
        eq = se.equalize(Small().train(), (data[0],), data, progress=False)
        se.calibrate(eq, data, progress=False)
    assert not any(b.is_inference() for b in eq.buffers())
    eq(data[0]).square().mean().backward()  # the first training step


def test_data_the_model_cannot_take_names_the_batch_and_the_fix():
    data = _data()
    with pytest.raises(se.CalibrationError, match=r"calibration batch 1 did not run through Small \(its inputs: "
                                                  r"\(2, 4, 32, 32\) float32\).*the input first"):
        se.equalize(Small(), (data[0],), [data[0], torch.randn(2, 4, 32, 32)], progress=False)
    with pytest.raises(se.CalibrationError, match=r"batch 0 .*\(2, 32, 32\) int64"):
        se.equalize(Small(), (data[0],), [(torch.zeros(2, 32, 32, dtype=torch.long), data[0])], progress=False)


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "2"])
def test_max_batches_must_be_a_positive_whole_number(bad):
    with pytest.raises(se.UsageError, match="max_batches"):
        se.equalize(Small(), (_data()[0],), _data(), max_batches=bad, progress=False)


def test_equalize_without_example_inputs_leaves_the_user_s_random_stream_alone():
    model = Small()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="no example_inputs"):
        se.equalize(model, progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("wrap", [torch.nn.DataParallel, lambda m: torch.compile(m, backend="eager")])
def test_calibrate_describe_fold_and_equalizers_look_through_the_wrappers_users_train_with(wrap):
    data = _data()
    eq = se.equalize(Small(), (data[0],), data, progress=False)
    wrapped = wrap(eq)
    wrapped(data[0])
    se.calibrate(wrapped, _data(seed=1), progress=False)
    assert se.equalizers(wrapped) == se.equalizers(eq) and len(se.equalizers(eq)) == 2
    assert "2 equalizer(s) in Small" in se.describe(wrapped)
    assert type(se.fold(wrapped)).__name__ == "Small"
    with torch.no_grad():
        torch.testing.assert_close(wrapped(data[0]), eq(data[0]))


def test_calibrating_while_another_thread_serves_the_model():
    import threading

    torch.manual_seed(0)
    data, served = _data(), torch.randn(2, 3, 32, 32) * 3 + 1  # served inputs on another scale than the data
    eq = se.equalize(Small(), (data[0],), data, progress=False).eval()
    with torch.no_grad():
        old = eq(served)
    reference = se.calibrate(copy.deepcopy(eq), _data(seed=1), progress=False)
    outputs, stop = [], threading.Event()

    def serve():
        with torch.no_grad():
            while not stop.is_set():
                outputs.append(eq(served))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        se.calibrate(eq, _data(seed=1), progress=False)
    finally:
        stop.set()
        thread.join()
    # the served inputs stayed out of the statistics
    assert all(torch.equal(a, b) for pair in zip(_statistics(eq), _statistics(reference)) for a, b in zip(*pair))
    with torch.no_grad():
        new = eq(served)
    mixed = [out for out in outputs if not (torch.equal(out, old) or torch.equal(out, new))]
    assert outputs and len(mixed) <= 1  # (at most a forward at the instant the statistics go in)


def test_a_calibration_level_stops_each_forward_after_its_last_site_with_the_statistics_of_a_whole_one():
    # The level's pass ends a batch's forward once every site of the level has seen it: the fuse conv after the
    # sites never runs in it, and the statistics are those of the whole upsampled branches.
    from se_surgery.calibrate import calibrate_level

    torch.manual_seed(0)
    model, data = Small().eval(), _data()
    eq = se.equalize(model, (data[0],), data, progress=False, norm="running")
    for equalizer in se.equalizers(eq):
        equalizer.reset()
    fused = []
    handle = eq.head.fuse.register_forward_hook(lambda *_: fused.append(1))
    calibrate_level(eq, se.equalizers(eq), data, progress=False, norm="running")
    assert not fused
    for equalizer, (branch, _) in zip(se.equalizers(eq), _branches(model, data)):
        torch.testing.assert_close(equalizer.mean, branch.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(equalizer.std, branch.std(correction=0), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        eq(data[0])  # (the model runs whole afterwards: nothing left behind by the stopped forwards)
    handle.remove()
    assert len(fused) == 1 and torch._C._len_torch_function_stack() == 0
