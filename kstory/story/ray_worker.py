"""One story worker on Ray: a process that holds one loaded ``Session`` and denoises the batches it is sent.

It computes exactly what ``run_plans`` computes in one process (the same
prompts encoded, the same references, the same batches), so its pictures are
the same; it writes no file of the story: the pictures go back to the driver.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kstory.story.consistent_attention import AttentionBank, SharingSettings
from kstory.story.generate import FramePlan, Session
from kstory.story.manifest import frame_name
from kstory.story.repair import apply_repairs


class StoryWorker:
    """The body of a Ray actor: ``prepare`` once, then ``run`` one unit of batches at a time."""

    def __init__(self, load_session: Callable[[], Session], threads: int):
        torch.set_num_threads(threads)  # the driver's count: CPU kernels then split their work the same way
        self.session = load_session()
        self.groups: list[list[FramePlan]] = []
        self.keep: set[int] = set()
        self.sharing: SharingSettings | None = None
        self._frames = Path(tempfile.mkdtemp(prefix="kstory-reference-frames-"))  # this process's own scratch

    def where(self) -> dict[str, Any]:
        """Node and process, for the log when this worker fails."""
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}

    def prepare(self, groups: list[list[FramePlan]], keep: set[int], release: str, encoded: list[FramePlan],
                sharing: SharingSettings | None) -> bool:
        """Encode every prompt and reference of the job, as the in-process run does before its first batch."""
        self.groups, self.keep, self.sharing = groups, set(keep), sharing
        self.session.encode(encoded, release)
        self.session.references.encode([plan for batch in groups for plan in batch])
        self.session.references.frame_file = lambda index: self._frames / f"{frame_name(index)}.png"
        return True

    def run(self, unit: list[int], frames: dict[int, bytes]) -> list[tuple[list[Any], float]]:
        """Denoise the batches ``unit`` (positions in the job's batches) in order; ``frames``: reference frames' PNGs.

        A unit of several batches shares one attention bank (consistent attention), as in one process.
        """
        for index, data in frames.items():
            (self._frames / f"{frame_name(index)}.png").write_bytes(data)
        bank = AttentionBank(self.sharing) if self.sharing is not None else None
        results = []
        for batch, images, seconds in self.session.generate([self.groups[i] for i in unit], bank):
            images = [apply_repairs(self.session, plan, image) if plan.index in self.keep and plan.repairs else image
                      for plan, image in zip(batch, images)]
            results.append((images, seconds))
        return results
