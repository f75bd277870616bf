"""Rule-based rewriting of the dense network's graph, for the torch serving backend.

The torch backend runs the bundle's `torch.export` program: an fx graph of ATen
operators. At serving batch sizes most of its time goes to dispatching operators, not
to arithmetic, so a rule that does the same work in fewer operators pays directly
(`tidal bench rewrite`). Each rule finds its pattern and rewrites the graph:

- `gather_slices`: a concatenation of slices of the rows of one `[B, R, C]` tensor
  (DLRM's upper triangle of the Gram matrix: 26 `select` + 26 `slice` operators) becomes
  one `index_select` of the tensor flattened to `[B, R C]`.
- `merge_linears`: three or more linear layers reading the same input (an MMoE head's
  experts and gates) become one linear layer over their weights stacked, whose output
  is sliced back into theirs. Two are left alone: DeepFM's and Wide & Deep's deep and
  linear parts, merged, ran 0.96-1.06x as fast (`tidal bench rewrite`), the one
  operator saved costing as much as the wider product and its sliced outputs.
- `stack_slices`: `stack([f(x[..., 0:w]), f(x[..., w:2w]), ...], dim=-2)`, with `f` the
  same ReLU, softmax over the last dimension or nothing, becomes `f` of
  `x[..., 0:K w]` seen as `[..., K, w]` (the MMoE's experts and gates, once merged).
- `einsum_bmm`: an `einsum` of the form `bij,bjk->bik` becomes `bmm`.

`rewrite` applies the rules in turn, each to a copy of the graph, and keeps a rule's
result only if the rewritten module scores as the graph before any rule (the program
run as exported) on random inputs at every batch size it is given, to `TOLERANCE`. A
rule that finds nothing, or whose result differs or fails, leaves the graph as it was;
`Rewritten.outcomes` says which.

Merged layers hold copies of the program's weights, so new dense weights (a delta) go
into the program as exported, which is then rewritten again.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from tidal.compile._checks import TOLERANCE

__all__ = ["NOT_FOUND", "RULES", "Rewritten", "Rule", "RuleOutcome", "TOLERANCE", "rewrite"]

ATEN = torch.ops.aten
NOT_FOUND = "its pattern is not in the graph"  # the reason of a rule that found nothing to rewrite
MIN_LINEARS = 3  # linear layers of one input merged (see merge_linears)


@dataclass(frozen=True, kw_only=True)
class Rule:
    """A rewrite of one pattern: `apply(module)` rewrites its graph in place and says
    at how many places. It may add weights and leave old ones unread, never write one:
    the module it gets shares its weights with the program being served."""

    name: str
    apply: Callable[[fx.GraphModule], int]


@dataclass(frozen=True, kw_only=True)
class RuleOutcome:
    """What one rule did: the places it rewrote, whether its result was kept, and the
    largest difference from the program found (relative; None when not run)."""

    rule: str
    places: int
    kept: bool
    difference: float | None
    reason: str


@dataclass(frozen=True, kw_only=True)
class Rewritten:
    """The rewritten module (the one given, when no rule was kept) and each rule's outcome."""

    module: fx.GraphModule
    outcomes: tuple[RuleOutcome, ...]

    @property
    def kept(self) -> list[str]:
        return [o.rule for o in self.outcomes if o.kept]


def rewrite(module: fx.GraphModule, inputs: Sequence[tuple[torch.Tensor, ...]],
            rules: Sequence[Rule] | None = None) -> Rewritten:
    """`module` (a `torch.export` program's `module()`; not changed) rewritten by
    `rules` (default `RULES`), each checked against `module` on every one of `inputs`
    (tuples of its arguments: one per batch size it will see). A graph that writes a
    tensor in place is left as it is: a rule may turn a new tensor into a view, and the
    write would then reach another (its outputs alone cannot show that)."""
    rules = RULES if rules is None else rules
    writing = sorted({str(n.target) for n in module.graph.nodes if _writes_in_place(n)})
    if writing:
        reason = f"the graph writes tensors in place ({', '.join(writing[:3])}), so no rule is applied"
        return Rewritten(module=module, outcomes=tuple(RuleOutcome(rule=r.name, places=0, kept=False, difference=None,
                                                                   reason=reason) for r in rules))
    with torch.no_grad():
        expected = [module(*args) for args in inputs]
    current, outcomes = module, []
    for rule in rules:
        candidate, outcome = _applied(rule, current, inputs, expected)
        outcomes.append(outcome)
        current = candidate if outcome.kept else current
    return Rewritten(module=current, outcomes=tuple(outcomes))


def _applied(rule: Rule, module: fx.GraphModule, inputs: Sequence[tuple[torch.Tensor, ...]],
             expected: Sequence[object]) -> tuple[fx.GraphModule, RuleOutcome]:
    """A copy of `module` rewritten by `rule`, and the outcome of checking it."""
    candidate = _copy(module)
    try:
        places = rule.apply(candidate)
        if places:
            _tidy(candidate)
    except Exception as exc:  # noqa: BLE001 - a rule that cannot rewrite this graph is left out
        return candidate, RuleOutcome(rule=rule.name, places=0, kept=False, difference=None,
                                      reason=f"it failed on this graph: {type(exc).__name__}: {exc}")
    if not places:
        return candidate, RuleOutcome(rule=rule.name, places=0, kept=False, difference=None, reason=NOT_FOUND)
    return candidate, _check(rule.name, places, candidate, inputs, expected)


def _writes_in_place(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and schema.is_mutable


def _copy(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph and its modules, sharing their weights (rules never write a
    weight: they add new ones and drop those no node reads any more)."""
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own, from its tree specs
        return copy.deepcopy(module, shared)


def _check(name: str, places: int, candidate: fx.GraphModule, inputs: Sequence[tuple[torch.Tensor, ...]],
           expected: Sequence[object]) -> RuleOutcome:
    """`candidate` against the program's outputs `expected` on `inputs`."""
    worst = 0.0
    for args, want in zip(inputs, expected):
        try:
            with torch.no_grad():
                found = candidate(*args)
        except Exception as exc:  # noqa: BLE001 - a rewrite may break the graph in any way; it is then dropped
            return RuleOutcome(rule=name, places=places, kept=False, difference=None,
                               reason=f"the rewritten graph failed at batch {len(args[0])}: {type(exc).__name__}: {exc}")
        worst = max(worst, _difference(found, want))
        if not worst <= TOLERANCE:
            return RuleOutcome(rule=name, places=places, kept=False, difference=worst,
                               reason=f"its outputs differ from the program's at batch {len(args[0])} by {worst:.3g} "
                                      f"(allowed {TOLERANCE:g})")
    return RuleOutcome(rule=name, places=places, kept=True, difference=worst, reason="same outputs as the program")


def _difference(found: object, want: object) -> float:
    """The largest difference of two outputs (tensors or tuples of them), relative to
    the largest of `want` (at least 1); infinite when their shapes or kinds differ, or
    where one holds NaN and the other not."""
    found_all, want_all = torch.utils._pytree.tree_leaves(found), torch.utils._pytree.tree_leaves(want)
    if len(found_all) != len(want_all):
        return float("inf")
    worst = 0.0
    for f, w in zip(found_all, want_all):
        if not isinstance(f, torch.Tensor) or not isinstance(w, torch.Tensor) or f.shape != w.shape:
            return float("inf")
        if w.numel():
            f, w = f.float(), w.float()
            apart = torch.where(f.isnan() & w.isnan(), 0.0, (f - w).abs()).nan_to_num(nan=float("inf"))
            worst = max(worst, float(apart.max()) / max(1.0, float(w.nan_to_num().abs().max())))
    return worst


def _tidy(module: fx.GraphModule) -> None:
    """Drop the nodes a rule left unused, and the weights no node reads any more."""
    before = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    module.graph.eliminate_dead_code()
    module.graph.lint()
    after = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    for target in before - after:
        owner, _, name = target.rpartition(".")
        delattr(module.get_submodule(owner), name)
    module.recompile()


# ---------------------------------------------------------------------- helpers


def _is(node: object, target: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _attribute(module: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a `get_attr` node reads (None for any other node)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, name = node.target.rpartition(".")
    value = getattr(module.get_submodule(owner), name)
    return value if isinstance(value, torch.Tensor) else None


def _constant(module: fx.GraphModule, tensor: torch.Tensor, stem: str) -> fx.Node:
    """A `get_attr` node (at the graph's insertion point) of `tensor`, registered as a
    new buffer of `module`."""
    taken = set(dict(module.named_buffers())) | set(dict(module.named_parameters()))
    name = next(f"rewritten_{stem}_{k}" for k in range(len(taken) + 1) if f"rewritten_{stem}_{k}" not in taken)
    module.register_buffer(name, tensor)
    return module.graph.get_attr(name)


def _static_shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


# ---------------------------------------------------------------------- gather_slices


def _gather_slices(module: fx.GraphModule) -> int:
    places = 0
    for cat in [n for n in module.graph.nodes if _is(n, ATEN.cat.default)]:
        parts, dim = list(cat.args[0]), cat.args[1] if len(cat.args) > 1 else 0
        for begin, end, source, index in reversed(_row_slice_runs(parts, dim)):
            with module.graph.inserting_before(cat):
                positions = _constant(module, torch.tensor(index, dtype=torch.long, device=_device(module)), "gather_index")
                flat = module.graph.call_function(ATEN.flatten.using_ints, (source, 1))  # [B, R C]
                parts[begin:end] = [module.graph.call_function(ATEN.index_select.default, (flat, 1, positions))]
            places += 1
        cat.args = (parts, *cat.args[1:])
    return places


def _row_slice_runs(parts: list, dim: int) -> list[tuple[int, int, fx.Node, list[int]]]:
    """Runs of two or more consecutive `parts` that are slices `t[:, i, a:b]` of one
    `[B, R, C]` tensor `t`: (begin, end, t, the slices' positions in `t` flattened)."""
    runs: list[tuple[int, int, fx.Node, list[int]]] = []
    for k, part in enumerate(parts):
        found = _row_slice(part) if dim in (1, -1) else None
        if found is None:
            continue
        source, positions = found
        last = runs[-1] if runs else None
        if last is not None and last[1] == k and last[2] is source:
            runs[-1] = (last[0], k + 1, source, last[3] + positions)
        else:
            runs.append((k, k + 1, source, positions))
    return [run for run in runs if run[1] - run[0] > 1]


def _row_slice(node: object) -> tuple[fx.Node, list[int]] | None:
    """(t, positions in t flattened) when `node` is `t[:, i, a:b]` of a `[B, R, C]` `t`
    (R and C fixed), read by nothing else."""
    if not _is(node, ATEN.slice.Tensor) or not _single_user(node):
        return None
    select, dim, start, end, step = (*node.args, *(None,) * (5 - len(node.args)))[:5]
    if dim != 1 or step not in (None, 1) or not _is(select, ATEN.select.int) or not _single_user(select):
        return None
    source, select_dim, row = select.args
    shape = _static_shape(source)
    if select_dim != 1 or shape is None or len(shape) != 3 or not all(isinstance(s, int) for s in shape[1:]):
        return None
    if not all(isinstance(b, int | None) for b in (start, end, row)):  # a bound the batch size decides
        return None
    rows, cols = shape[1], shape[2]
    columns = range(cols)[slice(start, end)]
    return source, [(row % rows) * cols + c for c in columns]


def _device(module: fx.GraphModule) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------- merge_linears


def _merge_linears(module: fx.GraphModule) -> int:
    groups: dict[fx.Node, list[tuple[fx.Node, tuple[torch.Tensor, torch.Tensor]]]] = defaultdict(list)
    for node in module.graph.nodes:
        found = _linear_weights(module, node) if _is(node, ATEN.linear.default) else None
        if found is not None:
            groups[node.args[0]].append((node, found))
    places = 0
    for source, group in groups.items():
        linears, weights = [n for n, _ in group], [w for _, w in group]
        if len(linears) >= MIN_LINEARS and len({(w.shape[1], w.dtype, w.device) for w, _ in weights}) == 1:
            _merge(module, source, linears, weights)
            places += 1
    return places


def _linear_weights(module: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, bias) of a linear node whose weight (and bias, if any) are attributes
    (a missing bias reads as zeros)."""
    weight = _attribute(module, node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = _attribute(module, bias_node) if bias_node is not None else None
    if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None):
        return None
    return weight, bias if bias is not None else weight.new_zeros(weight.shape[0])


def _merge(module: fx.GraphModule, source: fx.Node, linears: list[fx.Node],
           weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One linear node over `linears`' stacked weights, sliced back into their outputs."""
    graph = module.graph
    with graph.inserting_before(linears[0]):
        weight = _constant(module, torch.cat([w for w, _ in weights]).detach(), "linear_weight")
        bias = _constant(module, torch.cat([b for _, b in weights]).detach(), "linear_bias")
        merged = graph.call_function(ATEN.linear.default, (source, weight, bias))
        if all(isinstance(n.meta.get("val"), torch.Tensor) for n in linears):  # its shape, as later rules read
            merged.meta["val"] = torch.cat([n.meta["val"] for n in linears], dim=-1)
        start = 0
        for node, (w, _) in zip(linears, weights):
            part = graph.call_function(ATEN.slice.Tensor, (merged, -1, start, start + w.shape[0]))
            part.meta = dict(node.meta)  # the same output
            node.replace_all_uses_with(part)
            start += w.shape[0]
    for node in linears:
        graph.erase_node(node)


# ---------------------------------------------------------------------- stack_slices


_LAST_DIM_OPS = (ATEN.relu.default, ATEN.softmax.int)  # act on each last-dimension vector alone


def _stack_slices(module: fx.GraphModule) -> int:
    places = 0
    for stack in [n for n in module.graph.nodes if _is(n, ATEN.stack.default)]:
        found = _stacked_slices(stack)
        if found is None:
            continue
        source, start, count, width, op = found
        graph = module.graph
        with graph.inserting_before(stack):
            node = graph.call_function(ATEN.slice.Tensor, (source, -1, start, start + count * width))
            node = graph.call_function(ATEN.unflatten.int, (node, -1, [count, width]))  # [..., K, w]
            if op is not None:
                extra = (-1, *op.args[2:]) if op.target is ATEN.softmax.int else ()  # still the last dimension
                node = graph.call_function(op.target, (node, *extra))
        stack.replace_all_uses_with(node)
        graph.erase_node(stack)
        places += 1
    return places


def _stacked_slices(stack: fx.Node) -> tuple[fx.Node, int, int, int, fx.Node | None] | None:
    """(x, start, K, w, the op f or None) when `stack` is `stack([f(x[..., start + k w :
    start + (k + 1) w]) for k < K], dim=-2)`, each part read by the stack alone."""
    parts, dim = stack.args[0], stack.args[1] if len(stack.args) > 1 else 0
    pieces = [_last_dim_piece(p) for p in parts]
    if len(parts) < 2 or any(p is None for p in pieces):
        return None
    source, start, end, rank, _ = pieces[0]
    width = end - start
    expected = [(source, start + k * width, start + (k + 1) * width, rank) for k in range(len(pieces))]
    signatures = {(op.target, *op.args[1:]) if op is not None else None for *_, op in pieces}
    if [p[:4] for p in pieces] != expected or len(signatures) != 1 or dim not in (rank - 1, -2):
        return None
    return source, start, len(pieces), width, pieces[0][4]


def _last_dim_piece(node: object) -> tuple[fx.Node, int, int, int, fx.Node | None] | None:
    """(x, a, b, the rank of x, the op f or None) when `node` is `f(x[..., a:b])` or
    `x[..., a:b]`: a slice of the last dimension, of fixed bounds within it, each read once."""
    op = None
    if any(_is(node, target) for target in _LAST_DIM_OPS) and _single_user(node):
        op, node = node, node.args[0]
    if not _is(node, ATEN.slice.Tensor) or not _single_user(node) or len(node.args) != 4:
        return None
    source, dim, start, end = node.args
    shape = _static_shape(source)
    if shape is None or dim not in (-1, len(shape) - 1) or not isinstance(shape[-1], int) \
            or not isinstance(start, int) or not isinstance(end, int) or not 0 <= start < end <= shape[-1]:
        return None
    if op is not None and op.target is ATEN.softmax.int and op.args[1] not in (-1, len(shape) - 1):
        return None
    return source, start, end, len(shape), op


# ---------------------------------------------------------------------- einsum_bmm


def _einsum_bmm(module: fx.GraphModule) -> int:
    places = 0
    for node in [n for n in module.graph.nodes if _is(n, ATEN.einsum.default)]:
        equation, operands = node.args[0], node.args[1]
        if len(operands) == 2 and _batched_matmul(equation):
            with module.graph.inserting_before(node):
                bmm = module.graph.call_function(ATEN.bmm.default, tuple(operands))
            bmm.meta = dict(node.meta)
            node.replace_all_uses_with(bmm)
            module.graph.erase_node(node)
            places += 1
    return places


def _batched_matmul(equation: str) -> bool:
    """Whether `equation` is `bij,bjk->bik` (any four distinct letters)."""
    found = re.fullmatch(r"(\w)(\w)(\w),(\w)(\w)(\w)->(\w)(\w)(\w)", equation.replace(" ", ""))
    if found is None:
        return False
    b, i, j, b2, j2, k, ob, oi, ok = found.groups()
    return len({b, i, j, k}) == 4 and (b2, j2, ob, oi, ok) == (b, j, b, i, k)


RULES: tuple[Rule, ...] = (
    Rule(name="gather_slices", apply=_gather_slices),
    Rule(name="merge_linears", apply=_merge_linears),
    Rule(name="stack_slices", apply=_stack_slices),
    Rule(name="einsum_bmm", apply=_einsum_bmm),
)

