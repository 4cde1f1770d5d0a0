"""ResNet-50 (torchvision's) as a re-ID backbone with the ID-CondenseNet head: the field's reference point.

Layout: torchvision's ``resnet50`` up to ``layer4`` (its ``avgpool`` and ``fc`` dropped), then the same head as
``CondenseNet`` (``reid_core/models/condensenet.py``): adaptive average pooling, the feature layer (Linear + BatchNorm1d,
the retrieval feature), optional BNNeck, and the (N+1)-way classifier whose last class is the distractor class.
``last_stride=1`` sets ``layer4``'s stride to 1 (Luo et al., 2019: 16×8 instead of 8×4 at 256×128).

The backbone's ``state_dict`` keys are torchvision's with a ``backbone.`` prefix, so an ImageNet checkpoint of
torchvision loads with ``reid_core.models.pretrained`` (no weights are fetched here).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from reid_core.models import register_model


class ResNet50ReID(nn.Module):
    """ResNet-50 re-ID model: image (N, 3, H, W) -> logits (N, num_classes + 1); the ``CondenseNet`` interface
    (``forward_features``, ``forward_head``, ``forward_train``, ``num_classes``, ``distractor_class``)."""

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int = 512,
        dropout_rate: float = 0.0,
        bnneck: bool = False,
        last_stride: int = 2,
    ):
        super().__init__()
        from torchvision.models import resnet50

        if num_classes < 1:
            raise ValueError(f"ResNet50ReID: num_classes (real identities) must be >= 1, got {num_classes}")
        if last_stride not in (1, 2):
            raise ValueError(f"ResNet50ReID: last_stride must be 1 or 2, got {last_stride}")
        net = resnet50(weights=None)
        if last_stride == 1:
            net.layer4[0].conv2.stride = (1, 1)
            net.layer4[0].downsample[0].stride = (1, 1)
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        self.backbone = nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))
        self.num_classes = num_classes
        self.distractor_class = num_classes
        self.feature_dim = feature_dim
        self.num_features = 2048
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature = nn.Sequential(nn.Linear(self.num_features, feature_dim, bias=False), nn.BatchNorm1d(feature_dim))
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.classifier = nn.Linear(feature_dim, num_classes + 1, bias=not bnneck)
        self.bnneck = bnneck
        nn.init.normal_(self.feature[0].weight, 0.0, 0.01)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        if self.classifier.bias is not None:
            nn.init.zeros_(self.classifier.bias)
        if bnneck:
            self.feature[1].bias.requires_grad_(False)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> pooled backbone output (N, 2048)."""
        return self.pool(self.backbone(x)).flatten(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> retrieval feature (N, feature_dim), not normalised (L2-normalise for matching)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet50ReID expects images of shape (N, 3, H, W), got {list(x.shape)}")
        return self.feature(self.forward_backbone(x))

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return f if pre_logits else self.classifier(self.dropout(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (metric feature, logits), as ``CondenseNet.forward_train``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet50ReID expects images of shape (N, 3, H, W), got {list(x.shape)}")
        pre = self.feature[0](self.forward_backbone(x))
        post = self.feature[1](pre)
        return (pre if self.bnneck else post), self.forward_head(post)

    def get_classifier(self) -> nn.Linear:
        return self.classifier


def _check_resnet_size(image_size: tuple[int, int]) -> None:
    h, w = image_size
    if min(h, w) < 32:
        raise ValueError(f"resnet50 needs sides of at least 32 px (5 halvings), got {h}×{w}")


@register_model("resnet50", role="reid", check_size=_check_resnet_size)
def resnet50_reid(
    *, num_classes: int, feature_dim: int = 512, dropout_rate: float = 0.0, bnneck: bool = False, last_stride: int = 2
) -> ResNet50ReID:
    """torchvision ResNet-50 backbone + the re-ID head (2048 pooled channels)."""
    return ResNet50ReID(
        num_classes=num_classes, feature_dim=feature_dim, dropout_rate=dropout_rate, bnneck=bnneck,
        last_stride=last_stride,
    )  # fmt: skip
