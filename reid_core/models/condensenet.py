"""ID-CondenseNet: CondenseNet (Huang et al., arXiv:1711.09224) as a person re-ID network.

Layout (the ImageNet CondenseNet, ``init_stride`` 2): a 3×3 stride-2 stem with 2·growth[0] channels, then dense
blocks separated by 2×2 average pooling (no compression: the growth rate increases instead). Each dense layer is a
``LearnedGroupConv`` 1×1 (in -> bottleneck·growth, G groups, condensation factor C) followed by BN-ReLU-Conv3×3 with G
groups (-> growth), whose output is concatenated to its input.

Re-ID decisions (docs/method.md §3): 256×128 inputs, BN-ReLU and adaptive average pooling after the last block, then a
feature layer (Linear + BatchNorm1d, the retrieval feature) and an (N+1)-way classifier whose last class,
``distractor_class = num_classes``, receives the synthesised distractor images.

At 256×128 the spatial sizes are 128×64 after the stem and 8×4 in the last block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from reid_core.models import register_model
from reid_core.models.condense import CondensedGroupConv, LearnedGroupConv, apply_condensation


class DenseLayer(nn.Module):
    """(N, in_channels, H, W) -> (N, in_channels + growth, H, W): learned group 1×1, group 3×3, concatenation."""

    def __init__(
        self,
        in_channels: int,
        *,
        growth: int,
        bottleneck: int,
        groups_1x1: int,
        groups_3x3: int,
        condense_factor: int,
        dropout_rate: float,
    ):
        super().__init__()
        width = bottleneck * growth
        if width % groups_3x3 or growth % groups_3x3:
            raise ValueError(
                f"DenseLayer: bottleneck·growth={width} and growth={growth} must be multiples of groups_3x3={groups_3x3}"
            )
        self.conv_1 = LearnedGroupConv(
            in_channels, width, groups=groups_1x1, condense_factor=condense_factor, dropout_rate=dropout_rate
        )
        self.conv_2 = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, growth, 3, padding=1, groups=groups_3x3, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv_2(self.conv_1(x))], 1)

    def fuse_for_deploy(self) -> None:
        """Called by ``convert`` on the deploy copy: fold the 3×3 branch's batch norm and ReLU into the condensed 1×1
        layer, which then outputs the activated, normalised features directly (two passes over the map less)."""
        if isinstance(self.conv_1, CondensedGroupConv) and isinstance(self.conv_2[0], nn.BatchNorm2d):
            self.conv_1.fold_output_norm(self.conv_2[0])
            self.conv_2[0] = nn.Identity()
            if isinstance(self.conv_2[1], nn.ReLU):
                self.conv_1.output_relu = True  # fused into the 1×1's channel shuffle
                self.conv_2[1] = nn.Identity()


class DeployDenseBlock(nn.Module):
    """Deploy form of consecutive dense layers: (N, in_channels, H, W) -> (N, in_channels + Σ growth, H, W).

    The training form concatenates at every layer, copying the whole growing feature map each time (quadratic in the
    block's depth); here every layer writes its new channels into one buffer allocated per block and reads the
    channels so far as a view of it. Same outputs, one copy of the block's input instead of one per layer.
    """

    def __init__(self, layers: Sequence[DenseLayer], *, in_channels: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.in_channels = in_channels
        self.out_channels = in_channels + sum(int(layer.conv_2[-1].out_channels) for layer in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out = x.new_empty(n, self.out_channels, h, w)
        out[:, :c] = x
        for layer in self.layers:  # TorchScript iterates a ModuleList only on its own
            new = layer.conv_2(layer.conv_1(out[:, :c]))
            out[:, c : c + new.shape[1]] = new
            c += new.shape[1]
        return out


class CondenseNet(nn.Module):
    """CondenseNet re-ID model: image (N, 3, H, W) -> logits (N, num_classes + 1).

    Args:
        num_classes: number of real identities; the classifier has one more output, the distractor class.
        stages: dense layers per block, e.g. (4, 6, 8, 10, 8).
        growth: growth rate per block (same length as ``stages``), e.g. (8, 16, 32, 64, 128).
        groups: G, groups of the learned 1×1 and of the 3×3 group convolutions.
        condense_factor: C, the learned 1×1 convolutions keep about 1/C of their inputs per group.
        bottleneck: width of the 1×1 output as a multiple of the growth rate.
        feature_dim: D, size of the retrieval feature.
        dropout_rate: dropout inside the learned group convolutions and before the classifier.
        bnneck: BNNeck (Luo et al., 2019): the feature layer's batch norm gets no bias (frozen at 0) and the classifier
            none; ``forward(x, return_features=True)`` gives the metric (triplet) feature *before* that batch norm.
            Off: the metric feature is the retrieval feature. Retrieval always uses the normalised feature.
        last_stride: 2 (ImageNet layout) or 1: the last block keeps its predecessor's resolution (no 2×2 pooling
            before it; 16×8 instead of 8×4 at 256×128).

    Any input size whose sides are at least 2^len(stages) works (adaptive pooling); the recipe uses 256×128.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        stages: Sequence[int],
        growth: Sequence[int],
        groups: int,
        condense_factor: int,
        bottleneck: int = 4,
        feature_dim: int = 512,
        dropout_rate: float = 0.0,
        bnneck: bool = False,
        last_stride: int = 2,
    ):
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"CondenseNet: last_stride must be 1 or 2, got {last_stride}")
        if num_classes < 1:
            raise ValueError(f"CondenseNet: num_classes (real identities) must be >= 1, got {num_classes}")
        if not stages or len(stages) != len(growth) or min(stages) < 1 or min(growth) < 1:
            raise ValueError(
                f"CondenseNet: stages {tuple(stages)} and growth {tuple(growth)} must be non-empty positive sequences "
                "of the same length (one entry per dense block)"
            )
        self.num_classes = num_classes
        self.distractor_class = num_classes
        self.feature_dim = feature_dim
        channels = 2 * growth[0]
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for i, (layers, rate) in enumerate(zip(stages, growth, strict=True)):
            if i > 0:
                last = i == len(stages) - 1
                blocks.append(nn.Identity() if last and last_stride == 1 else nn.AvgPool2d(2))
            for _ in range(layers):
                blocks.append(
                    DenseLayer(
                        channels,
                        growth=rate,
                        bottleneck=bottleneck,
                        groups_1x1=groups,
                        groups_3x3=groups,
                        condense_factor=condense_factor,
                        dropout_rate=dropout_rate,
                    )
                )
                channels += rate
        self.blocks = nn.Sequential(*blocks)
        self.num_features = channels  # pooled backbone output, before the feature layer
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        self.feature = nn.Sequential(nn.Linear(channels, feature_dim, bias=False), nn.BatchNorm1d(feature_dim))
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.classifier = nn.Linear(feature_dim, num_classes + 1, bias=not bnneck)
        self.bnneck = bnneck
        self._init_weights()
        if bnneck:
            self.feature[1].bias.requires_grad_(False)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> pooled backbone output (N, num_features)."""
        return self.final(self.blocks(self.stem(x))).flatten(1)

    @torch.jit.export  # callable on a scripted (exported) model
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> retrieval feature (N, feature_dim), not normalised (L2-normalise for matching)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"CondenseNet expects images of shape (N, 3, H, W), got {list(x.shape)}")
        return self.feature(self.forward_backbone(x))

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """feature (N, feature_dim) -> logits (N, num_classes + 1), or the feature itself if ``pre_logits``."""
        return f if pre_logits else self.classifier(self.dropout(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> logits (N, num_classes + 1); the last column is the distractor class."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (metric feature (N, feature_dim), logits (N, num_classes + 1)): the metric feature, for a triplet
        loss, is the feature before the feature layer's batch norm with ``bnneck``, else the retrieval feature."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"CondenseNet expects images of shape (N, 3, H, W), got {list(x.shape)}")
        pre = self.feature[0](self.forward_backbone(x))
        post = self.feature[1](pre)
        return (pre if self.bnneck else post), self.forward_head(post)

    def get_classifier(self) -> nn.Linear:
        return self.classifier

    def fuse_for_deploy(self) -> None:
        """Called by ``convert`` on the deploy copy: runs of dense layers become ``DeployDenseBlock``s (no per-layer
        concatenation)."""
        modules: list[nn.Module] = []
        run: list[DenseLayer] = []
        channels = int(self.stem.out_channels)
        for module in [*self.blocks, None]:
            if isinstance(module, DenseLayer):
                if not run:
                    start = channels
                run.append(module)
                channels += int(module.conv_2[-1].out_channels)
                continue
            if run:
                modules.append(DeployDenseBlock(run, in_channels=start))
                run = []
            if module is not None:
                modules.append(module)
        self.blocks = nn.Sequential(*modules)

    def apply_condensation(self, progress: float) -> int:
        """Apply the condensing stages due at ``progress`` (fraction of training done, in [0, 1])."""
        return apply_condensation(self, progress=progress)


def _min_side(side: int, name: str):
    """An input check: the stem halves the input and every block after the first halves it again."""

    def check(image_size: tuple[int, int]) -> None:
        h, w = image_size
        if min(h, w) < side:
            raise ValueError(f"{name} needs sides of at least {side} px, got {h}×{w}")

    return check


@register_model("condensenet74", role="reid", check_size=_min_side(32, "condensenet74"))
def condensenet74(
    *, num_classes: int, feature_dim: int = 512, dropout_rate: float = 0.0, bnneck: bool = False, last_stride: int = 2
) -> CondenseNet:
    """CondenseNet-74 (ImageNet recipe): stages 4-6-8-10-8, growth 8-16-32-64-128, G = C = 4; 2064 pooled channels."""
    return CondenseNet(
        num_classes=num_classes,
        stages=(4, 6, 8, 10, 8),
        growth=(8, 16, 32, 64, 128),
        groups=4,
        condense_factor=4,
        feature_dim=feature_dim,
        dropout_rate=dropout_rate,
        bnneck=bnneck,
        last_stride=last_stride,
    )


@register_model("condensenet_tiny", role="reid", check_size=_min_side(4, "condensenet_tiny"))
def condensenet_tiny(
    *, num_classes: int, feature_dim: int = 16, dropout_rate: float = 0.0, bnneck: bool = False, last_stride: int = 2
) -> CondenseNet:
    """Test variant: two blocks of two layers, growth 4-8, G = C = 4 (three condensing stages, as the full model)."""
    return CondenseNet(
        num_classes=num_classes,
        stages=(2, 2),
        growth=(4, 8),
        groups=4,
        condense_factor=4,
        feature_dim=feature_dim,
        dropout_rate=dropout_rate,
        bnneck=bnneck,
        last_stride=last_stride,
    )
