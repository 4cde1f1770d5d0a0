"""The face-presence scorer F of the critic mode: what it looks at, and its agreement with dlib (issue 16, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_core.guidance.critic import fit_face_scorer, roc_auc
from reid_core.guidance.faces import PERSON_TOP_FRACTION
from reid_core.models import build_model


def test_roc_auc_counts_ranked_pairs_and_ties():
    assert roc_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert roc_auc(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([1, 1, 0, 0])) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5
    # 0.7 beats 0.2 and ties 0.7; 0.3 beats 0.2 only: (1 + 0.5 + 1 + 0) / 4
    assert roc_auc(torch.tensor([0.7, 0.3, 0.2, 0.7]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="needs both classes"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        roc_auc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 0]))


@pytest.mark.parametrize("size", [(128, 64), (256, 128), (384, 192), (128, 128)])
def test_scorer_reads_the_head_region_where_a_full_body_face_is_16_px(size):
    h, w = size
    model = build_model("face_presence").eval()
    rows, cols = model.image_size
    assert model.top_fraction == PERSON_TOP_FRACTION  # the same head region the detector scans
    # a full-body face of H/12 (eyebrows to chin; MSMT17's smallest) spans >= 16 rows of what F reads
    assert (h / 12) * rows / (h * PERSON_TOP_FRACTION) >= 16
    x = torch.rand(2, 3, h, w) * 2 - 1
    assert model.region(x).shape == (2, 3, rows, cols)
    # F's score depends on the head region only: changing the rest of the crop changes nothing
    y = x.clone()
    y[:, :, round(h * PERSON_TOP_FRACTION) :] = torch.rand(2, 3, h - round(h * PERSON_TOP_FRACTION), w)
    with torch.no_grad():
        assert torch.equal(model(x), model(y))
        y[:, :, : round(h * PERSON_TOP_FRACTION) // 2] = 0
        assert not torch.equal(model(x), model(y))


def test_scorer_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_fraction must be in"):
        build_model("face_presence", top_fraction=0)
    with pytest.raises(ValueError, match="image_size must be"):
        build_model("face_presence", image_size=(4, 96))


@pytest.mark.slow  # about a minute of CPU training on an idle 2-core machine
def test_scorer_agrees_with_dlib_on_held_out_real_images():
    """F trained on dlib's labels of synthetic person images (about half carry a real face) ranks held-out images as
    dlib does: ROC AUC >= 0.9 (issue 16's target)."""
    from reid_core.data import synthetic
    from reid_core.guidance.faces import FaceDetector

    spec = synthetic.SyntheticSpec(ids=40, images_per_id=8, sizes=((256, 128),), seed=0)
    items = synthetic.plan(spec, "msmt17")[:300]
    images = [np.asarray(synthetic.render(spec, item)) for item in items]
    with FaceDetector.for_person_crops(workers=2) as detector:
        delta = detector.detect(images).face_absent
    assert 0.3 < 1 - float(delta.mean()) < 0.7, "the synthetic set should carry a face on about half its images"
    torch.manual_seed(0)
    model = build_model("face_presence", channels=(8, 16, 32))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = model.region(x).detach()  # F's own view, once: training then skips the resize
    train = 180
    fit_face_scorer(model, x[:train], delta[:train], steps=250, batch_size=16, lr=3e-3, seed=0)
    model.eval()
    with torch.no_grad():
        scores = torch.sigmoid(model(x[train:]))
    auc = roc_auc(scores, delta[train:] == 0)
    assert auc >= 0.9, f"face-presence scorer agrees with dlib on held-out images at AUC {auc:.3f} < 0.9"
