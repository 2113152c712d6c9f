"""Random decoders (1-D/2-D/3-D, loops, helper methods, shared projections, every fusion kind), with
ground truth from the generator: sites as generated, fold exact, ONNX export and fold confirmed by onnxruntime."""

import random

import pytest
from fuzz import check, source


@pytest.mark.slow
@pytest.mark.parametrize("index", range(10))
def test_random_decoder(tmp_path, index):
    rng = random.Random(1000 + index)
    code, kind = source(rng)
    check(code, kind, tmp_path, f"decoder_{index}")


# --------------------------------------------------------------------------------------------------------------
# Bad arguments and bad calibration data, tried at random: every failure is an SeSurgeryError, and the model given
# with inplace=True is left as it was (no equalizer, no hook, the same weights and running statistics).

import itertools  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import se_surgery as se  # noqa: E402


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.pa, self.pb, self.bn, self.fuse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1), \
            nn.BatchNorm2d(4), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        u = F.interpolate(torch.relu(self.bn(self.pb(x))), scale_factor=2, mode="bilinear")
        return self.fuse(torch.cat([self.pa(x), u], 1))


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 5, shape, dtype=dtype)


BAD_DATA = {
    "float64": lambda: [_x(2, 3, 16, 16, dtype=torch.float64)],
    "uint8": lambda: [_x(2, 3, 16, 16, dtype=torch.uint8)],
    "4 channels": lambda: [_x(2, 4, 16, 16)],
    "label first": lambda: [(_x(2, 16, 16, dtype=torch.int64), _x(2, 3, 16, 16))],
    "3-D": lambda: [_x(3, 16, 16)],
    "odd size": lambda: [_x(2, 3, 15, 15)],
    "empty": lambda: [],
    "NaN": lambda: [torch.full((2, 3, 16, 16), float("nan"))],
    "batch of one": lambda: [_x(1, 3, 16, 16)],
    "strings": lambda: ["image.png"],
    "None": lambda: [None],
    "a tensor, not batches": lambda: _x(2, 3, 16, 16),
    "a dict of the wrong key": lambda: [{"pixels": _x(2, 3, 16, 16)}],
    "a generator of one good batch and a bad one": lambda: (b for b in [_x(2, 3, 16, 16), _x(2, 5, 16, 16)]),
}
BAD_OPTIONS = {
    "max_batches": [-1, 0, 2.5, "3", True], "norm": ["bogus", 1], "scale": ["bogus", None], "branches": ["some"],
    "where": ["everything", 3, se.Where(include="nothing.*"), "measured"], "per_channel": [None],
    "input_fn": [lambda b: b[0], lambda b: 1 / 0, lambda b: "x"],
}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bad_arguments_and_data_fail_with_se_surgery_errors_and_leave_the_model_as_it_was():
    rng = random.Random(37)
    good = [_x(2, 3, 16, 16) for _ in range(3)]
    cases = [({}, name, make) for name, make in BAD_DATA.items()]
    cases += [({option: value}, "good", lambda: list(good)) for option, values in BAD_OPTIONS.items()
              for value in values]
    cases += [({option: rng.choice(BAD_OPTIONS[option])}, name, BAD_DATA[name])
              for option, name in itertools.islice(((rng.choice(list(BAD_OPTIONS)), rng.choice(list(BAD_DATA)))
                                                    for _ in itertools.count()), 40)]
    outcomes = Counter()
    for options, name, make in cases:
        torch.manual_seed(0)
        model = Toy().train()
        before, hooks = _state(model), (len(model._forward_pre_hooks), len(model._load_state_dict_pre_hooks))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                se.equalize(model, (good[0],), make(), inplace=True, progress=False, **options)
            outcomes["worked"] += 1
        except se.SeSurgeryError as error:
            outcomes[type(error).__name__] += 1
            assert not hasattr(model, "scale_equalizers"), (options, name)
            assert (len(model._forward_pre_hooks), len(model._load_state_dict_pre_hooks)) == hooks, (options, name)
            after = model.state_dict()
            assert all(torch.equal(v, after[k]) for k, v in before.items()), (options, name)
        except Exception as error:  # a raw error is the failure this test exists to catch
            raise AssertionError(f"{options} with data {name!r}: raw {type(error).__name__}: {error}") from error
    assert outcomes["worked"] < len(cases) / 3  # (the bad inputs mostly are bad)
    print(dict(outcomes), f"{len(cases)} cases")
