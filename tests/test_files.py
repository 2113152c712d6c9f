"""Files from users are untrusted. ONNX external data is read from the model's own folder only, and a
checkpoint's recipe is checked against its schema before anything is built from it."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from decoders import Small
from onnx import TensorProto, helper, numpy_helper

import se_surgery as se
from se_surgery.state import RECIPE_KEY, encode

SECRET = b"top secret bytes"


def _model_with_external(folder, location):
    """models/model.onnx: Y = X + W, with W's 4 floats read from ``location``."""
    weight = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    return folder / "model.onnx"


def _leaks(tmp_path):
    (tmp_path / "secret.bin").write_bytes(SECRET)
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(tmp_path / "secret.bin", models / "link.bin")
    return {"parent": "../secret.bin", "absolute": str(tmp_path / "secret.bin"), "symlink": "link.bin",
            "dotted": "sub/../../secret.bin"}


@pytest.mark.parametrize("written", ["bare", "relative", "absolute"])
@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "dotted"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, monkeypatch, kind, written):
    location = _leaks(tmp_path)[kind]
    path = _model_with_external(tmp_path / "models", location)
    given = {"bare": "model.onnx", "relative": "models/model.onnx", "absolute": str(path)}[written]
    monkeypatch.chdir(tmp_path / "models" if written == "bare" else tmp_path)
    with pytest.raises(se.OnnxError, match=r"tensor 'w' keeps its data at .* outside the model's folder"):
        se.fold_onnx(given, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_the_command_line_refuses_too(tmp_path):
    _model_with_external(tmp_path / "models", _leaks(tmp_path)["parent"])
    done = subprocess.run([sys.executable, "-m", "se_surgery.cli", "fold", "model.onnx", "-o", "out.onnx"],
                          cwd=tmp_path / "models", capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "outside the model's folder" in done.stderr
    assert not (tmp_path / "models" / "out.onnx").exists() and SECRET.decode() not in done.stdout + done.stderr


def test_external_data_inside_the_folder_still_loads(tmp_path):
    path = _model_with_external(tmp_path / "models", "data/w.bin")
    (tmp_path / "models" / "data").mkdir()
    (tmp_path / "models" / "data" / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    report = se.fold_onnx(path, tmp_path / "out.onnx")
    assert report.folds == []
    loaded = onnx.load(tmp_path / "out.onnx")
    assert numpy_helper.to_array(loaded.graph.initializer[0]).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# Recipes


def _equalized():
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    return se.equalize(Small().eval(), (data[0],), data, progress=False)


def _mutations(recipe: dict, raw: bytes):
    """(label, payload) pairs: recipes with wrong types, keys, sizes, nesting and encodings."""
    wrong = [None, True, 3, -1, 1.5, "x", [], {}, [1, "a"], {"a": 1}, "\u0000" * 3]
    for key in sorted(recipe):
        for value in wrong:
            if value == recipe[key] or (key == "output_change" and (value is None or type(value) in (int, float))
                                        and not isinstance(value, bool)):
                continue
            yield f"{key}={value!r}", {**recipe, key: value}
        yield f"no {key}", {k: v for k, v in recipe.items() if k != key}
    for key in ("__class__", "forward", "site", "observer", "training"):
        yield f"top-level {key}", {**recipe, key: "x"}
        name = next(iter(recipe["equalizers"]))
        yield f"equalizer field {key}", {**recipe, "equalizers": {
            **recipe["equalizers"], name: {**recipe["equalizers"][name], key: "x"}}}
    yield "huge shape", {**recipe, "shapes": [[64, 3, 4096, 4096]]}
    yield "zero dim", {**recipe, "shapes": [[1, 3, 0, 32]]}
    yield "many shapes", {**recipe, "shapes": [[1, 3, 8, 8]] * 100, "dtypes": ["float32"] * 100}
    yield "rank 20", {**recipe, "shapes": [[1] * 20]}
    yield "bad dtype", {**recipe, "dtypes": ["object"]}
    yield "site twice", {**recipe, "sites": recipe["sites"] * 2}
    yield "unknown equalizer", {**recipe, "equalizers": {"elsewhere": recipe["equalizers"][
        next(iter(recipe["equalizers"]))]}}
    yield "bad fold", {**recipe, "folds": [{"site": recipe["sites"][0], "action": "explode", "reason": "",
                                            "consumer": ""}]}
    yield "fold elsewhere", {**recipe, "folds": [{"site": "x", "action": "folded", "reason": "", "consumer": ""}]}
    yield "version 99", {**recipe, "version": 99}
    yield "a list", [recipe]
    yield "deep nesting", "[" * 100_000 + "]" * 100_000
    yield "not utf-8", b"\xff\xfe" + raw
    yield "a BOM", b"\xef\xbb\xbf" + raw
    yield "truncated", raw[: len(raw) // 2]
    yield "5 MiB", raw + b" " * (5 << 20)
    rng = random.Random(0)
    for i in range(30):
        damaged = bytearray(raw)
        for _ in range(3):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        yield f"damaged {i}", bytes(damaged)


def _payload(value) -> torch.Tensor:
    if isinstance(value, bytes):
        return torch.frombuffer(bytearray(value), dtype=torch.uint8).clone()
    if isinstance(value, str):
        return torch.frombuffer(bytearray(value.encode()), dtype=torch.uint8).clone()
    return encode(value)


def test_mutated_recipes_are_refused_by_name_and_set_nothing_undeclared():
    eq = _equalized()
    state = eq.state_dict()
    raw = bytes(state[RECIPE_KEY].numpy().tobytes())
    recipe = json.loads(raw)
    cases = list(_mutations(recipe, raw))
    assert len(cases) >= 100
    declared = {name: set(vars(e)) for name, e in eq.scale_equalizers.items()}
    harmless = 0
    for label, value in cases:
        bad = {**state, RECIPE_KEY: _payload(value)}
        for load in (lambda: se.restore(Small(), bad), lambda: eq.load_state_dict(bad)):
            try:
                load()
                harmless += 1  # e.g. damage inside a string that leaves a valid recipe
            except se.UsageError as error:
                assert "recipe" in str(error) or "architecture" in str(error), (label, error)
            except Exception as error:  # noqa: BLE001 - anything else is a failure of the validation
                pytest.fail(f"{label}: {type(error).__name__}: {error}")
        for name, e in eq.scale_equalizers.items():
            assert set(vars(e)) == declared[name], label
            assert type(e).forward is se.ScaleEqualizer.forward and "forward" not in vars(e), label
    assert harmless < len(cases) // 4
    # and the real recipe still loads
    eq.load_state_dict(state)
    back = se.restore(Small(), state)
    assert torch.equal(back.state_dict()["scale_equalizers.head_call0_resize0.mean"],
                       state["scale_equalizers.head_call0_resize0.mean"])


def test_a_recipe_with_a_wrong_kind_of_tensor_is_refused():
    state = _equalized().state_dict()
    for value in (torch.zeros(3, 4, dtype=torch.uint8), torch.zeros(10), "text"):
        with pytest.raises(se.UsageError, match="recipe"):
            se.restore(Small(), {**state, RECIPE_KEY: value})
