"""Find: the graph pass that locates every interpolating upsampling feeding a multi-level fusion.

The rule (README "Which upsamplings are sites" gives the reasons):

* a *site* is a linear-family resize (``linear`` 1-D, ``bilinear``/``bicubic`` 2-D, antialiased or not,
  ``trilinear`` 3-D; from ``F.interpolate``/``nn.Upsample``) that enlarges a data-dependent feature map, and whose
  output reaches a *fusion* through ops that are linear in it;
* a fusion is a concatenation (``cat``, ``stack``) or an addition/subtraction of two data-dependent tensors that do
  not both come from the same upsampled map (``h + f(h)``, a residual, is not a fusion of two levels);
* linear ops carry the branch on: conv/linear (in their input), shape and copy ops, dropout, scaling by a constant
  or a weight, other resizes and average pooling, residual additions. A product with another data-dependent tensor
  (a gate ``f * up(att)``, attention weights) is not linear in the branch. Anything else (activations, normalization
  layers, which rescale their input anyway) ends the branch;
* nearest and area resizes are never sites (they keep the variance, or pool); a resize that only reaches the
  output (final logits) is not a site.

Regions that export as higher-order-op subgraphs (``torch.no_grad()`` blocks, autocast) are inlined first. Each
site records what its call *is* at run time (``Site.call_key``: owner call, op kind, source line, occurrence among
that line's calls), which is how ``dispatch.py`` recognises it at any input size.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch.fx import Graph, GraphModule, Node

from .ops import (
    CHANNEL_KEEPING,
    CONVS,
    FUSION_OPS,
    GATES,
    LINEAR,
    PARAMETRIZED,
    PRODUCTS,
    RESIZE_OPS,
    branch_inputs,
)
from .site import Consumer, Site, source_key_in_trace
from .torch_internals import MODULE_STACK, STACK_TRACE, HigherOrderOperator

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------------------------------
# Graph preparation: inline higher-order-op subgraphs (no_grad / autocast regions) so the pass sees every op.


def _subgraph(node: Node, root: GraphModule) -> tuple[Graph, list] | None:
    """(subgraph, operands) of a higher-order op that runs a submodule on its operands (``wrap_with_*``)."""
    if node.op != "call_function" or not isinstance(node.target, HigherOrderOperator):
        return None
    for i, arg in enumerate(node.args):
        if isinstance(arg, Node) and arg.op == "get_attr":
            sub = getattr(root, arg.target, None)
            if isinstance(sub, GraphModule):
                return sub.graph, list(node.args[i + 1:])
    return None


def _inline(root: GraphModule, graph: Graph, new: Graph, env: dict) -> list:
    """Copy ``graph`` into ``new`` with every ``wrap_with_*`` subgraph inlined; returns the outputs."""
    outputs: list = []
    for node in graph.nodes:
        if node.op == "placeholder" and node in env:
            continue
        if node.op == "output":
            outputs = [env[a] if isinstance(a, Node) else a for a in node.args[0]]
            continue
        inner = _subgraph(node, root)
        if inner is not None:
            sub, operands = inner
            places = [n for n in sub.nodes if n.op == "placeholder"]
            sub_env = {p: env[o] if isinstance(o, Node) else o for p, o in zip(places, operands)}
            env[node] = _inline(root, sub, new, sub_env)
            continue
        if node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]), list):
            env[node] = env[node.args[0]][node.args[1]]
            continue
        env[node] = new.node_copy(node, lambda n: env[n])
    return outputs


def flat_graph(program: torch.export.ExportedProgram) -> Graph:
    """The program's graph with no_grad/autocast subgraphs inlined (node meta kept). Only read, never run."""
    root = program.graph_module
    if not any(_subgraph(n, root) for n in program.graph.nodes):
        return program.graph
    new = Graph()
    _inline(root, program.graph, new, {})
    return new


# ----------------------------------------------------------------------------------------------------------------
# Node facts


def _owner(node: Node) -> tuple[str, str, int]:
    """(stack key, module path, call number) of the innermost module that made this op."""
    stack = node.meta.get(MODULE_STACK) or {}
    if not stack:
        return "", "", 0
    key, (path, _) = list(stack.items())[-1]
    call = int(key.rsplit("@", 1)[1]) if "@" in key else 0
    return key, path, call


def _source_key(node: Node) -> str:
    return source_key_in_trace(node.meta.get(STACK_TRACE) or "")


def _shape(node: Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()


def _data_dependent(graph: Graph, user_inputs: set[str]) -> set[Node]:
    """Nodes computed from the model's inputs (not from weights or constants alone)."""
    live: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                live.add(node)
        elif any(a in live for a in node.all_input_nodes):
            live.add(node)
    return live


def _fusion_inputs(node: Node) -> list:
    return branch_inputs(FUSION_OPS[node.target], node.args, node.kwargs)


def _fusion_kind(node: Node, live: set[Node]) -> str | None:
    if node.op != "call_function" or node.target not in FUSION_OPS:
        return None
    tensors = [t for t in _fusion_inputs(node) if isinstance(t, Node) and t in live]
    return FUSION_OPS[node.target].kind if len(tensors) >= 2 else None


def _fused_as(node: Node) -> str:
    """What a fusion does to its branches: its kind, except that a stack summed over the stacked dimension (smp
    FPN's ``torch.stack(levels).sum(0)``) is an addition."""
    kind = FUSION_OPS[node.target].kind
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if kind == "stack" and node.users and all(u.target == aten.sum.dim_IntList and list(u.args[1]) == [dim]
                                                for u in node.users):
        return "add"
    return kind


def _closure(node: Node, step) -> set[Node]:
    """Every node reached from ``node`` by repeating ``step`` (``lambda n: n.users`` or ``n.all_input_nodes``)."""
    seen, todo = set(), [node]
    while todo:
        for other in step(todo.pop()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def _fusions_reached(start: Node, live: set[Node]) -> list[tuple[Node, Node]]:
    """(fusion node, its input on this branch) for every fusion reached from ``start`` through linear ops.

    An addition or concatenation whose other inputs all derive from ``start`` too (a residual ``h + f(h)``) is not
    a fusion of two levels: the branch passes through it."""
    derived = _closure(start, lambda n: n.users) | {start}
    gate = _gate(start.args[0], live)  # the upsampled map is itself a gate (f * up(sigmoid(a))): no product carries it
    found, seen, todo = [], set(), [start]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user.op != "call_function" or (user, node) in seen:
                continue
            seen.add((user, node))
            if _fusion_kind(user, live) is not None:
                others = [t for t in _fusion_inputs(user) if isinstance(t, Node) and t in live and t is not node]
                if not all(t in derived for t in others):
                    found.append((user, node))
                    continue
                todo.append(user)  # a residual of the branch itself
            elif user.target in LINEAR or user.target is operator.getitem:
                if user.target in PARAMETRIZED and user.args[0] is not node:
                    continue  # the branch is a weight here, not the data
                if user.target in PRODUCTS:
                    operands = [a for a in user.args[:2] if isinstance(a, Node) and a in live]
                    others = [a for a in operands if a is not node]
                    if len(operands) > 1 and not others or others and (gate or not all(_gate(a, live) for a in others)):
                        continue  # squared, attended by another feature, or itself a gate: not linear in the branch
                todo.append(user)
            elif user.target in FUSION_OPS and not FUSION_OPS[user.target].listed:
                todo.append(user)  # adding a constant (a bias, an equalizer's mean) keeps the branch linear
    return found


def _gate(node: Node, live: set[Node], depth: int = 0) -> bool:
    """Whether a data-dependent tensor is a gate: made by a squashing op (sigmoid, tanh, softmax), through ops that
    keep it one (views, sums and products of gates, scaling by constants)."""
    if not isinstance(node, Node) or node.op != "call_function" or depth > 32:
        return False
    if node.target in GATES:
        return True
    inputs = [a for a in node.args if isinstance(a, Node) and a in live]
    keeps = node.target in LINEAR and node.target not in PARAMETRIZED or node.target in FUSION_OPS
    return keeps and bool(inputs) and all(_gate(a, live, depth + 1) for a in inputs)


def _consumer(site: Node, sig: torch.export.ExportGraphSignature, fusion: Node | None = None) -> Consumer | None:
    """The conv that receives this branch through a concatenation or directly (exactly compensable).

    ``fusion``: the branch is equalized only as an input of this op (kind "branch"), so its other users don't count.
    """
    params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    node, path, offset = site, [], 0
    channels = _shape(site)[1] if len(_shape(site)) > 1 else 0
    while True:
        if fusion is not None:
            user, fusion = fusion, None
        elif len(node.users) != 1:
            return None
        else:
            (user,) = node.users
        if user.op != "call_function":
            return None
        if user.target in CHANNEL_KEEPING or (user.target == aten.pad.default and len(user.args) > 2 and
                                               user.args[2] in ("replicate", "reflect")):
            # (edge padding copies pixels: it commutes with a per-channel affine map, unlike zero padding)
            node = user
            path.append(str(user.target).split(".")[1])
            continue
        if user.target in FUSION_OPS and FUSION_OPS[user.target].kind == "cat":
            dim = user.args[1] if len(user.args) > 1 else 0
            if dim not in (1, 1 - len(_shape(user))) or offset:
                return None
            for other in user.args[0]:
                if other is node:
                    break
                offset += _shape(other)[1]
            node = user
            path.append("cat")
            continue
        if user.target in CONVS and user.args[0] is node:
            args = list(user.args) + [None] * (7 - len(user.args))
            weight, bias, padding, groups = args[1], args[2], args[4], args[6]
            if weight.name not in params:
                return None
            kernel = _shape(weight)[2:]
            if padding == "same":
                padded = any(k > 1 for k in kernel)
            elif padding in (None, "valid"):
                padded = False
            else:
                padded = any(int(p) > 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
            bn = None
            if len(user.users) == 1:
                (after,) = user.users
                if after.target == aten.batch_norm.default and after.args[0] is user and after.args[3] is not None:
                    bn = params.get(after.args[3].name)
            path.append(str(user.target).split(".")[1])
            return Consumer(params[weight.name], params.get(bias.name) if bias is not None else None, bn,
                            (offset, offset + channels), padded, " -> ".join(path), shared=len(weight.users) > 1,
                            grouped=(groups or 1) != 1)
        return None


def module_calls(program: torch.export.ExportedProgram) -> dict[str, int]:
    """How many times the graph calls each module (by path) in one forward: torch.export numbers every call
    (``path@N``), also those that make no tensor operation and so leave no node, so the count is the last number
    seen plus one (a trailing call without operations, such as a recursion's base case, is not seen at all)."""
    return _call_counts(flat_graph(program).nodes)


def _call_counts(nodes) -> dict[str, int]:
    calls: dict[str, int] = {}
    for node in nodes:
        for key, (path, _) in (node.meta.get(MODULE_STACK) or {}).items():
            calls[path] = max(calls.get(path, 0), (int(key.rsplit("@", 1)[1]) if "@" in key else 0) + 1)
    return calls


def find_sites(program: torch.export.ExportedProgram, branches: str = "upsampled") -> list[Site]:
    """Every site in an exported program, in graph order.

    Args:
        program: a ``torch.export.export(model, args, kwargs, strict=False)`` result.
        branches: ``"upsampled"`` (the paper's placement: after each upsampling that feeds a fusion) or ``"all"``
            (also every other input of those fusions).
    """
    if branches not in ("upsampled", "all"):
        from .errors import UsageError

        raise UsageError(f"branches must be 'upsampled' (the paper's placement) or 'all', got {branches!r}")
    graph = flat_graph(program)
    sig = program.graph_signature
    live = _data_dependent(graph, set(sig.user_inputs))

    # Per module call: the resize/fusion number (for names), the occurrence among the calls from one source line
    # (the run-time identity), and how many calls each line makes; how many times each module is called.
    number: dict[Node, int] = {}
    occurrence: dict[Node, int] = {}
    counts: dict[tuple, int] = defaultdict(int)
    calls_of = _call_counts(graph.nodes)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        op = "resize" if node.target in RESIZE_OPS else "fusion" if node.target in FUSION_OPS else None
        if op is None:
            continue
        key = _owner(node)[0]
        number[node] = counts[(op, key)]  # names count the calls of submodules too, as they always have
        for outer in (node.meta.get(MODULE_STACK) or {"": None}):
            counts[(op, outer)] += 1
        occurrence[node] = counts[(op, key, _source_key(node))]
        counts[(op, key, _source_key(node))] += 1

    def identity(node: Node, op: str) -> dict:
        key, path, call = _owner(node)
        return dict(owner=path, call=call, owner_calls=max(calls_of.get(path, 0), 1), index=number[node],
                    source=_source_key(node), occurrence=occurrence[node],
                    line_calls=counts[(op, key, _source_key(node))])

    def fusion_name(fusion: Node) -> str:
        _, path, call = _owner(fusion)
        return f"{path or 'model'}.call{call}_fusion{number[fusion]}"

    found: list[tuple[Node, dict]] = []
    fusions: dict[Node, set[Node]] = defaultdict(set)  # fusion -> its inputs that carry an upsampled branch
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in RESIZE_OPS or node.args[0] not in live:
            continue
        src, out = _shape(node.args[0]), _shape(node)
        if len(out) < 3 or len(src) != len(out) or torch.Size(out[2:]).numel() <= torch.Size(src[2:]).numel():
            continue  # not an enlargement: a same-size or shrinking resize is not an upsampling
        reached = _fusions_reached(node, live)
        if not reached:
            continue
        for fusion, branch in reached:
            fusions[fusion].add(branch)
        align = node.args[2] if len(node.args) > 2 else None
        found.append((node, dict(identity(node, "resize"), kind="upsample", arg=0,
                                 fusion=_fused_as(reached[0][0]), shape=out, in_size=tuple(src[2:]),
                                 mode=RESIZE_OPS[node.target], align_corners=align, consumer=_consumer(node, sig),
                                 joins=fusion_name(reached[0][0]))))
    if branches == "all":
        for fusion, carried in fusions.items():
            for arg, other in enumerate(_fusion_inputs(fusion)):
                if not isinstance(other, Node) or other in carried or other not in live:
                    continue
                found.append((other, dict(identity(fusion, "fusion"), kind="branch", arg=arg,
                                          fusion=_fused_as(fusion), shape=_shape(other), in_size=None,
                                          mode=None, align_corners=None, consumer=_consumer(other, sig, fusion),
                                          joins=fusion_name(fusion))))

    # A fusion whose output reaches another fusion of an upsampled branch is chained (a top-down path); else final.
    chained = {fusion_name(f) for f in fusions if _closure(f, lambda n: n.users) & (fusions.keys() - {f})}
    for _, info in found:
        info["place"] = "chained" if info["joins"] in chained else "final"

    # A site whose input depends on another site is calibrated after it (FPN top-down paths chain them).
    order = {node: i for i, node in enumerate(graph.nodes)}
    found.sort(key=lambda item: order[item[0]])
    names = {node: Site(level=0, **info).name for node, info in found}
    params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    sites, levels = [], {}
    for node, info in found:
        before = _closure(node, lambda n: n.all_input_nodes)
        upstream = [other for other, _ in found if other in before and other is not node]
        levels[node] = 1 + max((levels[o] for o in upstream), default=-1)
        weights = frozenset(params[n.name] for n in before if n.op == "placeholder" and n.name in params)
        sites.append(Site(level=levels[node], upstream=frozenset(names[o] for o in upstream), weights=weights,
                          **info))
    return sites


_NEAREST = {aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
            aten.upsample_nearest1d.default, aten.upsample_nearest2d.default, aten.upsample_nearest3d.default,
            aten._upsample_nearest_exact1d.vec, aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact3d.vec}
_TRANSPOSED = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}


def explain(program: torch.export.ExportedProgram) -> str:
    """Why a program has no site: the resizes it makes, counted by the reason each is not one."""
    graph = flat_graph(program)
    live = _data_dependent(graph, set(program.graph_signature.user_inputs))
    reasons: dict[str, int] = defaultdict(int)
    for node in graph.nodes:
        if node.op != "call_function" or node not in live:
            continue
        if node.target in RESIZE_OPS:
            src, out = _shape(node.args[0]), _shape(node)
            if len(out) < 3 or torch.Size(out[2:]).numel() <= torch.Size(src[2:]).numel():
                reasons[f"{RESIZE_OPS[node.target]} resize(s) to the same or a smaller size (not upsampling)"] += 1
            else:
                reasons[f"{RESIZE_OPS[node.target]} upsampling(s) that reach no fusion through linear ops "
                        f"(only the output, or a normalization/activation first)"] += 1
        elif node.target in _NEAREST:
            reasons["nearest upsampling(s) (keep the variance)"] += 1
        elif node.target in _TRANSPOSED:
            reasons["transposed conv(s) (learned, not a resize)"] += 1
    if not reasons:
        return "it makes no resize"
    return "it makes " + ", ".join(f"{n} {why}" for why, n in reasons.items())
