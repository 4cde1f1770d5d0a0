"""Learned group convolution and its conversion to a deploy model (CondenseNet, Huang et al., arXiv:1711.09224).

A ``LearnedGroupConv`` is BN-ReLU-Conv1x1 whose convolution is dense during training, multiplied by a 0/1 ``mask``.
Its ``out_channels`` outputs form ``groups`` groups, and group ``i`` owns the interleaved output channels
``i, i + G, i + 2G, ...`` (this interleaving is CondenseNet's built-in channel permutation). During the first half of
training the layer goes through ``C - 1`` condensing stages (``C`` = condensation factor); each stage removes, in every
group, the ``in_channels // C`` still-connected input channels of lowest L1 importance (sum of |w| over the group's
outputs). After the last stage every group reads only ``in_channels - (C - 1) · (in_channels // C)`` inputs
(``in_channels / C`` when divisible), so the layer is a real group convolution on a selection of input channels.

The schedule is driven by an explicit training progress in [0, 1] (``layer.update(progress=...)`` or
``apply_condensation(model, progress=...)``); the mask and the number of stages applied are buffers, so a
``state_dict`` taken mid-condensation resumes exactly. Pruning is deterministic given the weights, so data-parallel
replicas that hold identical weights prune identically.

``convert(model)`` replaces every fully condensed ``LearnedGroupConv`` by a ``CondensedGroupConv``: index-select of the
surviving inputs, BN on those channels only, ReLU, a grouped 1×1 convolution (one batched GEMM) and a channel shuffle
back to the interleaved order (thin, memory-bound layers: a dense 1×1 convolution with the pruned weights at zero);
the batch norm that follows each such layer is folded into it. Its outputs equal the training form's in eval mode.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def condensing_stage(*, progress: float, condense_factor: int) -> int:
    """The number of condensing stages that should have been applied at ``progress`` (fraction of training done).

    Stage ``s`` starts at progress ``s / (2 (C - 1))``: ``C - 1`` equal steps over the first half of training, and the
    last one (stage ``C - 1``) exactly at progress 0.5. Returns an int in [0, C - 1].
    """
    if not (isinstance(progress, (int, float)) and math.isfinite(progress) and 0.0 <= progress <= 1.0):
        raise ValueError(f"training progress must be a number in [0, 1] (fraction of training done), got {progress!r}")
    if condense_factor <= 1:
        return 0
    return min(condense_factor - 1, int(math.floor(progress * 2 * (condense_factor - 1))))


class LearnedGroupConv(nn.Module):
    """BN-ReLU-(dropout)-Conv1x1 with learned groups: (N, in_channels, H, W) -> (N, out_channels, H, W).

    Args:
        in_channels, out_channels: channel counts; ``out_channels`` must be a multiple of ``groups``.
        groups: G, the number of groups the outputs are split into (group i = output channels i::G).
        condense_factor: C; each group finally keeps about 1/C of the inputs, after C - 1 condensing stages.
        dropout_rate: dropout on the normalised input during training (CondenseNet's ImageNet recipe uses 0).

    Buffers (in ``state_dict``):
        mask: (out_channels, in_channels) float 0/1, rows of one group are identical.
        stage: () int64, the number of condensing stages applied so far (0 .. C - 1).
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, groups: int, condense_factor: int, dropout_rate: float = 0.0
    ):
        super().__init__()
        if in_channels < 1 or out_channels < 1 or groups < 1 or condense_factor < 1:
            raise ValueError(
                f"LearnedGroupConv needs positive sizes, got in_channels={in_channels}, out_channels={out_channels}, "
                f"groups={groups}, condense_factor={condense_factor}"
            )
        if out_channels % groups:
            raise ValueError(
                f"LearnedGroupConv: out_channels={out_channels} must be a multiple of groups={groups} (each group owns "
                "out_channels / groups outputs)"
            )
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"LearnedGroupConv: dropout_rate must be in [0, 1), got {dropout_rate}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.condense_factor = condense_factor
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        self.register_buffer("mask", torch.ones(out_channels, in_channels))
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    @property
    def drop_per_stage(self) -> int:
        """Inputs removed from every group at each condensing stage: in_channels // C."""
        return self.in_channels // self.condense_factor

    @property
    def kept_per_group(self) -> int:
        """Inputs every group keeps once condensation is finished."""
        return self.in_channels - (self.condense_factor - 1) * self.drop_per_stage

    @property
    def finished(self) -> bool:
        """True once all C - 1 condensing stages have been applied."""
        return int(self.stage) >= self.condense_factor - 1

    def group_mask(self) -> torch.Tensor:
        """(G, in_channels) 0/1: which inputs each group still reads."""
        return self.mask[: self.groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.relu(self.norm(x)))
        return F.conv2d(x, self.weight * self.mask[:, :, None, None].to(self.weight.dtype))

    @torch.no_grad()
    def update(self, *, progress: float) -> int:
        """Apply every condensing stage due at ``progress`` (fraction of training done, in [0, 1]).

        Stages already applied are not repeated, and going back in progress never restores connections. Returns the
        number of stages applied by this call.
        """
        target = condensing_stage(progress=progress, condense_factor=self.condense_factor)
        applied = 0
        while int(self.stage) < target:
            self._condense_one_stage()
            applied += 1
        return applied

    @torch.no_grad()
    def finish(self) -> int:
        """Apply every remaining condensing stage (what reaching progress 0.5 does). Returns how many were applied."""
        return self.update(progress=1.0)

    @torch.no_grad()
    def _condense_one_stage(self) -> None:
        """Remove, in every group, the ``in_channels // C`` connected inputs of lowest L1 importance."""
        g, d_out = self.groups, self.out_channels // self.groups
        delta = self.drop_per_stage
        if delta > 0:
            weight = (self.weight[:, :, 0, 0] * self.mask).abs().float()
            # row k·G + i belongs to group i: (d_out, G, in) -> importance of input j for group i, (G, in)
            importance = weight.view(d_out, g, self.in_channels).sum(0)
            alive = self.group_mask() > 0
            # already-removed inputs must never be picked again, even if a live input has exactly zero weight
            importance = importance.masked_fill(~alive, math.inf)
            drop = torch.topk(importance, delta, dim=1, largest=False).indices  # (G, delta)
            group_mask = alive.to(self.mask.dtype).scatter(1, drop, 0.0)
            self.mask.copy_(group_mask.repeat(d_out, 1))
        self.stage += 1
        logger.debug(
            "LearnedGroupConv %d->%d: condensing stage %d applied", self.in_channels, self.out_channels, int(self.stage)
        )

    def group_lasso(self) -> torch.Tensor:
        """Group-lasso penalty () over (group, input) pairs: Σ_i Σ_j ||W[group i, input j]||_2 on live connections.

        Drives whole input channels of a group towards zero so that pruning removes little. Zero (and without
        gradient) once condensation is finished, as in CondenseNet.
        """
        if self.finished:
            return self.weight.new_zeros(())
        d_out = self.out_channels // self.groups
        squared = (self.weight[:, :, 0, 0] * self.mask).pow(2).view(d_out, self.groups, self.in_channels).sum(0)
        # clamp keeps sqrt's gradient finite at 0; removed pairs are multiplied out
        return (squared.clamp(min=1e-12).sqrt() * self.group_mask()).sum()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, groups={self.groups}, condense_factor={self.condense_factor}, "
            f"stage={int(self.stage)}"
        )


# A deploy layer uses the index-select + grouped GEMM form only where the multiply-adds it saves outweigh the two
# extra passes over memory it costs (the index-select of its inputs, the channel shuffle of its outputs): FLOPs saved
# per byte of that extra traffic (float32). Thin early layers (few channels on large feature maps, memory-bound on a
# CPU) run faster as one dense 1×1 convolution with the pruned weights set to zero; measured on a 2-core x86 CPU with
# one thread, CondenseNet-74's first block is below 4 and every later block above (bench/condensenet.py).
GROUPED_MIN_FLOPS_PER_BYTE = 4.0


class CondensedGroupConv(nn.Module):
    """Deploy form of a finished ``LearnedGroupConv``: (N, in_channels, H, W) -> (N, out_channels, H, W).

    Two equivalent forms, chosen per layer by ``from_learned`` (see ``GROUPED_MIN_FLOPS_PER_BYTE``):

    - ``"grouped"``: index-select of the G · k surviving inputs (k per group; an input read by several groups is
      selected several times) -> BN on those channels -> ReLU -> grouped 1×1 convolution as one batched GEMM
      (``weight`` (G, d_out, k), d_out = out_channels / G) -> channel shuffle from group-major order (i · d_out + r) back
      to the interleaved order (r · G + i) of the training form.
    - ``"dense"``: BN on all inputs -> ReLU -> a dense 1×1 convolution whose pruned weights are zero (``weight``
      (out_channels, in_channels), rows in the interleaved order: no shuffle needed).

    ``bias`` (out_channels,) is zero unless the batch norm that follows the layer in eval mode was folded in
    (``fold_output_norm``): then the output is that batch norm's output. ``output_relu`` (set by the deploy fusion when
    a ReLU follows) applies that ReLU too, inside the shuffle's copy.
    """

    def __init__(self, *, in_channels: int, out_channels: int, groups: int, kept_per_group: int, form: str = "grouped"):
        super().__init__()
        if form not in ("grouped", "dense"):
            raise ValueError(f"CondensedGroupConv: form must be 'grouped' or 'dense', got {form!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.kept_per_group = kept_per_group
        self.form = form
        selected = groups * kept_per_group if form == "grouped" else in_channels
        self.register_buffer("index", torch.arange(selected, dtype=torch.long))
        self.norm = nn.BatchNorm2d(selected)
        self.relu = nn.ReLU(inplace=True)
        shape = (groups, out_channels // groups, kept_per_group) if form == "grouped" else (out_channels, in_channels)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.output_relu = False  # set by the deploy fusion when a ReLU follows (see fold_output_norm)

    @classmethod
    @torch.no_grad()
    def from_learned(cls, layer: LearnedGroupConv, *, form: str | None = None) -> CondensedGroupConv:
        """Build the deploy layer with the same eval-mode outputs as a finished ``layer``.

        ``form=None`` picks ``"grouped"`` when it saves at least ``GROUPED_MIN_FLOPS_PER_BYTE`` FLOPs per byte of its
        extra memory traffic, else ``"dense"``.
        """
        if not layer.finished:
            raise ValueError(
                f"cannot convert {layer.extra_repr()!r}: condensation is at stage {int(layer.stage)} of "
                f"{layer.condense_factor - 1}; call finish_condensation(model) first"
            )
        g, d_out = layer.groups, layer.out_channels // layer.groups
        alive = layer.group_mask() > 0  # (G, in)
        kept = alive.sum(1)
        if not bool((kept == layer.kept_per_group).all()):
            raise ValueError(
                f"cannot convert {layer.extra_repr()!r}: groups keep {kept.tolist()} inputs, expected "
                f"{layer.kept_per_group} each; the mask buffer is inconsistent (was it edited by hand?)"
            )
        k = layer.kept_per_group
        if form is None:
            saved_flops = 2 * layer.out_channels * (layer.in_channels - k)  # per output pixel
            extra_bytes = 4 * 2 * (g * k + layer.out_channels)  # index-select and shuffle: read + write, float32
            form = "grouped" if saved_flops >= GROUPED_MIN_FLOPS_PER_BYTE * extra_bytes else "dense"
        out = cls(in_channels=layer.in_channels, out_channels=layer.out_channels, groups=g, kept_per_group=k, form=form)
        out = out.to(device=layer.weight.device, dtype=layer.weight.dtype)
        if form == "dense":
            out.weight.copy_(layer.weight[:, :, 0, 0] * layer.mask)
        else:
            # stable sort puts each group's surviving inputs first, in increasing channel order
            per_group = torch.sort((~alive).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # (G, k)
            out.index.copy_(per_group.reshape(-1))
            # training-form weight row r·G + i is output r of group i: (d_out, G, in) -> (G, d_out, in)
            weight = layer.weight[:, :, 0, 0].view(d_out, g, layer.in_channels).transpose(0, 1)
            out.weight.copy_(torch.gather(weight, 2, per_group[:, None, :].expand(g, d_out, k)))  # (G, d_out, k)
        src, dst, idx = layer.norm, out.norm, out.index
        dst.weight.copy_(src.weight[idx])
        dst.bias.copy_(src.bias[idx])
        dst.running_mean.copy_(src.running_mean[idx])
        dst.running_var.copy_(src.running_var[idx])
        dst.num_batches_tracked.copy_(src.num_batches_tracked)
        dst.eps, dst.momentum = src.eps, src.momentum
        return out

    @torch.no_grad()
    def fold_output_norm(self, norm: nn.BatchNorm2d) -> None:
        """Fold the eval-mode batch norm applied to this layer's output into its weights and bias: afterwards the
        layer outputs ``norm(layer(x))`` and ``norm`` can be dropped (it must then no longer be trained)."""
        if norm.num_features != self.out_channels or not norm.track_running_stats:
            raise ValueError(f"cannot fold {norm} into a layer with {self.out_channels} outputs")
        scale = norm.running_var.add(norm.eps).rsqrt()
        if norm.affine:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale + (norm.bias if norm.affine else 0.0)
        if self.form == "dense":
            self.weight.mul_(scale[:, None])
        else:  # output r·G + i is row r of group i
            self.weight.mul_(scale.view(-1, self.groups).t()[:, :, None])
        self.bias.copy_(self.bias * scale + shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "dense":
            y = F.conv2d(self.relu(self.norm(x)), self.weight[:, :, None, None], self.bias)
            return torch.relu_(y) if self.output_relu else y
        n, _, h, w = x.shape
        g, d_out, k = self.weight.shape
        # Select the surviving inputs channel-major, (G·k, N, H·W), so that each group is one GEMM over the whole batch;
        # eval-mode BN is per channel, so it runs on that layout viewed as (1, G·k, N, H·W).
        x = x.view(n, -1, h * w).transpose(0, 1).index_select(0, self.index)
        x = self.relu(self.norm(x.view(1, g * k, n, h * w)))
        y = torch.baddbmm(self.bias.view(d_out, g).t().unsqueeze(-1), self.weight, x.view(g, k, n * h * w))
        # (G, d_out, N, H·W) group-major -> (N, d_out, G, H·W): output r·G + i is output r of group i
        shuffled = y.view(g, d_out, n, h * w).permute(2, 1, 0, 3)
        if self.output_relu and not torch.is_grad_enabled():  # shuffle and the following ReLU in one pass (out= has
            out = y.new_empty(n, d_out, g, h * w)  # no autograd: inference only, as the deploy model is meant for)
            torch.clamp_min(shuffled, 0.0, out=out)
            return out.view(n, self.out_channels, h, w)
        y = shuffled.reshape(n, self.out_channels, h, w)
        return torch.relu(y) if self.output_relu else y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, groups={self.groups}, kept_per_group={self.kept_per_group}, "
            f"form={self.form}"
        )


def learned_group_convs(model: nn.Module) -> list[LearnedGroupConv]:
    """Every ``LearnedGroupConv`` in ``model`` (including ``model`` itself), in module order."""
    return [m for m in model.modules() if isinstance(m, LearnedGroupConv)]


def _require_learned(model: nn.Module, what: str) -> list[LearnedGroupConv]:
    layers = learned_group_convs(model)
    if not layers:
        raise ValueError(
            f"{what}: {type(model).__name__} has no LearnedGroupConv layers; only CondenseNet-style models condense "
            "(check with learned_group_convs(model) first)"
        )
    return layers


def apply_condensation(model: nn.Module, *, progress: float) -> int:
    """Bring every learned group convolution of ``model`` to the stage due at ``progress`` ∈ [0, 1].

    Call once per epoch (or step) with the fraction of training done. Returns the number of layer-stages applied.
    """
    applied = sum(layer.update(progress=progress) for layer in _require_learned(model, "apply_condensation"))
    if applied:
        logger.info("condensation at progress %.3f: %d layer-stages applied", progress, applied)
    return applied


def finish_condensation(model: nn.Module) -> int:
    """Apply every remaining condensing stage of every learned group convolution. Returns layer-stages applied."""
    return sum(layer.finish() for layer in _require_learned(model, "finish_condensation"))


def group_lasso_loss(model: nn.Module) -> torch.Tensor:
    """Unscaled group-lasso penalty () summed over the model's learned group convolutions.

    Multiply by the regularisation strength (CondenseNet's ImageNet recipe: 1e-5) and add to the training loss.
    """
    layers = _require_learned(model, "group_lasso_loss")
    return torch.stack([layer.group_lasso() for layer in layers]).sum()


def convert(model: nn.Module) -> nn.Module:
    """Deploy copy of ``model`` (in eval mode) with every ``LearnedGroupConv`` replaced by a ``CondensedGroupConv``.

    Every learned group convolution must be finished (``finish_condensation(model)``); ``model`` is not modified.
    The copy's eval-mode outputs equal ``model``'s up to float rounding.
    """
    _require_learned(model, "convert")
    if isinstance(model, LearnedGroupConv):
        return CondensedGroupConv.from_learned(model).eval()
    deploy = copy.deepcopy(model)
    for name, module in list(deploy.named_modules()):
        if isinstance(module, LearnedGroupConv):
            parent_name, _, child = name.rpartition(".")
            parent = deploy.get_submodule(parent_name) if parent_name else deploy
            try:
                setattr(parent, child, CondensedGroupConv.from_learned(module))
            except ValueError as err:
                raise ValueError(f"convert: layer {name!r}: {err}") from None
    # Modules that know their deploy form fuse it (CondenseNet's DenseLayer: the 3×3 branch's batch norm goes into the
    # 1×1's weights and bias; CondenseNet: dense blocks write into one buffer instead of concatenating per layer).
    for module in list(deploy.modules()):
        fuse = getattr(module, "fuse_for_deploy", None)
        if callable(fuse):
            fuse()
    return deploy.eval()
