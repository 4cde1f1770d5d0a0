"""ImageNet initialisation of re-ID backbones from a checkpoint URI (config key ``model.pretrained``).

``state_dict_from_bytes(data)`` reads a checkpoint with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects. A ``{"state_dict": ...}`` wrapper and DataParallel's ``module.``
prefix are removed. (``reid_core.train.pretrained.read_state_dict`` fetches the bytes from ``s3://``, a local path or
``https://``: no storage access here.)

``load_pretrained(model, state)`` copies the backbone; the re-ID head (feature layer, (N+1)-way classifier) stays
freshly initialised, and the checkpoint's ImageNet classifier is dropped. Supported formats:

- **CondenseNet** (``condensenet74``, ``condensenet_tiny``): the training-form checkpoint of the official
  implementation (ShichenLiu/CondenseNet, ``models/condensenet.py`` + ``layers.py``): ``features.init_conv``,
  ``features.denseblock_<b>.denselayer_<l>.conv_1`` (a learned group convolution: ``norm``, ``conv``, and the buffers
  ``_mask`` (O, I, 1, 1), ``_stage``, ``_count``), ``...conv_2`` (``norm``, ``conv``), ``features.norm_last`` and
  ``classifier``. It must be fully condensed (``_stage`` = C - 1 in every layer, as at the end of training): the masks
  are loaded as they are and condensation does not run again, so the loaded model computes what the official model
  computes on the same input (pooled features; the official ``pool_last`` is a 7×7 average over the 7×7 map at 224
  px, the global average here). The official *converted* format (``index`` buffers) is refused.
- **ResNet-50** (``resnet50``): torchvision's ``resnet50`` ``state_dict`` (``conv1``, ``bn1``, ``layer1``-``layer4``,
  ``fc``).

Every refusal is one ``PretrainedError`` line that names the URI and the first offending key.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

import torch
from torch import nn

HEAD_PREFIXES = ("feature.", "classifier.")  # the re-ID head: never from an ImageNet checkpoint


class PretrainedError(ValueError):
    """A checkpoint that cannot initialise this model: says which checkpoint, which key and why."""


def state_dict_from_bytes(data: bytes, uri: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A checkpoint's bytes as a flat ``{key: tensor}``, unwrapped (module docstring); ``torch.load`` with
    ``weights_only=True``: a checkpoint holding anything but tensors and plain containers is refused."""
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any unpickling refusal: one line)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainedError(
            f"{uri}: not a tensor-only PyTorch checkpoint (torch.load weights_only): {first}"
        ) from None
    return unwrap(loaded, uri)


def unwrap(loaded, uri: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``{"state_dict": {...}}`` or a bare state dict -> ``{key: tensor}`` without DataParallel's ``module.`` prefix."""
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping) or not state:
        raise PretrainedError(f"{uri}: expected a state dict (or {{'state_dict': ...}}), got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise PretrainedError(f"{uri}: {key!r} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix("module.")] = value
    return out


def load_pretrained(model: nn.Module, state: Mapping[str, torch.Tensor], *, uri: str = "checkpoint") -> int:
    """Initialise ``model``'s backbone from ``state`` (module docstring). Returns the number of tensors copied."""
    from reid_core.models.condensenet import CondenseNet
    from reid_core.models.resnet import ResNet50ReID

    if isinstance(model, CondenseNet):
        mapped = _condensenet_keys(model, state, uri)
    elif isinstance(model, ResNet50ReID):
        mapped = {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    else:
        raise PretrainedError(
            f"{uri}: ImageNet initialisation supports CondenseNet and ResNet-50, not {type(model).__name__}"
        )
    target = model.state_dict()
    wanted = {k for k in target if not k.startswith(HEAD_PREFIXES)}
    unexpected = sorted(set(mapped) - wanted)
    if unexpected:
        raise PretrainedError(f"{uri}: {len(unexpected)} keys that {type(model).__name__} does not have, e.g. "
                              f"{unexpected[0]!r} (is this checkpoint for another architecture?)")  # fmt: skip
    missing = sorted(k for k in wanted - set(mapped) if not k.endswith("num_batches_tracked"))
    if missing:
        raise PretrainedError(f"{uri}: {len(missing)} of the model's backbone tensors are not in the checkpoint, "
                              f"e.g. {missing[0]!r}")  # fmt: skip
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise PretrainedError(f"{uri}: {key!r} has shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(target[key].shape)} in the model")  # fmt: skip
    with torch.no_grad():
        for key, value in mapped.items():
            target[key].copy_(value.to(target[key].dtype))
    return len(mapped)


_OFFICIAL_LAYER = re.compile(r"features\.denseblock_(\d+)\.denselayer_(\d+)\.(.+)")
_OFFICIAL_PARTS = {  # official layer sub-key -> ours (DenseLayer), BN statistics included below
    "conv_1.conv.weight": "conv_1.weight",
    "conv_1._mask": "conv_1.mask",
    "conv_1._stage": "conv_1.stage",
    "conv_2.conv.weight": "conv_2.2.weight",
}
for _bn_official, _bn_ours in (("conv_1.norm", "conv_1.norm"), ("conv_2.norm", "conv_2.0")):
    for _field in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        _OFFICIAL_PARTS[f"{_bn_official}.{_field}"] = f"{_bn_ours}.{_field}"


def _condensenet_keys(model, state: Mapping[str, torch.Tensor], uri: str) -> dict[str, torch.Tensor]:
    """Official CondenseNet keys -> this ``CondenseNet``'s, with the masks and stages checked and reshaped."""
    from reid_core.models.condense import LearnedGroupConv
    from reid_core.models.condensenet import DenseLayer

    if any(k.endswith(".index") for k in state):
        raise PretrainedError(f"{uri}: an official *converted* CondenseNet checkpoint (index buffers); use the "
                              "training-form checkpoint (with _mask, _stage, _count)")  # fmt: skip
    # (block, layer) -> our index in model.blocks; a pooling (or identity) module starts a new block
    where: dict[tuple[int, int], int] = {}
    block, layer = 1, 0
    for i, module in enumerate(model.blocks):
        if isinstance(module, DenseLayer):
            layer += 1
            where[(block, layer)] = i
        elif layer:
            block, layer = block + 1, 0
        elif i:
            raise PretrainedError(f"{uri}: the model's blocks are not the training form (already converted?)")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("classifier.") or key.endswith("._count"):
            continue  # the ImageNet classifier; _count is implied by _stage (checked below)
        if key == "features.init_conv.weight":
            out["stem.weight"] = value
            continue
        if key.startswith("features.norm_last."):
            out["final.0." + key.removeprefix("features.norm_last.")] = value
            continue
        match = _OFFICIAL_LAYER.fullmatch(key)
        if not match or match[3] not in _OFFICIAL_PARTS or (int(match[1]), int(match[2])) not in where:
            raise PretrainedError(f"{uri}: unexpected key {key!r} for {len(where)} dense layers in "
                                  f"{block} blocks (is this checkpoint for another CondenseNet?)")  # fmt: skip
        index = where[(int(match[1]), int(match[2]))]
        ours = f"blocks.{index}.{_OFFICIAL_PARTS[match[3]]}"
        conv: LearnedGroupConv = model.blocks[index].conv_1
        if match[3] == "conv_1._mask":
            value = _check_mask(value, conv, key, uri)
        elif match[3] == "conv_1._stage":
            stage = int(value.reshape(-1)[0])
            if stage != conv.condense_factor - 1:
                raise PretrainedError(f"{uri}: {key} is {stage}: the checkpoint is not fully condensed (stage "
                                      f"{conv.condense_factor - 1} expected, as at the end of training)")  # fmt: skip
            value = torch.tensor(stage, dtype=torch.long)
        out[ours] = value
    return out


def _check_mask(mask: torch.Tensor, conv, key: str, uri: str) -> torch.Tensor:
    """The official (O, I, 1, 1) mask as (O, I), checked: 0/1, every group's rows equal, each group keeping
    ``kept_per_group`` inputs (a finished condensation)."""
    if mask.dim() != 4 or tuple(mask.shape[2:]) != (1, 1):
        raise PretrainedError(f"{uri}: {key} has shape {tuple(mask.shape)}, expected (O, I, 1, 1)")
    mask = mask[:, :, 0, 0].float()
    if tuple(mask.shape) != (conv.out_channels, conv.in_channels):
        raise PretrainedError(f"{uri}: {key} has shape {tuple(mask.shape)}, expected "
                              f"({conv.out_channels}, {conv.in_channels})")  # fmt: skip
    groups = conv.groups
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise PretrainedError(f"{uri}: {key} is not a 0/1 mask")
    rows = mask.view(conv.out_channels // groups, groups, conv.in_channels)
    if not bool((rows == rows[:1]).all()):
        raise PretrainedError(f"{uri}: {key}: the rows of a group (i, i + G, ...) differ; not a learned-group mask")
    kept = rows[0].sum(1)
    if not bool((kept == conv.kept_per_group).all()):
        raise PretrainedError(f"{uri}: {key}: groups keep {kept.int().tolist()} inputs, {conv.kept_per_group} "
                              "each expected after full condensation")  # fmt: skip
    return mask
