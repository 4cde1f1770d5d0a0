"""Learned group convolution: condensing schedule, L1 pruning, group lasso, resume, conversion to the deploy form."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from reid_core.models import build_model
from reid_core.models.condense import (
    CondensedGroupConv,
    LearnedGroupConv,
    apply_condensation,
    condensing_stage,
    convert,
    finish_condensation,
    group_lasso_loss,
    learned_group_convs,
)


def randomise_batch_norm(model: nn.Module, *, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))


def tiny_condensenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("condensenet_tiny", num_classes=5)


def test_schedule_spreads_c_minus_1_stages_over_the_first_half():
    stages = [condensing_stage(progress=p, condense_factor=4) for p in (0.0, 0.16, 0.17, 0.33, 0.34, 0.49, 0.5, 1.0)]
    assert stages == [0, 0, 1, 1, 2, 2, 3, 3]
    assert condensing_stage(progress=0.9, condense_factor=1) == 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="progress"):
            condensing_stage(progress=bad, condense_factor=4)


def test_each_stage_drops_the_lowest_l1_inputs_of_every_group():
    torch.manual_seed(0)
    layer = LearnedGroupConv(8, 6, groups=2, condense_factor=4)  # drops 8 // 4 = 2 inputs per group per stage
    weight = layer.weight.detach()[:, :, 0, 0]
    # group i owns output rows i, i + 2, i + 4 (interleaved)
    importance = torch.stack([weight[i::2].abs().sum(0) for i in range(2)])  # (G, in)
    order = importance.argsort(dim=1)

    assert layer.update(progress=0.2) == 1
    gm = layer.group_mask()
    for i in range(2):
        assert set(torch.nonzero(gm[i] == 0).flatten().tolist()) == set(order[i, :2].tolist())
        assert torch.equal(layer.mask[i::2], gm[i].expand(3, 8))  # every row of a group has the group's mask

    assert layer.update(progress=0.4) == 1
    for i in range(2):
        assert set(torch.nonzero(layer.group_mask()[i] == 0).flatten().tolist()) == set(order[i, :4].tolist())

    assert layer.finish() == 1
    assert layer.finished and int(layer.stage) == 3
    assert layer.group_mask().sum(1).tolist() == [2.0, 2.0] == [float(layer.kept_per_group)] * 2


def test_update_never_repeats_or_undoes_a_stage():
    layer = LearnedGroupConv(8, 4, groups=2, condense_factor=4)
    assert layer.update(progress=0.4) == 2
    mask = layer.mask.clone()
    assert layer.update(progress=0.4) == 0
    assert layer.update(progress=0.1) == 0
    assert torch.equal(layer.mask, mask)
    with pytest.raises(ValueError, match="progress"):
        layer.update(progress=2.0)


def test_removed_connections_have_no_effect_and_no_gradient():
    torch.manual_seed(1)
    layer = LearnedGroupConv(8, 4, groups=2, condense_factor=2)
    layer.finish()
    x = torch.randn(3, 8, 5, 5)
    y = layer(x)
    removed = layer.mask == 0
    assert removed.any()
    with torch.no_grad():
        layer.weight[:, :, 0, 0][removed] += 100.0
    assert torch.allclose(layer(x), y)
    layer(x).square().sum().backward()
    grad = layer.weight.grad[:, :, 0, 0]
    assert torch.all(grad[removed] == 0) and torch.all(grad[~removed] != 0)


def test_group_lasso_penalises_live_connections_until_condensation_ends():
    model = tiny_condensenet()
    penalty = group_lasso_loss(model)
    assert penalty.ndim == 0 and penalty.item() > 0
    penalty.backward()
    for layer in learned_group_convs(model):
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
        assert layer.weight.grad.abs().sum() > 0
    # the sum of the per-layer penalties, each Σ over (group, input) of the L2 norm of the group's weights
    layer = learned_group_convs(model)[0]
    d_out = layer.out_channels // layer.groups
    w = layer.weight.detach()[:, :, 0, 0].view(d_out, layer.groups, layer.in_channels)
    assert torch.isclose(layer.group_lasso(), w.pow(2).sum(0).sqrt().sum())
    apply_condensation(model, progress=0.2)
    assert group_lasso_loss(model).item() < penalty.item()  # removed connections no longer count
    finish_condensation(model)
    assert group_lasso_loss(model).item() == 0.0


def test_masks_and_stage_survive_a_state_dict_round_trip_mid_condensation():
    model = tiny_condensenet(seed=0)
    assert model.apply_condensation(0.2) > 0  # stage 1 of 3
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)

    resumed = tiny_condensenet(seed=123)  # different weights, fresh masks
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(learned_group_convs(model), learned_group_convs(resumed), strict=True):
        assert int(b.stage) == int(a.stage) == 1
        assert torch.equal(a.mask, b.mask) and (b.mask == 0).any()
    assert resumed.apply_condensation(0.2) == 0  # the stage already applied is not repeated after resume

    # continuing after resume prunes exactly as continuing without interruption
    model.apply_condensation(0.45)
    resumed.apply_condensation(0.45)
    for a, b in zip(learned_group_convs(model), learned_group_convs(resumed), strict=True):
        assert int(b.stage) == 2 and torch.equal(a.mask, b.mask)


def test_convert_after_finish_gives_equal_outputs_and_fewer_parameters():
    model = tiny_condensenet()
    randomise_batch_norm(model, seed=0)
    model.apply_condensation(0.3)
    finish_condensation(model)
    model.eval()
    deploy = convert(model)

    assert not learned_group_convs(deploy) and learned_group_convs(model)  # the trained model is left as it was
    condensed = [m for m in deploy.modules() if isinstance(m, CondensedGroupConv)]
    assert len(condensed) == len(learned_group_convs(model))
    assert all(m.groups == 4 and m.form in ("grouped", "dense") for m in condensed)
    assert not deploy.training

    x = torch.randn(3, 3, 32, 16)
    with torch.no_grad():
        assert torch.allclose(deploy.forward_features(x), model.forward_features(x), atol=1e-5)
        assert torch.allclose(deploy(x), model(x), atol=1e-5)
    params = sum(p.numel() for p in model.parameters())
    deploy_params = sum(p.numel() for p in deploy.parameters())
    assert deploy_params < params


@pytest.mark.parametrize("form", ["grouped", "dense"])
@pytest.mark.parametrize(
    ("in_channels", "out_channels", "groups", "condense_factor"), [(12, 8, 4, 4), (10, 6, 2, 3), (7, 4, 4, 2)]
)
def test_single_layer_conversion_matches_including_uneven_sizes(
    in_channels, out_channels, groups, condense_factor, form
):
    torch.manual_seed(2)
    layer = LearnedGroupConv(in_channels, out_channels, groups=groups, condense_factor=condense_factor)
    randomise_batch_norm(layer, seed=3)
    layer.finish()
    layer.eval()
    deploy = CondensedGroupConv.from_learned(layer, form=form).eval()
    if form == "grouped":
        assert deploy.index.numel() == groups * layer.kept_per_group
        assert deploy.weight.shape == (groups, out_channels // groups, layer.kept_per_group)
    else:  # the pruned connections are zeros of the dense weight
        assert int((deploy.weight != 0).sum()) == out_channels * layer.kept_per_group
    x = torch.randn(2, in_channels, 4, 3)
    with torch.no_grad():
        assert torch.allclose(deploy(x), layer(x), atol=1e-5)
        # a following batch norm folded into the layer gives the same output as applying it
        norm = nn.BatchNorm2d(out_channels).eval()
        randomise_batch_norm(norm, seed=4)
        expected = norm(layer(x))
        deploy.fold_output_norm(norm)
        assert torch.allclose(deploy(x), expected, atol=1e-5)


def test_conversion_picks_the_grouped_form_where_it_saves_more_than_it_copies():
    thin = LearnedGroupConv(16, 32, groups=4, condense_factor=4)  # CondenseNet-74's first layer: memory-bound
    wide = LearnedGroupConv(400, 256, groups=4, condense_factor=4)  # a third-block layer: compute-bound
    for layer in (thin, wide):
        layer.finish()
    assert convert(thin).form == "dense" and convert(wide).form == "grouped"
    with pytest.raises(ValueError, match="form must be"):
        CondensedGroupConv.from_learned(thin, form="sparse")


def test_convert_refuses_unfinished_condensation_and_models_without_learned_layers():
    model = tiny_condensenet()
    model.apply_condensation(0.2)
    with pytest.raises(ValueError, match="finish_condensation"):
        convert(model)
    dual = build_model("dual_stream_tiny", num_classes=3)
    for fn in (convert, finish_condensation, group_lasso_loss):
        with pytest.raises(ValueError, match="no LearnedGroupConv"):
            fn(dual)
    with pytest.raises(ValueError, match="no LearnedGroupConv"):
        apply_condensation(dual, progress=0.1)


def test_invalid_layer_sizes_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="multiple of groups"):
        LearnedGroupConv(8, 6, groups=4, condense_factor=4)
    with pytest.raises(ValueError, match="positive"):
        LearnedGroupConv(0, 4, groups=2, condense_factor=2)


def test_converted_model_is_scriptable_for_export():
    model = tiny_condensenet()
    finish_condensation(model)
    model.eval()
    deploy = convert(model)
    with warnings.catch_warnings():  # torch.jit.script is deprecated in favour of torch.export but still works
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(deploy)
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.allclose(scripted.forward_features(x), deploy.forward_features(x), atol=1e-6)


@pytest.mark.parametrize("min_flops_per_byte", [0.0, 1e9])  # every layer grouped / every layer dense
def test_deploy_fusions_keep_the_outputs_with_and_without_autograd(monkeypatch, min_flops_per_byte):
    import reid_core.models.condense as condense
    from reid_core.models.condensenet import DenseLayer, DeployDenseBlock

    monkeypatch.setattr(condense, "GROUPED_MIN_FLOPS_PER_BYTE", min_flops_per_byte)
    model = tiny_condensenet()
    randomise_batch_norm(model, seed=5)
    finish_condensation(model)
    model.eval()
    deploy = convert(model)
    form = "grouped" if min_flops_per_byte == 0.0 else "dense"
    layers = [m for m in deploy.modules() if isinstance(m, CondensedGroupConv)]
    assert layers and all(m.form == form and m.output_relu for m in layers)
    # the blocks write into one buffer; each 3×3 branch lost its batch norm and ReLU to the 1×1 before it
    assert [type(m) for m in deploy.blocks] == [DeployDenseBlock, nn.AvgPool2d, DeployDenseBlock]
    assert all(isinstance(m.conv_2[0], nn.Identity) and isinstance(m.conv_2[1], nn.Identity)
               for m in deploy.modules() if isinstance(m, DenseLayer))  # fmt: skip
    x = torch.randn(3, 3, 32, 16)
    with torch.no_grad():
        expected = model.forward_features(x)
        assert torch.allclose(deploy.forward_features(x), expected, atol=1e-5)
    assert torch.allclose(deploy.forward_features(x), expected, atol=1e-5)  # the autograd path
