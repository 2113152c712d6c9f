"""Find: the graph pass that locates every bilinear upsampling feeding a multi-level fusion.

The rule (README "Which upsamplings are sites" gives the reasons):

* a *site* is a bilinear resize (``aten.upsample_bilinear2d``, from ``F.interpolate``/``nn.Upsample``/
  ``nn.UpsamplingBilinear2d``/``F.upsample``) that enlarges a data-dependent feature map, and whose output reaches
  a *fusion* through ops that are linear in it;
* a fusion is a concatenation (``cat``, ``stack``) or an addition/subtraction of two data-dependent tensors;
* linear ops carry the branch on: conv/linear (in their input), shape and copy ops, dropout, scalar or elementwise
  scaling, other resizes and average pooling. Anything else (activations, normalization layers, which rescale
  their input anyway) ends the branch;
* nearest upsampling is never a site (it keeps the variance); a resize that only reaches the output (final logits)
  is not a site.

Each site is keyed the way the runtime hooks see it: the innermost module whose forward made the call, which call
of that module it was, and the index of the resize (or fusion) among those that module's forward made.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.fx import Node

aten = torch.ops.aten

RESIZE_OPS = {aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default, aten._upsample_bilinear2d_aa.vec,
              aten._upsample_bilinear2d_aa.default}
FUSION_OPS = {aten.cat.default: "cat", aten.stack.default: "stack", aten.add.Tensor: "add", aten.add_.Tensor: "add"}
_ADDITIVE = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor}
# Ops through which a branch stays linear in the upsampled input (argument 0 unless it is a product).
_LINEAR = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv_transpose2d.input, aten.linear.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default, aten.transpose.int,
    aten.contiguous.default, aten.clone.default, aten.flatten.using_ints, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.default, aten.expand.default, aten.expand_as.default, aten.slice.Tensor, aten.select.int,
    aten.dropout.default, aten.feature_dropout.default, aten.dropout_.default, aten.feature_dropout_.default,
    aten.alias.default, aten._to_copy.default, aten.to.dtype, aten.type_as.default, aten.pad.default,
    aten.constant_pad_nd.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.neg.default,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.matmul.default, aten.bmm.default,
    aten.mm.default, aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
}
_PARAMETRIZED = {aten.conv2d.default, aten.linear.default}
_CHANNEL_KEEPING = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.dropout.default,
                    aten.feature_dropout.default, aten.dropout_.default, aten.feature_dropout_.default}


@dataclass(frozen=True)
class Consumer:
    """The first conv/linear a site's branch meets: where its scale (and maybe shift) can be absorbed."""

    weight: str                 # state_dict key of the consumer's weight
    bias: str | None            # state_dict key of its bias, if any
    batchnorm_mean: str | None  # running_mean of a BatchNorm right after it (absorbs a shift when there is no bias)
    channels: tuple[int, int]   # the slice of the consumer's input channels this branch feeds
    zero_padded: bool           # zero padding makes the shift inexact at the borders
    path: str                   # the ops between the site and the consumer, for messages


@dataclass(frozen=True)
class Site:
    """One place that gets a ScaleEqualizer."""

    owner: str                  # path of the innermost module whose forward makes the call ("" = the model)
    call: int                   # which call of that module in one forward (shared modules are called twice)
    index: int                  # which bilinear resize (kind "upsample") or fusion op (kind "branch") of that call
    kind: str                   # "upsample" (the paper's placement) or "branch" (another input of the fusion)
    arg: int                    # for "branch": which input of the fusion op
    fusion: str                 # "cat", "stack" or "add"
    shape: tuple[int, ...]      # the equalized tensor's shape on the example inputs
    in_size: tuple[int, int] | None   # for "upsample": the spatial size before the resize
    align_corners: bool | None
    level: int                  # 0 unless other sites lie upstream; calibration goes level by level
    consumer: Consumer | None
    source: str                 # file:line of the call, from the graph's stack trace
    upstream: frozenset[str] = field(default_factory=frozenset)
    joins: str = ""             # the fusion this branch enters first, as ``owner.callN_fusionK`` (for reports)

    @property
    def key(self) -> str:
        """Which of its owner module's calls this is, e.g. ``call0_resize2``."""
        if self.kind == "upsample":
            return f"call{self.call}_resize{self.index}"
        return f"call{self.call}_fusion{self.index}_input{self.arg}"

    @property
    def name(self) -> str:
        """Owner path and key, e.g. ``decoder.psp.call0_resize2``; ``model`` when the model's own forward calls."""
        return f"{self.owner or 'model'}.{self.key}"

    @property
    def module_name(self) -> str:
        """The equalizer's key in ``model.scale_equalizers`` (ModuleDict keys cannot hold dots)."""
        return self.name.replace(".", "_")

    @property
    def factor(self) -> float | None:
        if self.in_size is None:
            return None
        return self.shape[-1] / self.in_size[-1]


def _owner(node: Node) -> tuple[str, str, int]:
    """(stack key, module path, call number) of the innermost module that made this op."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", "", 0
    key, (path, _) = list(stack.items())[-1]
    call = int(key.rsplit("@", 1)[1]) if "@" in key else 0
    return key, path, call


def _stack_keys(node: Node) -> set[str]:
    return set((node.meta.get("nn_module_stack") or {}).keys()) or {""}


def _source(node: Node) -> str:
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [line.strip() for line in trace if line.strip().startswith("File ")]
    if not frames:
        return ""
    last = frames[-1]  # 'File "/x/y.py", line 12, in forward'
    try:
        path = last.split('"')[1]
        line = last.split("line ")[1].split(",")[0]
        return f"{path.rsplit('/', 1)[-1]}:{line}"
    except IndexError:
        return last


def _spatial(node: Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()


def _data_dependent(graph: torch.fx.Graph, user_inputs: set[str]) -> set[Node]:
    """Nodes computed from the model's inputs (not from weights or constants alone)."""
    live: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                live.add(node)
        elif any(a in live for a in node.all_input_nodes):
            live.add(node)
    return live


def _fusion_kind(node: Node, live: set[Node]) -> str | None:
    if node.op != "call_function":
        return None
    if node.target in (aten.cat.default, aten.stack.default):
        tensors = [t for t in node.args[0] if isinstance(t, Node) and t in live]
        return FUSION_OPS[node.target] if len(tensors) >= 2 else None
    if node.target in _ADDITIVE:
        a, b = node.args[0], node.args[1]
        if isinstance(a, Node) and isinstance(b, Node) and a in live and b in live:
            return "add"
    return None


def _linear_users(node: Node, live: set[Node]) -> list[Node]:
    """Users through which ``node``'s branch stays linear (only as the data input of a conv/linear)."""
    out = []
    for user in node.users:
        if user.op != "call_function":
            continue
        if user.target in _LINEAR or user.target is operator.getitem:
            if user.target in _PARAMETRIZED or user.target in (aten.conv1d.default, aten.conv3d.default,
                                                                aten.conv_transpose2d.input):
                if user.args[0] is not node:
                    continue
            out.append(user)
        elif user.target in _ADDITIVE and _fusion_kind(user, live) is None:
            out.append(user)  # adding a constant (a bias, an equalizer's mean) keeps the branch linear
    return out


def _fusions_reached(start: Node, live: set[Node]) -> list[tuple[Node, Node]]:
    """(fusion node, its input on this branch) for every fusion reached from ``start`` through linear ops."""
    found, seen, todo = [], set(), [start]
    while todo:
        node = todo.pop()
        for user in node.users:
            if _fusion_kind(user, live) is not None and (user, node) not in seen:
                seen.add((user, node))
                found.append((user, node))
        for user in _linear_users(node, live):
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return found


def _consumer(site: Node, sig: torch.export.ExportGraphSignature, fusion: Node | None = None) -> Consumer | None:
    """The conv/linear that receives this branch through a concatenation or directly (exactly compensable).

    ``fusion``: the branch is equalized only as an input of this op (kind "branch"), so its other users don't count.
    """
    params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    node, path, offset = site, [], 0
    channels = _spatial(site)[1] if len(_spatial(site)) > 1 else 0
    while True:
        if fusion is not None:
            user, fusion = fusion, None
        elif len(node.users) != 1:
            return None
        else:
            (user,) = node.users
        if user.op != "call_function":
            return None
        if user.target in _CHANNEL_KEEPING:
            node = user
            path.append(str(user.target).split(".")[1])
            continue
        if user.target == aten.cat.default:
            dim = user.args[1] if len(user.args) > 1 else 0
            if dim not in (1, -3) or offset:
                return None
            for other in user.args[0]:
                if other is node:
                    break
                offset += _spatial(other)[1]
            node = user
            path.append("cat")
            continue
        if user.target == aten.conv2d.default and user.args[0] is node:
            args = list(user.args) + [None] * (7 - len(user.args))
            weight, bias, padding, groups = args[1], args[2], args[4], args[6]
            if (groups or 1) != 1:
                return None
            padding = padding if padding is not None else 0
            kernel = _spatial(weight)[2:]
            if padding == "same":
                padded = any(k > 1 for k in kernel)
            elif padding == "valid":
                padded = False
            else:
                padded = any(int(p) > 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
            bn = None
            if len(user.users) == 1:
                (after,) = user.users
                if after.target == aten.batch_norm.default and after.args[0] is user and after.args[3] is not None:
                    bn = params.get(after.args[3].name)
            path.append("conv2d")
            return Consumer(params[weight.name], params.get(bias.name) if bias is not None else None, bn,
                            (offset, offset + channels), padded, " -> ".join(path))
        return None


def _ancestors(node: Node) -> set[Node]:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def find_sites(program: torch.export.ExportedProgram, branches: str = "upsampled") -> list[Site]:
    """Every site in an exported program, in graph order. ``branches="all"`` adds the other fusion inputs."""
    if branches not in ("upsampled", "all"):
        raise ValueError(f"branches must be 'upsampled' (the paper's placement) or 'all', got {branches!r}")
    graph = program.graph
    sig = program.graph_signature
    live = _data_dependent(graph, set(sig.user_inputs))

    # Number resizes and fusion ops per module call, as the runtime hooks will count them (descendants included).
    resize_no: dict[tuple[Node, str], int] = {}
    fusion_no: dict[tuple[Node, str], int] = {}
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        kind = "resize" if node.target in RESIZE_OPS else "fusion" if node.target in FUSION_OPS else None
        if kind is None:
            continue
        for stack_key in _stack_keys(node):
            number = counts[(kind, stack_key)]
            counts[(kind, stack_key)] += 1
            (resize_no if kind == "resize" else fusion_no)[(node, stack_key)] = number

    def fusion_name(fusion: Node) -> str:
        key, path, call = _owner(fusion)
        return f"{path or 'model'}.call{call}_fusion{fusion_no[(fusion, key)]}"

    found: list[tuple[Node, dict]] = []
    fusions: dict[Node, set[Node]] = defaultdict(set)  # fusion -> its inputs that carry an upsampled branch
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in RESIZE_OPS or node.args[0] not in live:
            continue
        src, out = _spatial(node.args[0]), _spatial(node)
        if len(out) != 4 or out[2] * out[3] <= src[2] * src[3]:
            continue  # not an enlargement: a same-size or shrinking resize is not an upsampling
        reached = _fusions_reached(node, live)
        if not reached:
            continue
        for fusion, branch in reached:
            fusions[fusion].add(branch)
        key, path, call = _owner(node)
        align = node.args[2] if len(node.args) > 2 else None
        found.append((node, dict(owner=path, call=call, index=resize_no[(node, key)], kind="upsample", arg=0,
                                 fusion=_fusion_kind(reached[0][0], live), shape=out, in_size=tuple(src[2:]),
                                 align_corners=align, consumer=_consumer(node, sig), source=_source(node),
                                 joins=fusion_name(reached[0][0]))))
    if branches == "all":
        for fusion, carried in fusions.items():
            inputs = list(fusion.args[0]) if fusion.target in (aten.cat.default, aten.stack.default) \
                else list(fusion.args[:2])
            key, path, call = _owner(fusion)
            for arg, other in enumerate(inputs):
                if not isinstance(other, Node) or other in carried or other not in live:
                    continue
                found.append((other, dict(owner=path, call=call, index=fusion_no[(fusion, key)], kind="branch",
                                          arg=arg, fusion=FUSION_OPS[fusion.target], shape=_spatial(other),
                                          in_size=None, align_corners=None, consumer=_consumer(other, sig, fusion),
                                          source=_source(fusion), joins=fusion_name(fusion))))

    # A site whose input depends on another site is calibrated after it (FPN top-down paths chain them).
    order = {node: i for i, node in enumerate(graph.nodes)}
    found.sort(key=lambda item: order[item[0]])
    names = {node: Site(level=0, **info).name for node, info in found}
    sites, levels = [], {}
    for node, info in found:
        before = _ancestors(node)
        upstream = [other for other, _ in found if other in before and other is not node]
        levels[node] = 1 + max((levels[o] for o in upstream), default=-1)
        sites.append(Site(level=levels[node], upstream=frozenset(names[o] for o in upstream), **info))
    return sites
