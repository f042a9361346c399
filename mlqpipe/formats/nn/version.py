"""Specification versions: the minimum Core ML version a model's contents need.

Values are Core ML's own: 2 (iOS 11.2) introduced float16 weights, 3 (iOS 12) quantized weights.
"""

from __future__ import annotations

from mlqpipe.formats.nn.structure import NN_TYPES, PIPELINE_TYPES, pipeline_of

FP16_SPEC_VERSION = 2
QUANTIZED_SPEC_VERSION = 3
# the floor each kind of change needs: float16 storage, or quantized (n-bit) storage
FLOORS = {"float16": FP16_SPEC_VERSION, "quantized": QUANTIZED_SPEC_VERSION}
# the first OS release of each specification version: what the version means to a team shipping an app
DEPLOYMENT_TARGETS = {1: "iOS 11", 2: "iOS 11.2", 3: "iOS 12", 4: "iOS 13", 5: "iOS 14", 6: "iOS 15", 7: "iOS 16",
                      8: "iOS 17", 9: "iOS 18", 10: "iOS 26"}


def deployment_target(version: int) -> str:
    return DEPLOYMENT_TARGETS.get(version, f"unknown (specificationVersion {version})")


def version_change(before: int, after: int) -> str | None:
    """A sentence when the minimum deployment target moves, else None."""
    if after == before:
        return None
    return (f"specificationVersion {before} -> {after}: the minimum deployment target moves from "
            f"{deployment_target(before)} to {deployment_target(after)}")


def raise_versions(spec, change: str) -> None:
    """Raise every neural network's version for a change of kind `change` (a key of FLOORS: float16 or
    quantized), as coremltools does, and make each pipeline's version at least its sub-models'
    (coremltools forgets the outer one)."""
    floor = FLOORS[change]
    kind = spec.WhichOneof("Type")
    if kind in NN_TYPES:
        spec.specificationVersion = max(floor, spec.specificationVersion)
    elif kind in PIPELINE_TYPES:
        subs = pipeline_of(spec).models
        for sub in subs:
            raise_versions(sub, change)
        spec.specificationVersion = max([spec.specificationVersion] + [s.specificationVersion for s in subs])
