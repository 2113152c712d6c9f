"""Every private torch name se_surgery uses is in se_surgery/torch_internals.py, and every assumption it makes about
them holds for the installed torch: a torch upgrade that breaks one fails here, not in a user's model."""

import ast
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import se_surgery.torch_internals as ti

PACKAGE = Path(ti.__file__).parent


def test_no_other_module_of_the_package_names_a_private_torch_attribute():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "torch_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id in ("torch", "nn", "F"):
                    offenders.append(f"{path.name}:{node.lineno} {inner.id}.{'.'.join(reversed(chain))}")
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}:{node.lineno} import {m}" for m in modules
                          if m.startswith("torch") and any(part.startswith("_") for part in m.split("."))]
    assert offenders == []


class _Mark(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_the_function_mode_stack_pops_and_pushes_without_entering_again():
    before = len(ti.function_modes())
    with _Mark() as mode:
        assert ti.function_modes()[-1] is mode and len(ti.function_modes()) == before + 1
        assert ti.pop_function_mode() is mode and len(ti.function_modes()) == before
        ti.push_function_mode(mode)
        assert ti.function_modes()[-1] is mode
    assert len(ti.function_modes()) == before


def test_a_module_call_runs_in_a_frame_of_call_impl_and_the_wrapper_files_are_torch_s():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code is not ti.CALL_IMPL:
                frame = frame.f_back
            seen["call"] = frame is not None
            return F.interpolate(x, scale_factor=2, mode="bilinear")

    Probe()(torch.randn(1, 1, 2, 2))
    assert seen["call"]
    files = ti.torch_wrapper_files()
    assert F.__file__ in files and all(Path(f).exists() for f in files)


def test_f_interpolate_reaches_a_function_mode_as_the_resize_functions():
    met = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            met.append(func)
            return func(*args, **(kwargs or {}))

    with Watch():
        F.interpolate(torch.randn(1, 1, 4, 4), scale_factor=2, mode="bilinear")
        F.interpolate(torch.randn(1, 1, 4), scale_factor=2, mode="linear")
    assert F.interpolate in met
    assert set(ti.RESIZE_FUNCTIONS.values()) == {"linear", "bilinear", "bicubic", "trilinear"}
    assert all(callable(f) for f in ti.RESIZE_FUNCTIONS)


def test_torch_export_records_module_stacks_with_call_numbers_and_stack_traces():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    program = torch.export.export(Twice(), (torch.randn(1, 1, 4, 4),), strict=False)
    convs = [n for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    stacks = [n.meta[ti.MODULE_STACK] for n in convs]
    keys = [list(s)[-1] for s in stacks]
    assert [list(s.values())[-1][0] for s in stacks] == ["conv", "conv"]
    assert keys[1].endswith("@1") and not keys[0].endswith("@1")  # the second call is numbered
    assert all("in forward" in n.meta[ti.STACK_TRACE] for n in convs)


def test_no_grad_regions_export_as_higher_order_operators():
    class Region(nn.Module):
        def forward(self, x):
            with torch.no_grad():
                y = x * 2
            return y + x

    program = torch.export.export(Region(), (torch.randn(2),), strict=False)
    assert any(isinstance(n.target, ti.HigherOrderOperator) for n in program.graph.nodes
               if n.op == "call_function")


def test_torch_compile_wrappers_resume_names_constants_and_traced_frames():
    seen = {}

    @ti.assume_constant_result  # (called while tracing: a constant of the traced code)
    def traced_names() -> str:
        return ",".join(f.name for f in ti.traced_frames())

    class Broken(nn.Module):
        def forward(self, x):
            seen["frames"] = traced_names()
            y = x + 1
            torch._dynamo.graph_break()  # (a graph break on purpose)
            seen["resumed"] = sys._getframe(0).f_code.co_name
            return y * 2

    model = Broken()
    compiled = torch.compile(model, backend="eager")
    compiled(torch.randn(2))
    assert ti.compiled_original(compiled) is model and ti.compiled_original(model) is None
    assert isinstance(compiled, ti.OptimizedModule)
    assert seen["resumed"].startswith(ti.RESUME_PREFIX + "forward")
    assert "forward" in seen["frames"].split(",") and ti.traced_frames() == []  # (eagerly: none)
    assert f"{ti.COMPILED_PREFIX}" in "".join(compiled.state_dict()) or not compiled.state_dict()
    assert callable(ti.assume_constant_result(lambda: 1))


def test_fx_tracing_flag_extra_state_suffix_and_hook_dictionaries():
    flags = []

    class Look(nn.Module):
        def forward(self, x):
            flags.append(ti.is_fx_tracing())
            return x + 1

    torch.fx.symbolic_trace(Look())
    Look()(torch.ones(1))
    assert flags == [True, False]

    class Extra(nn.Module):
        def get_extra_state(self):
            return torch.ones(1)

        def set_extra_state(self, state):
            pass

    assert list(Extra().state_dict()) == [ti.EXTRA_STATE_SUFFIX]
    module = nn.Linear(1, 1)
    handle = module.register_forward_hook(lambda m, a, o: None, always_call=True)
    module.register_forward_pre_hook(lambda m, a: None)
    pre, post = ti.forward_hooks(module)
    assert len(pre) == len(post) == 1
    ti.remove_forward_hook(module, handle.id)
    assert not ti.forward_hooks(module)[1]
    module.register_load_state_dict_pre_hook(lambda *a: None)
    assert len(ti.load_pre_hooks(module)) == 1 and callable(next(iter(ti.load_pre_hooks(module).values())).hook)


def test_pytree_paths_name_keys_attributes_and_positions():
    paths = [p for p, _ in ti.tree_flatten_with_path({"out": [torch.ones(1)]})[0]]
    assert isinstance(paths[0][0], ti.MappingKey) and isinstance(paths[0][1], ti.SequenceKey)
    assert ti.tree_leaves({"a": (torch.ones(1), 2)})[1] == 2
    assert ti.tree_map(lambda v: v, [1]) == [1] and ti.GetAttrKey("x").name == "x"
