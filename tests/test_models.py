"""Every registered model trains (forward, backward, a gradient in every parameter); re-ID model contracts."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reid_core.losses import reid_loss
from reid_core.models import MODELS, build_model
from reid_core.models.condense import learned_group_convs


def _labels_with_one_generated(batch: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(batch) % num_classes
    is_generated = torch.zeros(batch, dtype=torch.bool)
    is_generated[-1] = True
    return labels, is_generated


def _condensenet_loss(model: nn.Module, out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    labels, generated = _labels_with_one_generated(out.shape[0], model.num_classes)
    return reid_loss(out, labels, generated)


def _dual_stream_loss(model: nn.Module, out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    labels, generated = _labels_with_one_generated(out.shape[0], model.num_classes)
    x, _, has_face = inputs
    # the face-presence head is trained on face tags next to the identity loss
    return reid_loss(out, labels, generated) + F.binary_cross_entropy_with_logits(model.face_logit(x), has_face.float())


def _dual_stream_inputs(size: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (
        torch.randn(4, 3, size, size),
        torch.randn(4, 3, size, size),
        torch.tensor([True, False, True, True]),
    )


@dataclass
class Case:
    """How to test one registered model with tiny sizes."""

    kwargs: dict
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    loss: Callable[[nn.Module, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor] = field(
        default=lambda model, out, inputs: out.float().square().mean()
    )
    reid: bool = False  # an (N + 1)-way re-ID classifier with a distractor class


CASES: dict[str, Case] = {
    "dcgan_generator": Case(dict(z_dim=8, width=4, image_size=(16, 8)), lambda: (torch.randn(4, 8),)),
    "dcgan_discriminator": Case(dict(width=4, image_size=(16, 8)), lambda: (torch.randn(4, 3, 16, 8),)),
    # condensenet74's architecture is fixed; a 32×32 input keeps it fast (1×1 in the last block)
    "condensenet74": Case(
        dict(num_classes=3, feature_dim=8), lambda: (torch.randn(2, 3, 32, 32),), _condensenet_loss, reid=True
    ),
    "condensenet_tiny": Case(dict(num_classes=5), lambda: (torch.randn(4, 3, 32, 16),), _condensenet_loss, reid=True),
    "resnet50": Case(
        dict(num_classes=3, feature_dim=8), lambda: (torch.randn(4, 3, 64, 32),), _condensenet_loss, reid=True
    ),
    "dual_stream": Case(dict(num_classes=3), _dual_stream_inputs(64), _dual_stream_loss, reid=True),
    "dual_stream_tiny": Case(dict(num_classes=5), _dual_stream_inputs(16), _dual_stream_loss, reid=True),
    "face_presence": Case(dict(channels=(4, 8), image_size=(16, 12)), lambda: (torch.randn(4, 3, 32, 16),)),
}
REID_MODELS = sorted(name for name, case in CASES.items() if case.reid)


def case_for(name: str) -> Case:
    if name not in CASES:
        pytest.fail(
            f"registered model {name!r} has no test case: add tiny kwargs, inputs and a loss to CASES in {__file__}"
        )
    return CASES[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_reaches_every_parameter(name):
    case = case_for(name)
    torch.manual_seed(0)
    model = build_model(name, **case.kwargs).train()
    inputs = case.inputs()
    out = model(*inputs)
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    loss = case.loss(model, out, inputs)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient in {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient in {pname}"


def test_cases_name_only_registered_models():
    assert set(CASES) <= set(MODELS), f"test cases for unregistered models: {sorted(set(CASES) - set(MODELS))}"


@pytest.mark.parametrize("name", REID_MODELS)
def test_classifier_has_one_distractor_class_after_the_identities(name):
    case = CASES[name]
    model = build_model(name, **{**case.kwargs, "num_classes": 7}).eval()
    assert model.distractor_class == 7
    assert model.get_classifier().out_features == 8
    inputs = case.inputs()
    with torch.no_grad():
        features = model.forward_features(*inputs)
        logits = model(*inputs)
        assert features.shape == (inputs[0].shape[0], model.feature_dim)
        assert logits.shape == (inputs[0].shape[0], 8)
        assert torch.equal(model.forward_head(features, pre_logits=True), features)
        assert torch.allclose(model.forward_head(features), logits)


def test_condensenet74_follows_the_imagenet_recipe_at_256x128():
    model = build_model("condensenet74", num_classes=10).eval()
    layers = learned_group_convs(model)
    assert len(layers) == 4 + 6 + 8 + 10 + 8
    assert all(layer.groups == 4 and layer.condense_factor == 4 for layer in layers)
    assert model.num_features == 16 + 4 * 8 + 6 * 16 + 8 * 32 + 10 * 64 + 8 * 128 == 2064
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 256, 128))
    assert features.shape == (1, 512) and torch.isfinite(features).all()


def test_condensenet_rejects_wrong_input_and_bad_configuration():
    model = build_model("condensenet_tiny", num_classes=3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 16))
    with pytest.raises(ValueError, match="same length"):
        from reid_core.models.condensenet import CondenseNet

        CondenseNet(num_classes=3, stages=(1, 2), growth=(4,), groups=4, condense_factor=4)


def _dual_stream(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_model("dual_stream_tiny", num_classes=5, dropout_rate=0.0, **kwargs)


@pytest.mark.parametrize("training", [True, False])
def test_face_embedding_is_zero_without_a_face_and_ignores_that_crop(training):
    model = _dual_stream().train(training)
    x, face = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    has_face = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        embedding = model.face_embedding(face, has_face, batch=4)
        assert torch.all(embedding[[1, 3]] == 0) and torch.all(embedding[[0, 2]].abs().sum(1) > 0)
        other = face.clone()
        other[[1, 3]] = torch.randn(2, 3, 16, 16) * 5
        # in training mode this also shows that faceless crops stay out of the batch-norm statistics
        assert torch.allclose(model.forward_features(x, other, has_face), model.forward_features(x, face, has_face))
        assert torch.equal(model.face_embedding(None, None, batch=4), torch.zeros(4, model.face_dim))


def test_face_embedding_train_and_eval_paths_agree():
    model = _dual_stream().eval()
    face, has_face = torch.randn(4, 3, 16, 16), torch.tensor([True, False, True, False])
    with torch.no_grad():
        eval_path = model.face_embedding(face, has_face, batch=4)
        model.face.eval()  # same batch-norm statistics, but the training-mode row selection
        model.training = True
        train_path = model.face_embedding(face, has_face, batch=4)
    assert torch.allclose(train_path, eval_path, atol=1e-6)


def test_face_score_is_a_differentiable_probability_for_any_image_size():
    model = _dual_stream().eval()
    generated = torch.randn(3, 3, 32, 16, requires_grad=True)  # e.g. DC-GAN output, resized inside
    score = model.face_score(generated)
    assert score.shape == (3,) and torch.all((score >= 0) & (score <= 1))
    score.sum().backward()
    assert generated.grad is not None and generated.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.face_score(torch.randn(3, 16, 16))


def test_dual_stream_rejects_inconsistent_inputs():
    model = _dual_stream()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="no face crops"):
        model(x, None, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="resize"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="has_face must have shape"):
        model(x, torch.randn(2, 3, 16, 16), torch.tensor([True, False, True]))


def test_dual_stream_is_scriptable_with_its_face_scorer():
    model = _dual_stream().eval()
    with warnings.catch_warnings():  # torch.jit.script is deprecated in favour of torch.export but still works
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    x, face, has_face = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([True, False])
    with torch.no_grad():
        assert torch.allclose(scripted(x, face, has_face), model(x, face, has_face), atol=1e-6)
        assert torch.allclose(scripted.face_score(x), model.face_score(x), atol=1e-6)


@pytest.mark.parametrize("face", ["none", "all_faceless"])
def test_a_batch_without_faces_still_gives_the_face_stream_zero_gradients(face):
    model = _dual_stream().train()
    x = torch.randn(3, 3, 16, 16)
    crops, has_face = (None, None) if face == "none" else (torch.randn(3, 3, 16, 16), torch.zeros(3, dtype=torch.bool))
    model(x, crops, has_face).sum().backward()
    # data-parallel wrappers need a gradient (here zero) for every parameter on every step
    for p in model.face.parameters():
        assert p.grad is not None and torch.all(p.grad == 0)
