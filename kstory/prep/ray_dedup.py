"""Data-Juicer's ``ray_image_deduplicator`` fed the hash kstory's pre-check already took.

Under Ray, ``image_deduplicator`` runs as ``ray_image_deduplicator``, which
would decode every picture again and hash it with imagededup's own resize;
the pre-check's hash (docs/data-prep.md, *The deduplicator's hash*) can
differ from that by a bit, so the two executors would disagree on near
copies.  This subclass takes ``__dj__imagehash`` from the row when the
pre-check put it there and otherwise hashes as the parent does; the shared
dedup set, the backend and the filtering are Data-Juicer's.
"""

from __future__ import annotations

from typing import Any

import kstory  # noqa: F401  (Ray workers unpickle this op first: torchvision fix before imagededup)
from data_juicer.ops.base_op import OPERATORS
from data_juicer.ops.deduplicator.ray_image_deduplicator import RayImageDeduplicator
from data_juicer.utils.constant import HashKeys

OP_NAME = "kstory_ray_image_deduplicator"


@OPERATORS.register_module(OP_NAME)
class PremeasuredRayImageDeduplicator(RayImageDeduplicator):
    """``ray_image_deduplicator`` that reuses the row's pre-measured image hash."""

    def calculate_hash(self, sample: dict[str, Any], context: bool = False) -> str:
        measured = sample.get(HashKeys.imagehash)
        if isinstance(measured, str) and measured:
            return measured
        return super().calculate_hash(sample, context)
