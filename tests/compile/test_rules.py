"""Graph rewriting rules: each rewrites its pattern in the networks, keeps their outputs,
leaves alone what only looks like its pattern, and a rule whose result differs or fails
is left out."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from tidal.compile import RULES, Rule, export_program, rewrite
from tidal.compile.rules import _batched_matmul
from tidal.config import ModelConfig
from tidal.models import RankingModel

ATEN = torch.ops.aten
FEATURES, DIM, DENSE, TARGETS = 5, 4, 3, 2
NETWORKS = {
    "dlrm": ({"kind": "dlrm", "bottom_sizes": [16], "hidden_sizes": [32]}, ["gather_slices"]),
    "dcn": ({"kind": "dcn", "cross_layers": 2, "hidden_sizes": [32]}, []),
    "deepfm": ({"kind": "deepfm", "hidden_sizes": [32]}, []),  # two linear layers of one input: not merged
    "wide_deep": ({"kind": "wide_deep", "hidden_sizes": [32]}, []),
    "dlrm_mmoe": ({"kind": "dlrm", "bottom_sizes": [16], "hidden_sizes": [32], "head": "mmoe", "experts": 3,
                   "expert_sizes": [8], "tower_sizes": [4]},
                  ["gather_slices", "merge_linears", "stack_slices", "einsum_bmm"]),
}


def _network(spec: dict, *, features: int = FEATURES, dim: int = DIM, dense: int = DENSE,
             targets: int = TARGETS, seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    model = RankingModel(ModelConfig(**spec), num_features=features, dim=dim, dense_features=dense,
                         num_targets=targets).eval()
    return export_program(model, (torch.zeros(2, features, dim), torch.zeros(2, dense)), 64).module()


def _inputs(module: fx.GraphModule, batches: tuple[int, ...], seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Random inputs of `batches` rows for a network of `_network`'s sizes (read off its graph)."""
    pooled, dense = (n.meta["val"].shape for n in module.graph.nodes if n.op == "placeholder")
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *pooled[1:], generator=generator), torch.randn(b, *dense[1:], generator=generator))
            for b in batches]


def _count(module: fx.GraphModule, target: object) -> int:
    return sum(n.op == "call_function" and n.target is target for n in module.graph.nodes)


def _same_outputs(a: fx.GraphModule, b: fx.GraphModule, inputs: list) -> None:
    with torch.no_grad():
        for args in inputs:
            want, found = a(*args), b(*args)
            assert found.shape == want.shape
            assert (found - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("name", NETWORKS)
def test_each_network_is_rewritten_by_its_rules_and_scores_the_same(name):
    spec, expected = NETWORKS[name]
    module = _network(spec)
    done = rewrite(module, _inputs(module, (1, 4, 64)))
    assert done.kept == expected
    assert [o.rule for o in done.outcomes] == [r.name for r in RULES]
    for outcome in done.outcomes:
        assert outcome.kept == (outcome.places > 0) and outcome.kept == (outcome.rule in expected)
        assert outcome.kept or outcome.reason == "its pattern is not in the graph"
    _same_outputs(module, done.module, _inputs(module, (3, 17, 50), seed=2))  # other sizes than those checked


def test_gather_slices_replaces_the_triangle_of_slices_by_one_exact_gather():
    module = _network(NETWORKS["dlrm"][0])
    done = rewrite(module, _inputs(module, (1, 8)), [r for r in RULES if r.name == "gather_slices"])
    assert _count(module, ATEN.select.int) == FEATURES and _count(done.module, ATEN.select.int) == 0
    assert _count(done.module, ATEN.index_select.default) == 1 and done.outcomes[0].difference == 0.0
    for args in _inputs(module, (5,), seed=3):
        assert torch.equal(done.module(*args), module(*args))  # a gather moves values, it computes nothing


def test_the_mmoe_head_runs_one_linear_layer_for_its_experts_and_gates():
    spec = NETWORKS["dlrm_mmoe"][0]
    module = _network(spec)
    done = rewrite(module, _inputs(module, (1, 8)))
    experts_and_gates = spec["experts"] + TARGETS
    assert _count(done.module, ATEN.linear.default) == _count(module, ATEN.linear.default) - experts_and_gates + 1
    assert _count(done.module, ATEN.stack.default) == _count(done.module, ATEN.einsum.default) == 0
    assert _count(done.module, ATEN.bmm.default) == 2  # the interaction's and the mixture's
    merged = [n for n in done.module.graph.nodes if n.op == "get_attr" and "linear_weight" in n.target]
    assert len(merged) == 1 and getattr(done.module, merged[0].target).shape[0] == 3 * 8 + TARGETS * 3
    assert not any(n.op == "get_attr" and ".experts." in n.target for n in done.module.graph.nodes)
    assert not hasattr(done.module.head.experts.get_submodule("0.0"), "weight")  # replaced weights are dropped


def test_the_module_given_is_not_changed():
    module = _network(NETWORKS["dlrm_mmoe"][0])
    code, state = module.code, {k: v.clone() for k, v in module.state_dict().items()}
    rewrite(module, _inputs(module, (2,)))
    assert module.code == code and module.state_dict().keys() == state.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


def _relu_to_sigmoid(module: fx.GraphModule) -> int:
    nodes = [n for n in module.graph.nodes if n.op == "call_function" and n.target is ATEN.relu.default]
    for node in nodes:
        node.target = ATEN.sigmoid.default
    return len(nodes)


def _relu_to_nan(module: fx.GraphModule) -> int:
    """ReLU replaced by log: NaN wherever the input is negative."""
    nodes = [n for n in module.graph.nodes if n.op == "call_function" and n.target is ATEN.relu.default]
    for node in nodes:
        node.target = ATEN.log.default
    return len(nodes)


def _bmm_of_wrong_shapes(module: fx.GraphModule) -> int:
    node = next(n for n in module.graph.nodes if n.op == "call_function" and n.target is ATEN.bmm.default)
    node.args = (node.args[0], node.args[0])  # [B, V, D] x [B, V, D]: fails unless V == D
    return 1


def _raises(module: fx.GraphModule) -> int:
    raise RuntimeError("cannot rewrite")


@pytest.mark.parametrize("rule, reason", [
    (Rule(name="relu_to_sigmoid", apply=_relu_to_sigmoid), r"its outputs differ from the program's at batch 1 by "),
    (Rule(name="relu_to_nan", apply=_relu_to_nan), r"its outputs differ from the program's at batch 1 by inf"),
    (Rule(name="bad_bmm", apply=_bmm_of_wrong_shapes), r"the rewritten graph failed at batch 1: RuntimeError"),
    (Rule(name="raises", apply=_raises), r"it failed on this graph: RuntimeError: cannot rewrite"),
])
def test_a_rule_whose_result_differs_or_fails_is_left_out_and_the_next_ones_still_apply(rule, reason):
    module = _network(NETWORKS["dlrm"][0])
    inputs = _inputs(module, (1, 8))
    done = rewrite(module, inputs, [rule, *RULES])
    left_out = done.outcomes[0]
    assert not left_out.kept and left_out.rule == rule.name
    assert re.match(reason, left_out.reason)
    assert done.kept == ["gather_slices"]
    _same_outputs(module, done.module, inputs)
    assert _count(done.module, ATEN.relu.default) == _count(module, ATEN.relu.default)


# ---------------------------------------------------------------------- what only looks like a pattern


class _Slices(nn.Module):
    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        shared = t[:, 2, 1:]
        # slices of two tensors, alternating; one slice read twice: no run of two from one tensor
        return torch.cat([t[:, 0, 1:], u[:, 0, 1:], t[:, 1, 2:], u[:, 1, 2:], shared, shared * 2], dim=1)


class _Linears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 3) for _ in range(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        computed = nn.functional.linear(x, self.c.weight * 2)  # a weight computed, not read
        return self.a(x) + self.b(x) + self.d(y) + computed  # of x, two linear layers of attributes


class _Stacks(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        wrong_dim = torch.stack([torch.softmax(x[:, 0:2], dim=0), torch.softmax(x[:, 2:4], dim=0)], dim=1)
        gap = torch.stack([x[:, 0:2], x[:, 3:5]], dim=1)
        mixed = torch.stack([torch.relu(y[:, 0:2]), torch.softmax(y[:, 2:4], dim=-1)], dim=1)
        return wrong_dim + gap + mixed


class _StackOfSlices(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        softmaxes = torch.stack([torch.softmax(x[:, 1:3], dim=1), torch.softmax(x[:, 3:5], dim=1)], dim=1)
        plain = torch.stack([y[:, 0:2], y[:, 2:4], y[:, 4:6]], dim=-2)
        return softmaxes.sum() + plain


def test_stacked_slices_of_other_networks_become_one_view_with_the_softmax_on_its_last_dimension():
    example = (torch.randn(2, 6), torch.randn(2, 6))
    batch = torch.export.Dim("batch", min=1, max=64)
    graph = torch.export.export(_StackOfSlices(), example, dynamic_shapes=({0: batch}, {0: batch})).module()
    inputs = [(torch.randn(b, 6), torch.randn(b, 6)) for b in (1, 5)]
    done = rewrite(graph, inputs)
    assert done.kept == ["stack_slices"] and done.outcomes[2].places == 2
    assert _count(done.module, ATEN.stack.default) == 0 and _count(done.module, ATEN.softmax.int) == 1
    _same_outputs(graph, done.module, inputs)


class _StackWrittenInPlace(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([x[:, 0:2], x[:, 2:4]], dim=1)  # as a view of x, the write below would reach x
        stacked.mul_(2)
        return stacked + y.sum()


def test_a_graph_that_writes_in_place_is_left_as_it_is():
    example = (torch.randn(2, 4), torch.randn(2, 4))
    batch = torch.export.Dim("batch", min=1, max=64)
    graph = torch.export.export(_StackWrittenInPlace(), example, dynamic_shapes=({0: batch}, {0: batch})).module()
    x = torch.randn(3, 4)
    kept = x.clone()
    done = rewrite(graph, [(x, torch.randn(3, 4))])
    assert done.module is graph and done.kept == [] and torch.equal(x, kept)
    assert all(o.reason.startswith("the graph writes tensors in place (aten.mul_.Tensor)") for o in done.outcomes)


class _Gathers(nn.Module):
    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # negative rows and bounds, a missing bound, a bound past the end
        return torch.cat([t[:, -1, -2:], t[:, 0, :-1], t[:, 1, 1:99], u.flatten(1)], dim=1)


class _OtherStacks(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        last = torch.stack([x[:, 0:2], x[:, 2:4]], dim=-1)  # [B, 2, 2] interleaved: not a view of x
        first = torch.stack([y[:, 0:2], y[:, 2:4]], dim=0)  # [2, B, 2]
        return last.flatten(1) + first.sum(0).repeat(1, 2)


def test_gathers_take_any_bounds_and_stacks_on_other_dimensions_are_left_alone():
    batch = torch.export.Dim("batch", min=1, max=64)
    gathers = torch.export.export(_Gathers(), (torch.randn(2, 3, 4), torch.randn(2, 2)),
                                  dynamic_shapes=({0: batch}, {0: batch})).module()
    inputs = [(torch.randn(b, 3, 4), torch.randn(b, 2)) for b in (1, 5)]
    done = rewrite(gathers, inputs)
    assert done.kept == ["gather_slices"] and _count(done.module, ATEN.select.int) == 0
    assert all(torch.equal(done.module(*args), gathers(*args)) for args in inputs)
    stacks = torch.export.export(_OtherStacks(), (torch.randn(2, 4), torch.randn(2, 4)),
                                 dynamic_shapes=({0: batch}, {0: batch})).module()
    assert rewrite(stacks, [(torch.randn(3, 4), torch.randn(3, 4))]).kept == []


class _Products(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bij,bkj->bik", a, b)


@pytest.mark.parametrize("module, shapes", [(_Slices(), [(3, 4), (3, 4)]), (_Linears(), [(4,), (4,)]),
                                            (_Stacks(), [(5,), (5,)]), (_Products(), [(3, 3), (3, 3)])])
def test_graphs_that_only_look_like_a_pattern_are_left_as_they_are(module, shapes):
    example = tuple(torch.randn(2, *s) for s in shapes)
    batch = torch.export.Dim("batch", min=1, max=64)
    graph = torch.export.export(module, example, dynamic_shapes=tuple({0: batch} for _ in shapes)).module()
    done = rewrite(graph, [tuple(torch.randn(b, *s) for s in shapes) for b in (1, 6)])
    assert done.kept == [] and all(o.places == 0 for o in done.outcomes)
    assert done.module is graph


@pytest.mark.parametrize("equation, expected", [
    ("bij,bjk->bik", True), ("bte,bew->btw", True), ("b i j, b j k -> b i k", True),
    ("bij,bkj->bik", False), ("bij,bjk->bki", False), ("bii,bik->bik", False), ("ij,jk->ik", False),
    ("bij,cjk->bik", False),
])
def test_only_batched_matrix_products_become_bmm(equation, expected):
    assert _batched_matmul(equation) == expected


# ---------------------------------------------------------------------- any network


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["dlrm", "dcn", "deepfm", "wide_deep"]), head=st.sampled_from(["linear", "mmoe"]),
       features=st.integers(1, 6), dim=st.integers(1, 5), dense=st.integers(0, 4), targets=st.integers(1, 3),
       experts=st.integers(1, 3), seed=st.integers(0, 1000))
def test_any_network_scores_the_same_rewritten(kind, head, features, dim, dense, targets, experts, seed):
    mmoe = {"experts": experts, "expert_sizes": [4], "tower_sizes": [3]} if head == "mmoe" else {}
    spec = {"kind": kind, "hidden_sizes": [8], "head": head, **mmoe, **({"bottom_sizes": [4]} if kind == "dlrm" else {})}
    module = _network(spec, features=features, dim=dim, dense=dense, targets=targets, seed=seed)
    done = rewrite(module, _inputs(module, (1, 5)))
    assert all(o.kept for o in done.outcomes if o.places)
    _same_outputs(module, done.module, _inputs(module, (2, 9), seed=seed))
