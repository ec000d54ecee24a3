"""Is this a Kolors LoRA or a test artefact? Decided from what the run (or package) recorded.

A run made with the tiny random-weight Kolors, scored with a random-weight
scorer, or holding a LoRA trained on another base model must not be published
as a Kolors LoRA: ``kstory package`` and ``kstory upload`` refuse it unless
told ``--allow-test-model``, and then the model card says plainly what it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kstory.core.models.resolve import KOLORS_ID, TINY_IDENTITY

ALLOW_FLAG = "--allow-test-model"


def is_kolors(identity: str | None) -> bool:
    """True for the published Kolors (optionally with the fp16-fix VAE) or a local folder that is not a tiny build.

    A local folder (``local:PATH``) is taken for a copy of Kolors: kstory checks
    its layout, and a tiny build is recognised by its marker file.
    """
    if not identity:
        return False
    return identity == KOLORS_ID or identity.startswith(KOLORS_ID + "+") or identity.startswith("local:")


@dataclass(frozen=True)
class Provenance:
    """The base model the frames and the LoRA came from, and every reason the run is only a test artefact."""

    base_model: str
    reasons: list[str] = field(default_factory=list)

    @property
    def is_test(self) -> bool:
        return bool(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"base_model": self.base_model, "test_artefact": self.is_test, "test_reasons": list(self.reasons)}


def provenance(manifest: dict[str, Any], scores: dict[str, Any], lora_base_model: str | None) -> Provenance:
    """Provenance of a story (``manifest.json``), its ``scores.json`` and the LoRA's recorded base model."""
    model = manifest.get("model") or {}
    identity = str(model.get("identity") or "unknown")
    reasons = []
    if model.get("tiny") or identity.startswith(TINY_IDENTITY):
        reasons.append(f"the frames were made with the tiny random-weight test model ({identity})")
    elif not is_kolors(identity):
        reasons.append(f"the frames were made with {identity}, not {KOLORS_ID}")
    lora_base = lora_base_model or (manifest.get("lora") or {}).get("base_model")
    if not is_kolors(lora_base):
        reasons.append(f"the LoRA was trained on {lora_base or 'an unrecorded base model'}, not {KOLORS_ID}")
    models = (scores.get("summary") or {}).get("models") or {}
    random = sorted(str(info.get("identity")) for info in models.values()
                    if isinstance(info, dict) and info.get("random_weights"))
    if random:
        reasons.append(f"scores.json was scored with random-weight test model(s) {', '.join(random)}: "
                       "its scores mean nothing")
    base = KOLORS_ID if is_kolors(identity) else identity
    return Provenance(base_model=base, reasons=reasons)


def from_record(record: dict[str, Any]) -> Provenance | None:
    """The provenance a package recorded in ``configuration.json`` (None for a package built without one)."""
    if "test_artefact" not in record:
        return None
    return Provenance(base_model=str(record.get("base_model") or "unknown"),
                      reasons=[str(r) for r in record.get("test_reasons") or []] or
                      (["the package says it is a test artefact"] if record.get("test_artefact") else []))
