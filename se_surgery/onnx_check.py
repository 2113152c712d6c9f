"""onnxruntime checks: sessions over in-memory graphs, random feeds for symbolic dims, and the error measure every
ONNX result is judged by."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def session(model: ir.Model):
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def random_feeds(model: ir.Model, sizes: tuple[int, ...], seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs for checks: symbolic batch -> 1, other symbolic dims -> each of ``sizes``."""
    rng = np.random.default_rng(seed)
    feeds = []
    for size in sizes:
        feed = {}
        for value in model.graph.inputs:
            dims = [d if isinstance(d, int) else (1 if i == 0 else size) for i, d in enumerate(value.shape)]
            feed[value.name] = rng.standard_normal(dims).astype((value.dtype or ir.DataType.FLOAT).numpy())
        feeds.append(feed)
    return feeds


def relative_error(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """Max abs difference relative to the expected output's max abs, over all outputs."""
    return max(float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-12)) for g, e in zip(got, expected))
