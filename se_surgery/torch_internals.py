"""Every private torch name se_surgery uses, behind one door. Each is an assumption about the installed torch;
``tests/test_torch_internals.py`` checks every one of them against it, so a torch upgrade that breaks one fails a
test, not a user. Nothing here falls back silently: a name that is gone raises at import.

What and why:

- the torch function mode stack (``torch._C``): an owner's mode is taken off the stack while a module it calls
  runs, and put back after (``dispatch._pause``);
- ``nn.Module._call_impl``'s code object: the frame of a module call, by which an owner's own calls are known;
- ``torch._dynamo``: the name prefix of the functions torch.compile resumes a ``forward`` in after a graph break,
  ``assume_constant_result`` (a source key is a constant of the traced code), ``TracingContext.extract_stack`` (the
  frames being traced), ``OptimizedModule`` and its original module;
- ``torch.fx``'s flag for symbolic tracing (which calls forwards without hooks);
- torch.export's node metadata (``nn_module_stack``: module path and call number per op; ``stack_trace``) and
  ``HigherOrderOperator`` (``no_grad``/autocast regions exported as subgraphs);
- ``torch._C._nn``'s resize functions (``F.interpolate`` calls them; a model may too);
- the extra-state key suffix of ``state_dict`` (the recipe rides there);
- the module files whose frames are torch's own wrappers, not the user's code;
- the ONNX exporter's stack-trace metadata key;
- ``torch.utils._pytree`` (leaves of nested outputs, and their paths);
- ``nn``'s base classes of convolutions and of norm layers with running statistics;
- ``nn.Module``'s hook dictionaries (which hooks are se_surgery's, removing them, the load pre-hooks).
"""

from __future__ import annotations

import torch
import torch._C._nn
import torch._dynamo
import torch.fx._symbolic_trace
import torch.nn.modules.module
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch._guards import TracingContext
from torch._ops import HigherOrderOperator
from torch.utils._pytree import GetAttrKey, MappingKey, SequenceKey, tree_flatten_with_path, tree_leaves, tree_map

__all__ = [
    "CALL_IMPL", "COMPILED_PREFIX", "CONV_BASE", "EXTRA_STATE_SUFFIX", "GetAttrKey", "HigherOrderOperator",
    "MODULE_STACK", "MappingKey", "ONNX_STACK_TRACE", "OptimizedModule", "RESIZE_FUNCTIONS", "RESUME_PREFIX",
    "RUNNING_NORM_BASES", "STACK_TRACE", "SequenceKey", "assume_constant_result", "compiled_original",
    "forward_hooks", "function_mode_at", "function_modes", "function_stack_depth", "is_fx_tracing",
    "load_pre_hooks", "pop_function_mode", "push_function_mode", "remove_forward_hook", "torch_wrapper_files",
    "traced_frames", "tree_flatten_with_path", "tree_leaves", "tree_map",
]

# The code object every module call runs (``module(x)`` -> ``_call_impl``): a frame of it is a module call.
CALL_IMPL = nn.Module._call_impl.__code__
# torch.compile names the rest of a function after a graph break ``torch_dynamo_resume_in_<name>_at_<line>``.
RESUME_PREFIX = "torch_dynamo_resume_in_"
# torch.export node metadata: per op, the module stack ``{key: (path, type)}`` (keys end in ``@N`` for the N-th
# call of a module called again) and the formatted stack trace of the user's code.
MODULE_STACK, STACK_TRACE = "nn_module_stack", "stack_trace"
# torch.onnx's metadata key for the same stack trace, on ONNX nodes.
ONNX_STACK_TRACE = "pkg.torch.onnx.stack_trace"
EXTRA_STATE_SUFFIX = torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
# Base classes: every convolution, and the norm layers that keep running statistics.
CONV_BASE = nn.modules.conv._ConvNd
RUNNING_NORM_BASES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# The key prefix a torch.compile wrapper's state_dict puts before its module's keys.
COMPILED_PREFIX = "_orig_mod."
assume_constant_result = torch._dynamo.assume_constant_result
# The resize functions F.interpolate dispatches to, with their modes.
RESIZE_FUNCTIONS = {torch._C._nn.upsample_linear1d: "linear", torch._C._nn.upsample_bilinear2d: "bilinear",
                    torch._C._nn.upsample_bicubic2d: "bicubic", torch._C._nn.upsample_trilinear3d: "trilinear",
                    torch._C._nn._upsample_bilinear2d_aa: "bilinear", torch._C._nn._upsample_bicubic2d_aa: "bicubic"}


# This thread's torch function mode stack: its depth, the mode at a position, take the top off, put one on top
# (without entering it again). C functions, aliased: no Python call on the per-call path.
function_stack_depth = torch._C._len_torch_function_stack
function_mode_at = torch._C._get_function_stack_at
pop_function_mode = torch._C._pop_torch_function_stack
push_function_mode = torch._C._push_on_torch_function_stack


def function_modes() -> list:
    """This thread's torch function mode stack, bottom first."""
    return [function_mode_at(i) for i in range(function_stack_depth())]


def traced_frames() -> list:
    """The user frames torch.compile is tracing (``FrameSummary``: filename, lineno, name); empty eagerly."""
    return list(TracingContext.extract_stack())


def is_fx_tracing() -> bool:
    """Whether torch.fx's symbolic tracer is running (it calls forwards without their hooks)."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def compiled_original(module: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper compiles, or None for any other module."""
    return module._orig_mod if isinstance(module, OptimizedModule) else None


def torch_wrapper_files() -> set[str]:
    """The files of torch's function wrappers (``F.interpolate``, ``__torch_function__`` dispatch, ``Tensor``
    operators): their frames are never the user's code."""
    import torch.nn.functional

    return {torch.nn.functional.__file__, torch.overrides.__file__, torch._tensor.__file__, torch.functional.__file__}


def forward_hooks(module: nn.Module) -> tuple[dict, dict]:
    """The module's forward pre-hooks and forward hooks, by handle id."""
    return module._forward_pre_hooks, module._forward_hooks


def remove_forward_hook(module: nn.Module, key: int) -> None:
    """Remove the forward (pre-)hook with handle id ``key``."""
    for hooks in forward_hooks(module):
        hooks.pop(key, None)
    module._forward_hooks_always_called.pop(key, None)


def load_pre_hooks(module: nn.Module) -> dict:
    """The module's ``load_state_dict`` pre-hooks by handle id (each wrapped: the function is ``.hook``)."""
    return module._load_state_dict_pre_hooks
