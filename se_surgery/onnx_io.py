"""ONNX files: read a model with its external data (from its own folder only: the file is untrusted) and write a
self-contained one atomically, never over an input file."""

from __future__ import annotations

import os
import tempfile

import onnx_ir as ir

from .errors import OnnxError
from .files import atomic_write


def load(path: str | os.PathLike) -> tuple[ir.Model, list[str]]:
    """The model with all its weights in memory (external data resolved beside the file), and the files it was
    read from; nothing reads those files afterwards."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OnnxError(f"{path}: no such file.")
    try:
        model = ir.load(path)
    except Exception as error:
        raise OnnxError(f"{path} is not a readable ONNX model ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}).") from error
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    files = {os.path.abspath(path)}
    for value in _constants(model):
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        # Untrusted: read external data only from the model's own folder, by resolved real path.
        location = str(tensor.location)
        real = os.path.realpath(os.path.join(folder, location))
        if os.path.isabs(location) or os.path.commonpath([folder, real]) != folder:
            raise OnnxError(f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the model's "
                            f"folder ({folder}); se_surgery reads external data only from the model's own folder. "
                            f"Nothing was read or written.")
        files.add(real)
    try:
        ir.external_data.load_to_model(model)
    except Exception as error:
        raise OnnxError(f"{path} is not a readable ONNX model with its data ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}).") from error
    return model, sorted(files)



def _constants(model: ir.Model):
    yield from model.graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if isinstance(attr.value, ir.TensorProtocol):
                yield ir.Value(const_value=attr.value)


INLINE_LIMIT = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph itself


def write(model: ir.Model, destination: str | os.PathLike, inputs: list[str]) -> None:
    """Write a self-contained model: weights inline below 2 GB, else in one ``<destination>.data`` beside it;
    checked by ``onnx.checker``; written under temporary names and renamed, never over one of ``inputs``."""
    import onnx

    destination = os.path.abspath(os.fspath(destination))
    data = destination + ".data"
    for path in (destination, data):
        if any(path == f or (os.path.exists(path) and os.path.samefile(path, f)) for f in inputs):
            raise OnnxError(f"refusing to write {path}: it is one of the input's files ({', '.join(inputs)}). "
                            f"Give another output path.")
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    folder = os.path.dirname(destination)
    os.makedirs(folder, exist_ok=True)
    if size < INLINE_LIMIT:
        def save(tmp: str) -> None:
            ir.save(model, tmp)
            onnx.checker.check_model(tmp, full_check=True)

        atomic_write(destination, save)
        return
    with tempfile.TemporaryDirectory(dir=folder, prefix=".se_surgery.") as tmp:
        staged = os.path.join(tmp, os.path.basename(destination))
        ir.save(model, staged, external_data=os.path.basename(data))
        onnx.checker.check_model(staged, full_check=True)
        os.replace(os.path.join(tmp, os.path.basename(data)), data)
        os.replace(staged, destination)
