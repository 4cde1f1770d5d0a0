"""Face guidance for the DC-GAN (docs/method.md §1): the face detector Δ and the guided losses.

- ``faces``: dlib's HOG frontal face detector over a thread pool -> Δ(x) (1 = no face), boxes, and face crops for
  the Dual-Stream face stream.
- ``losses``: discriminator and generator losses in the modes ``paper``, ``weighted`` (default),
  ``critic`` and ``smoothing`` (the control: `weighted` with Δ fixed at 1).
"""

from reid_core.guidance.faces import (
    DEFAULT_SCORE_THRESHOLD,
    FACE_SCORE_FLOOR,
    FaceDetections,
    FaceDetector,
    face_crop,
    face_crops,
    person_crop_settings,
    upsample_for_height,
)
from reid_core.guidance.losses import GUIDANCE_MODES, discriminator_loss, generator_loss, validate_guidance

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "FACE_SCORE_FLOOR",
    "GUIDANCE_MODES",
    "FaceDetections",
    "FaceDetector",
    "discriminator_loss",
    "face_crop",
    "face_crops",
    "generator_loss",
    "person_crop_settings",
    "upsample_for_height",
    "validate_guidance",
]
