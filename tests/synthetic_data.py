"""Synthetic datasets for the tests, written in the test's process by the library code that ``jobs/make_dataset.py``
runs (``reid_core.data.synthetic``): the same sizes and seed give the same bytes as the job, without a Python start
and the imports of a job per dataset. The job itself, end to end, is tests/test_synthetic.py's subject."""

from __future__ import annotations

from reid_core import storage
from reid_core.data import synthetic


def stack_settings(stack) -> storage.S3Settings:
    """The S3 settings of a ``devstack.stack.Stack`` running the loopback S3 server (any key is accepted)."""
    return storage.S3Settings(endpoint_url=stack.s3_endpoint, key="testing", secret="testing")


def make_synthetic(out: str, *, ids: int, images_per_id: int, cameras: int, layout: str = "msmt17",
                   settings: storage.S3Settings | None = None) -> str:  # fmt: skip
    """What ``jobs/make_dataset.py --layout LAYOUT --ids IDS --images-per-id N --cameras C --out OUT`` writes (its
    other options at their defaults), to a local folder or, with ``settings``, to S3. Returns ``out``."""
    spec = synthetic.SyntheticSpec(ids=ids, cameras=cameras, images_per_id=images_per_id)
    files: dict[str, bytes] = {}
    synthetic.write_layout(spec, layout, lambda rel, data: files.__setitem__(storage.join(out, rel), data))
    storage.write_many(files, settings)
    return out
