"""Specification versions: the minimum Core ML version a model's contents need.

Values are Core ML's own: 2 (iOS 11.2) introduced float16 weights, 3 (iOS 12) quantized weights.
"""

from __future__ import annotations

from mlqpipe.formats.nn.structure import NN_TYPES, PIPELINE_TYPES, pipeline_of

FP16_SPEC_VERSION = 2
QUANTIZED_SPEC_VERSION = 3
# the floor each kind of change needs: float16 storage, or quantized (n-bit) storage
FLOORS = {"float16": FP16_SPEC_VERSION, "quantized": QUANTIZED_SPEC_VERSION}
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
