"""ImageNet initialisation (model.pretrained): the official CondenseNet training-form checkpoint and torchvision's
ResNet-50, on state dicts with exactly their keys (random values; nothing is downloaded)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision

from reid_core.models import build_model
from reid_core.models.pretrained import PretrainedError, load_pretrained
from reid_core.train.pretrained import read_state_dict

CONDENSENET74 = dict(stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128))
TINY = dict(stages=(2, 2), growth=(4, 8))


def official_condensenet_state(stages, growth, *, groups=4, condense=4, bottleneck=4, stage=None, seed=0) -> dict:
    """A state dict with the keys, shapes and buffers of the official training-form CondenseNet (ImageNet),
    fully condensed: every learned group convolution's groups keep in/C inputs (rows i, i + G, ... equal)."""
    g = torch.Generator().manual_seed(seed)

    def bn(prefix: str, n: int) -> dict:
        return {f"{prefix}.weight": 1 + 0.2 * torch.randn(n, generator=g), f"{prefix}.bias": 0.1 * torch.randn(n, generator=g),
                f"{prefix}.running_mean": 0.1 * torch.randn(n, generator=g),
                f"{prefix}.running_var": 0.5 + torch.rand(n, generator=g)}  # fmt: skip

    channels = 2 * growth[0]
    sd = {"features.init_conv.weight": 0.3 * torch.randn(channels, 3, 3, 3, generator=g)}
    for b, (layers, k) in enumerate(zip(stages, growth, strict=True), 1):
        for layer in range(1, layers + 1):
            p = f"features.denseblock_{b}.denselayer_{layer}."
            width = bottleneck * k
            mask = torch.zeros(width, channels, 1, 1)
            for i in range(groups):
                kept = torch.randperm(channels, generator=g)[: channels // condense]
                mask[i::groups, kept] = 1.0
            sd.update(bn(p + "conv_1.norm", channels))
            sd[p + "conv_1.conv.weight"] = torch.randn(width, channels, 1, 1, generator=g) / channels**0.5
            sd[p + "conv_1._mask"] = mask
            sd[p + "conv_1._stage"] = torch.full((1,), float(condense - 1 if stage is None else stage))
            sd[p + "conv_1._count"] = torch.full((1,), float((condense - 1) * (channels // condense)))
            sd.update(bn(p + "conv_2.norm", width))
            sd[p + "conv_2.conv.weight"] = torch.randn(k, width // groups, 3, 3, generator=g) / (9 * width) ** 0.5
            channels += k
    sd.update(bn("features.norm_last", channels))
    sd["classifier.weight"] = torch.randn(1000, channels, generator=g) * 0.01
    sd["classifier.bias"] = torch.zeros(1000)
    return sd


def official_pooled_features(sd: dict, x: torch.Tensor, stages, *, groups=4) -> torch.Tensor:
    """What the official model computes before its classifier, written from the state dict's keys alone: stem,
    dense layers (BN-ReLU-masked 1×1, BN-ReLU-group 3×3, concatenation), 2×2 average pooling between blocks,
    BN-ReLU and the average over the last map (pool_last)."""

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"])

    x = F.conv2d(x, sd["features.init_conv.weight"], stride=2, padding=1)
    for b, layers in enumerate(stages, 1):
        for layer in range(1, layers + 1):
            p = f"features.denseblock_{b}.denselayer_{layer}."
            y = F.conv2d(F.relu(bn(x, p + "conv_1.norm")), sd[p + "conv_1.conv.weight"] * sd[p + "conv_1._mask"])
            y = F.conv2d(F.relu(bn(y, p + "conv_2.norm")), sd[p + "conv_2.conv.weight"], padding=1, groups=groups)
            x = torch.cat([x, y], 1)
        if b < len(stages):
            x = F.avg_pool2d(x, 2)
    x = F.relu(bn(x, "features.norm_last"))
    return F.avg_pool2d(x, x.shape[-2:]).flatten(1)


def save_official(tmp_path, sd: dict) -> str:
    """As the official training script saves it: DataParallel's ``module.`` prefix, inside ``{"state_dict": ...}``."""
    path = tmp_path / "condensenet.pth.tar"
    torch.save({"epoch": 120, "arch": "condensenet", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "best_prec1": 26.2}, path)  # fmt: skip
    return str(path)


@pytest.mark.parametrize(("name", "arch", "size"), [("condensenet_tiny", TINY, (32, 16)),
                                                    ("condensenet74", CONDENSENET74, (64, 32))])  # fmt: skip
def test_official_condensenet_checkpoint_computes_what_the_official_model_computes(tmp_path, name, arch, size):
    sd = official_condensenet_state(**arch)
    uri = save_official(tmp_path, sd)
    model = build_model(name, num_classes=5, feature_dim=16)
    head_before = model.classifier.weight.clone()
    copied = load_pretrained(model, read_state_dict(uri), uri=uri)
    assert copied == len([k for k in sd if not k.startswith("classifier.") and not k.endswith("_count")])
    model.eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.forward_backbone(x)
    reference = official_pooled_features(sd, x, arch["stages"])
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5), (ours - reference).abs().max()
    assert torch.equal(model.classifier.weight, head_before)  # the re-ID head is new
    # fully condensed: training does not condense again, and the masks are the checkpoint's
    conv = model.blocks[0].conv_1
    assert int(conv.stage) == 3 and conv.update(progress=1.0) == 0
    assert torch.equal(conv.mask, sd["features.denseblock_1.denselayer_1.conv_1._mask"][:, :, 0, 0])


def test_refused_condensenet_checkpoints_say_why(tmp_path):
    model = build_model("condensenet_tiny", num_classes=5)
    half = official_condensenet_state(**TINY, stage=1)
    with pytest.raises(PretrainedError, match="not fully condensed"):
        load_pretrained(model, half)
    other = official_condensenet_state(stages=(2, 3), growth=(4, 8))
    with pytest.raises(PretrainedError, match="unexpected key 'features.denseblock_2.denselayer_3"):
        load_pretrained(model, other)
    sd = official_condensenet_state(**TINY)
    del sd["features.norm_last.weight"]
    with pytest.raises(PretrainedError, match="not in the checkpoint, e.g. 'final.0.weight'"):
        load_pretrained(model, sd)
    sd = official_condensenet_state(**TINY)
    sd["features.denseblock_1.denselayer_1.conv_1._mask"][1, 0] = (
        1 - sd["features.denseblock_1.denselayer_1.conv_1._mask"][1, 0]
    )
    with pytest.raises(PretrainedError, match="rows of a group"):
        load_pretrained(model, sd)


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(1)}, "callback": print}))
    with pytest.raises(PretrainedError, match="not a tensor-only PyTorch checkpoint"):
        read_state_dict(str(path))


def test_torchvision_resnet50_checkpoint_initialises_the_backbone(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet50", num_classes=4, feature_dim=8, last_stride=1)
    load_pretrained(model, read_state_dict(str(path)), uri=str(path))
    model.eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        ours = model.forward_backbone(x)
        features = torch.nn.Sequential(*list(reference.children())[:-2])(x)
    # last stride 1: layer4 keeps layer3's 4×2 map (the reference halves it to 2×1); same weights, same convolutions
    assert model.backbone(x).shape[-2:] == (4, 2) and features.shape[-2:] == (2, 1)
    same = build_model("resnet50", num_classes=4, feature_dim=8)
    load_pretrained(same, reference.state_dict())
    with torch.no_grad():
        assert torch.allclose(same.eval().forward_backbone(x), features.mean((2, 3)), atol=1e-5)
    assert ours.shape == (2, 2048)
