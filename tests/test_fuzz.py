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
