"""Workflows: what a job runs after its preflight, one function call each.

``pipeline`` (the GAN and re-ID training runs and their registration), ``distractors`` (synthesis of the distractor
set), ``search`` (the λ search; each trial GAN -> distractors -> re-ID), ``ablation`` (the distractor ablation grid),
``evaluate`` (a registered feature model on query/gallery), ``registry_review`` (list, compare, promote, report),
``packing`` (a dataset into tar shards) and ``face_progress`` (GAN runs' face-score curves). Jobs call these; these
call ``train``, the models, data, metrics and the io modules below them, never the other way round
(docs/architecture.md).
"""
