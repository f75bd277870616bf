"""Dense models: shapes, gradients, and the math of each interaction against a reference."""

from __future__ import annotations

import warnings

import pytest
import torch

from tidal.config import ModelConfig
from tidal.errors import BatchError, ConfigError
from tidal.models import DLRM, DeepFM, MMoEHead, RankingModel, compute_precision

B, F, D, DD, T = 5, 4, 8, 3, 2


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, F, D, generator=g, requires_grad=True), torch.randn(B, DD, generator=g)


@pytest.mark.parametrize("kind", ["dlrm", "deepfm", "dcn", "wide_deep"])
@pytest.mark.parametrize("head", ["linear", "mmoe"])
def test_every_model_maps_pooled_and_dense_to_one_logit_per_target(kind, head):
    torch.manual_seed(0)
    model = RankingModel(ModelConfig(kind=kind, head=head), num_features=F, dim=D, dense_features=DD, num_targets=T)
    pooled, dense = _inputs()
    dense.requires_grad_(True)
    logits = model(pooled, dense)
    assert logits.shape == (B, T) and torch.isfinite(logits).all()
    assert not torch.allclose(logits, model(pooled, dense.detach() + 1.0))  # the dense features count
    logits[:, 1].sum().backward(retain_graph=True)  # the second target alone
    if head == "mmoe":  # moves its own gate only
        assert model.head.gates[1].weight.grad.abs().sum() > 0 and model.head.gates[0].weight.grad.abs().sum() == 0
    logits[:, 0].sum().backward()
    assert pooled.grad is not None and pooled.grad.abs().sum() > 0  # the sparse side gets a gradient
    assert dense.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["dlrm", "deepfm", "dcn", "wide_deep"])
def test_every_model_takes_no_dense_features_without_a_warning(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = RankingModel(ModelConfig(kind=kind), num_features=F, dim=D, dense_features=0, num_targets=1)
    pooled, _ = _inputs()
    model(pooled, torch.zeros(B, 0))[:, 0].sum().backward()
    assert pooled.grad.abs().sum() > 0
    untrained = [name for name, p in model.named_parameters() if p.numel() and not p.grad.abs().sum() > 0]
    assert untrained == []  # a DLRM's bottom "constant" was all zeros behind a ReLU: it and the layer after never trained


def test_dcn_cross_layers_follow_x0_times_wx_plus_b_plus_x():
    from tidal.models.dcn import DCNv2

    torch.manual_seed(1)
    model = DCNv2(F, D, DD, cross_layers=2, deep_sizes=[6])
    pooled, dense = _inputs(3)
    x0 = torch.cat([pooled.flatten(1), dense], dim=1)
    x1 = x0 * (x0 @ model.cross[0].weight.T + model.cross[0].bias) + x0
    x2 = x0 * (x1 @ model.cross[1].weight.T + model.cross[1].bias) + x1
    torch.testing.assert_close(model(pooled, dense), model.deep(x2))


def test_dlrm_interaction_is_every_pairwise_dot_once():
    model = DLRM(F, D, DD, bottom_sizes=[6], top_sizes=[7])
    pooled, dense = _inputs(1)
    bottom = model.bottom(dense)
    vectors = [bottom] + [pooled[:, f] for f in range(F)]
    expected = torch.stack([(vectors[i] * vectors[j]).sum(1) for i in range(F + 1) for j in range(i + 1, F + 1)], 1)
    captured = {}
    model.top.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    model(pooled, dense)
    torch.testing.assert_close(captured["x"], torch.cat([bottom, expected], dim=1))


def test_dlrm_interaction_backward_is_autograds():
    from tidal.models.dlrm import _interaction, _Interaction

    model = DLRM(F, D, DD)
    bottom = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    pooled = torch.randn(B, F, D, dtype=torch.float64, requires_grad=True)
    interaction = lambda b, p: _Interaction.apply(b, p, model.pair_of, model.place)  # noqa: E731
    assert torch.autograd.gradcheck(interaction, (bottom, pooled))
    grad = torch.randn(B, D + (F + 1) * F // 2, dtype=torch.float64)
    ours = torch.autograd.grad(interaction(bottom, pooled), (bottom, pooled), grad)
    theirs = torch.autograd.grad(_interaction(bottom, pooled)[0], (bottom, pooled), grad)
    torch.testing.assert_close(ours, theirs)
    model.train()
    pooled, dense = _inputs(2)
    train_out = model(pooled, dense)
    model.eval()
    torch.testing.assert_close(train_out, model(pooled, dense))  # both paths compute the same forward


def test_dlrm_pair_gradients_placed_by_a_product_in_bfloat16_equal_the_float32_gather():
    from tidal.models.dlrm import _symmetric

    model = DLRM(F, D, DD)
    pairs = torch.randn(B, (F + 1) * F // 2) * torch.logspace(-20, 20, B).unsqueeze(1)
    gathered = _symmetric(pairs, model.pair_of, model.place)  # float32: the gather
    assert torch.equal(gathered.view(B, F + 1, F + 1), gathered.view(B, F + 1, F + 1).transpose(1, 2))
    assert torch.equal(_symmetric(pairs.bfloat16(), model.pair_of, model.place), gathered.bfloat16())


@pytest.mark.parametrize("kind", ["dlrm", "deepfm", "dcn", "wide_deep"])
@pytest.mark.parametrize("pooled_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_precision_trains_every_model_close_to_float32(kind, pooled_dtype):
    torch.manual_seed(0)
    model = RankingModel(ModelConfig(kind=kind), num_features=F, dim=D, dense_features=DD, num_targets=T)
    pooled, dense = _inputs(3)
    results = {}
    for precision in ("float32", "bfloat16"):
        leaf = pooled.detach().to(pooled_dtype if precision == "bfloat16" else torch.float32).requires_grad_(True)
        model.zero_grad()
        with compute_precision(torch.device("cpu"), precision):
            logits = model(leaf, dense)
        assert logits.dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)  # products ran in it
        logits.float().sum().backward()
        assert leaf.grad.dtype == leaf.dtype  # the gradient goes back in the dtype the rows came in
        results[precision] = logits.float(), leaf.grad.float(), [p.grad.clone() for p in model.parameters()]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    (logits32, grad32, params32), (logits16, grad16, params16) = results["float32"], results["bfloat16"]
    for ours, theirs in [(logits16, logits32), (grad16, grad32), *zip(params16, params32)]:
        assert (ours - theirs).norm() <= 0.05 * theirs.norm() + 1e-6  # bfloat16 keeps 8 bits of mantissa


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        compute_precision(torch.device("cpu"), "float8")


def test_deepfm_second_order_term_sums_pairwise_products():
    model = DeepFM(F, D, DD, deep_sizes=[5])
    pooled, dense = _inputs(2)
    pairs = sum((pooled[:, i] * pooled[:, j]).sum(1) for i in range(F) for j in range(i + 1, F))
    torch.testing.assert_close(model(pooled, dense)[:, 5], pairs)


def test_mmoe_gates_are_distributions_over_experts():
    head = MMoEHead(6, 3, experts=5, expert_sizes=[4], tower_sizes=[2])
    weights = head.gate_weights(torch.randn(B, 6))
    assert weights.shape == (B, 3, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, 3))
    assert head(torch.randn(B, 6)).shape == (B, 3)


def test_invalid_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="num_targets"):
        RankingModel(ModelConfig(), num_features=F, dim=D, dense_features=DD, num_targets=0)
    with pytest.raises(ConfigError, match=r"needs whole numbers.*got \{'num_features': 2\.5\}"):  # was a bare TypeError
        RankingModel(ModelConfig(), num_features=2.5, dim=D, dense_features=DD, num_targets=1)
    with pytest.raises(ConfigError, match=r"hidden_sizes\.0: Input should be greater than 0"):
        ModelConfig(hidden_sizes=[0])


@pytest.mark.parametrize("kind", ["dlrm", "deepfm", "dcn", "wide_deep"])
@pytest.mark.parametrize("pooled_shape, dense_shape", [((B, D, F), (B, DD)), ((B, F, D), (B, DD + 1)),
                                                       ((B, F, D), (B + 1, DD)), ((B, F * D), (B, DD))])
def test_inputs_of_the_wrong_shape_are_refused_naming_the_expected_ones(kind, pooled_shape, dense_shape):
    model = RankingModel(ModelConfig(kind=kind), num_features=F, dim=D, dense_features=DD, num_targets=T)
    with pytest.raises(BatchError, match=rf"expected pooled \[B, {F}, {D}\] and dense \[B, {DD}\], got"):
        model(torch.zeros(pooled_shape), torch.zeros(dense_shape))


@pytest.mark.parametrize(("pooled_dtype", "dense_dtype"), [(torch.float64, torch.float32), (torch.float32, torch.int64)])
def test_inputs_of_another_type_are_refused_naming_theirs(pooled_dtype, dense_dtype):
    model = RankingModel(ModelConfig(), num_features=F, dim=D, dense_features=DD, num_targets=T)
    with pytest.raises(BatchError, match=rf"expected pooled and dense of float32 \(or bfloat16, float16\), got "
                                         rf"{pooled_dtype} and {dense_dtype}"):
        model(torch.zeros(B, F, D, dtype=pooled_dtype), torch.zeros(B, DD, dtype=dense_dtype))


def test_a_dict_where_a_model_config_goes_is_refused_naming_the_class():
    with pytest.raises(ConfigError, match=r"RankingModel: config: expected ModelConfig, got dict; build one with ModelConfig"):
        RankingModel({"kind": "dlrm"}, num_features=F, dim=D, dense_features=DD, num_targets=T)
