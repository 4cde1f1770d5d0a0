"""Dual-Stream CNN (Ponce-López et al., ECCV Workshops 2018): appearance and face streams with late fusion.

- Appearance stream: a modified LeNet-5 over the whole person image (64×64×3): blocks of Conv5×5-ReLU-MaxPool2 with
  batch norm after the pooling, then dropout and a fully connected embedding.
- Face stream (docs/method.md §4 decision): the same kind of small CNN over the face crop (dlib box or the dataset's face
  tag), learned in tandem; its embedding (128-d by default) is all zeros for images without a face.
- Face-presence head: a separate small CNN that scores whole person images, ``face_score(x) -> (N,) in [0, 1]``;
  trained with binary cross-entropy on face tags (``face_logit``), it is the differentiable face scorer F(x) of the
  GAN's ``critic`` guidance mode. It reads person images, not face crops, because generated images come without a
  crop; it is its own network so that its input (any image size, resized inside) does not constrain the streams.
- Late fusion: concatenation -> Linear -> BatchNorm1d -> ReLU (the fused feature, used for retrieval) -> dropout ->
  an (N+1)-way classifier whose last class, ``distractor_class = num_classes``, receives the synthesised distractors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reid_core.models import register_model


def lenet_trunk(channels: Sequence[int], *, in_channels: int = 3) -> nn.Sequential:
    """Blocks of Conv5×5 (same padding) -> ReLU -> MaxPool2 -> BatchNorm2d: (N, 3, S, S) -> (N, channels[-1], S/2^k, S/2^k)."""
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(in_channels, c, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.BatchNorm2d(c)]
        in_channels = c
    return nn.Sequential(*layers)


class ConvStream(nn.Module):
    """Modified LeNet-5 embedding: images (N, 3, S, S) -> (N, out_dim), ReLU outputs.

    ``image_size`` S must be a multiple of 2^len(channels); the flattened trunk output feeds dropout and a Linear.
    """

    def __init__(self, *, channels: Sequence[int], image_size: int, out_dim: int, dropout_rate: float):
        super().__init__()
        scale = 2 ** len(channels)
        if not channels or image_size % scale or image_size < scale:
            raise ValueError(
                f"ConvStream: image_size={image_size} must be a positive multiple of 2^len(channels)={scale} "
                f"(channels={tuple(channels)})"
            )
        self.image_size = image_size
        self.trunk = lenet_trunk(channels)
        side = image_size // scale
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout_rate),
            nn.Linear(channels[-1] * side * side, out_dim),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(
                f"ConvStream expects images of shape (N, 3, {size}, {size}), got {list(x.shape)}; resize the inputs "
                f"to {size}×{size}"
            )
        return self.embed(self.trunk(x))


class FacePresenceHead(nn.Module):
    """Person images (N, 3, H, W), any size -> face-presence logit (N,).

    The head looks at the top ``top_fraction`` of every image (the head region of a person crop; 1.0: the whole
    image), resized to ``image_size`` (rows, cols; an int for a square) with antialiased bilinear interpolation, which
    is differentiable, so generated images can be scored inside the GAN's loss.
    """

    def __init__(self, *, channels: Sequence[int], image_size: int | Sequence[int], top_fraction: float = 1.0):
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if len(size) != 2 or min(size) < 2 ** len(channels):
            raise ValueError(
                f"face-presence head: image_size must be (rows, cols) of at least 2^len(channels)={2 ** len(channels)} "
                f"px each; got {image_size!r}"
            )
        if isinstance(top_fraction, bool) or not isinstance(top_fraction, int | float) or not 0 < top_fraction <= 1:
            raise ValueError(f"face-presence head: top_fraction must be in (0, 1]; got {top_fraction!r}")
        self.image_size: tuple[int, int] = (size[0], size[1])
        self.top_fraction = float(top_fraction)
        self.trunk = lenet_trunk(channels)
        self.score = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 1))

    def region(self, x: torch.Tensor) -> torch.Tensor:
        """The part of ``x`` the head reads, (N, 3, rows, cols): its top ``top_fraction``, resized."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"face-presence head expects images of shape (N, 3, H, W), got {list(x.shape)}")
        rows, cols = self.image_size
        if self.top_fraction < 1:
            x = x[:, :, : max(1, int(x.shape[2] * self.top_fraction + 0.5))]
        if x.shape[2] != rows or x.shape[3] != cols:
            # antialiased when shrinking, so that small details (a face) are averaged, not skipped
            x = F.interpolate(x, size=[rows, cols], mode="bilinear", align_corners=False, antialias=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.trunk(self.region(x))).flatten()


class DualStreamCNN(nn.Module):
    """Dual-Stream re-ID model: (image, face crop, has_face) -> logits (N, num_classes + 1).

    Args:
        num_classes: number of real identities; the classifier has one more output, the distractor class.
        image_size: side of the square person image (pixels), 64 in the paper.
        face_size: side of the square face crop (pixels).
        appearance_channels, face_channels, presence_channels: conv widths of the three small CNNs.
        appearance_dim, face_dim: stream embedding sizes (face: 128-d, as in the paper).
        feature_dim: D, size of the fused (retrieval) feature.
        dropout_rate: dropout in the streams and before the classifier (0.4 in the paper).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 64,
        face_size: int = 64,
        appearance_channels: Sequence[int] = (32, 64, 128),
        face_channels: Sequence[int] = (16, 32, 64),
        presence_channels: Sequence[int] = (16, 32, 64),
        appearance_dim: int = 256,
        face_dim: int = 128,
        feature_dim: int = 256,
        dropout_rate: float = 0.4,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"DualStreamCNN: num_classes (real identities) must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.distractor_class = num_classes
        self.face_dim = face_dim
        self.feature_dim = feature_dim
        self.appearance = ConvStream(
            channels=appearance_channels, image_size=image_size, out_dim=appearance_dim, dropout_rate=dropout_rate
        )
        self.face = ConvStream(
            channels=face_channels, image_size=face_size, out_dim=face_dim, dropout_rate=dropout_rate
        )
        self.face_presence = FacePresenceHead(channels=presence_channels, image_size=image_size)
        self.fusion = nn.Sequential(
            nn.Linear(appearance_dim + face_dim, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout_rate)
        self.classifier = nn.Linear(feature_dim, num_classes + 1)

    def _with_face_stream_in_graph(self, embedding: torch.Tensor) -> torch.Tensor:
        """In training, add 0 · (face-stream parameters) so that they get a zero gradient instead of none.

        Data-parallel wrappers (DDP without ``find_unused_parameters``) fail on a step in which some parameters get
        no gradient, which happens whenever a batch has no face.
        """
        if self.training and not torch.jit.is_scripting():
            return embedding + 0.0 * torch.stack([p.sum() for p in self.face.parameters()]).sum()
        return embedding

    def face_embedding(self, face: torch.Tensor | None, has_face: torch.Tensor | None, *, batch: int) -> torch.Tensor:
        """Face crops (N, 3, F, F) and presence (N,) bool/0-1 -> embedding (N, face_dim), zero rows without a face.

        ``face=None`` means no face anywhere in the batch. ``has_face=None`` means every crop is a face. In training
        mode only the crops with a face go through the stream, so that blank crops do not enter the batch-norm
        statistics; in eval mode all crops go through and the faceless rows are multiplied by zero (same result,
        no data-dependent shapes, so the model exports).
        """
        if face is None:
            if has_face is not None and bool((has_face != 0).any()):
                raise ValueError("DualStreamCNN: has_face marks faces but no face crops were given (face=None)")
            return self._with_face_stream_in_graph(self.classifier.weight.new_zeros(batch, self.face_dim))
        if face.shape[0] != batch:
            raise ValueError(f"DualStreamCNN: {face.shape[0]} face crops for a batch of {batch} images")
        if has_face is None:
            return self.face(face)
        if has_face.dim() != 1 or has_face.shape[0] != batch:
            raise ValueError(f"DualStreamCNN: has_face must have shape ({batch},), got {list(has_face.shape)}")
        present = has_face != 0
        if not self.training:
            return self.face(face) * present[:, None].to(face.dtype)
        rows = present.nonzero().flatten()
        embedding = face.new_zeros(batch, self.face_dim)
        if rows.numel() == 0:
            return self._with_face_stream_in_graph(embedding)
        return embedding.index_copy(0, rows, self.face(face.index_select(0, rows)))

    @torch.jit.export  # callable on a scripted (exported) model
    def forward_features(
        self, x: torch.Tensor, face: torch.Tensor | None = None, has_face: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Person images (N, 3, S, S), face crops (N, 3, F, F) or None, has_face (N,) or None -> fused (N, D)."""
        appearance = self.appearance(x)
        return self.fusion(torch.cat([appearance, self.face_embedding(face, has_face, batch=x.shape[0])], 1))

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Fused feature (N, D) -> logits (N, num_classes + 1), or the feature itself if ``pre_logits``."""
        return f if pre_logits else self.classifier(self.dropout(f))

    def forward(
        self, x: torch.Tensor, face: torch.Tensor | None = None, has_face: torch.Tensor | None = None
    ) -> torch.Tensor:
        """logits (N, num_classes + 1); the last column is the distractor class."""
        return self.forward_head(self.forward_features(x, face, has_face))

    @torch.jit.export  # callable on a scripted (exported) model
    def face_logit(self, x: torch.Tensor) -> torch.Tensor:
        """Person images (N, 3, H, W), any size -> face-presence logit (N,); train with BCE-with-logits on face tags."""
        return self.face_presence(x)

    @torch.jit.export  # callable on a scripted (exported) model
    def face_score(self, x: torch.Tensor) -> torch.Tensor:
        """Person images (N, 3, H, W), any size -> probability (N,) in [0, 1] that a face is visible; differentiable."""
        return torch.sigmoid(self.face_logit(x))

    def get_classifier(self) -> nn.Linear:
        return self.classifier


def _square(image_size: tuple[int, int]) -> None:
    h, w = image_size
    if h != w:
        raise ValueError(f"the Dual-Stream CNN reads square person images, got {h}×{w} (the paper: [64, 64])")


@register_model("dual_stream", role="reid", check_size=_square)
def dual_stream(
    *, num_classes: int, image_size: int = 64, face_size: int = 64, feature_dim: int = 256, dropout_rate: float = 0.4
) -> DualStreamCNN:
    """The paper's Dual-Stream CNN at 64×64 person images and 64×64 face crops."""
    return DualStreamCNN(
        num_classes=num_classes,
        image_size=image_size,
        face_size=face_size,
        feature_dim=feature_dim,
        dropout_rate=dropout_rate,
    )


@register_model("dual_stream_tiny", role="reid", check_size=_square)
def dual_stream_tiny(
    *, num_classes: int, image_size: int = 16, face_size: int = 16, feature_dim: int = 16, dropout_rate: float = 0.4
) -> DualStreamCNN:
    """Test variant: 16×16 inputs, two conv blocks of 4-8 channels per stream."""
    return DualStreamCNN(
        num_classes=num_classes,
        image_size=image_size,
        face_size=face_size,
        appearance_channels=(4, 8),
        face_channels=(4, 8),
        presence_channels=(4, 8),
        appearance_dim=16,
        face_dim=8,
        feature_dim=feature_dim,
        dropout_rate=dropout_rate,
    )


# The face-presence scorer's view of a person crop: the detector's head region (``PERSON_TOP_FRACTION``, the top 40 %),
# at 80 rows: a full-body face of H/12 (eyebrows to chin) spans 80 / (0.4 · 12) ≈ 16.7 rows at any crop height, and
# the smallest face the detector finds in a 128-px crop (20 px) spans 31. 96 columns keep a 2:1 crop's region at
# about its aspect (0.4·H × 0.5·H) and undo most of the 2× stretch of a person drawn into a square.
FACE_PRESENCE_REGION = (80, 96)


@register_model("face_presence")
def face_presence(
    *,
    channels: tuple[int, ...] = (16, 32, 64),
    image_size: int | tuple[int, int] = FACE_PRESENCE_REGION,
    top_fraction: float | None = None,
) -> FacePresenceHead:
    """The face-presence scorer F on its own (logits; σ gives F(x) ∈ [0, 1]): the GAN's ``critic`` guidance mode trains
    it on the detector's labels of real and generated images and uses 1 − F(x) as a differentiable Δ.

    It reads the head region of the person crop, the same top share the detector scans (``top_fraction``, default
    ``PERSON_TOP_FRACTION``), resized to ``image_size`` = (rows, cols), ``FACE_PRESENCE_REGION`` by default: a face
    is ≥ 16 px there (see above), where a 32×32 view of the whole crop left it ~3 px."""
    if top_fraction is None:
        from reid_core.guidance.faces import PERSON_TOP_FRACTION

        top_fraction = PERSON_TOP_FRACTION
    return FacePresenceHead(channels=tuple(channels), image_size=image_size, top_fraction=top_fraction)
