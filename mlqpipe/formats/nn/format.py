"""The neural-network format (`.mlmodel` files) as one implementation of `formats.base.ModelFormat`.

Everything here delegates to the modules of this package; it only adapts their spec-level functions to
the protocol the engine, build and reports use.
"""

from __future__ import annotations

from pathlib import Path

from mlqpipe.formats.base import Artifact, Finding, Storage
from mlqpipe.formats.nn import check, fold, inventory, model, version, writers
from mlqpipe.formats.nn.model import CoreMLModel


class NeuralNetworkFormat:
    name = "neuralnetwork"
    suffixes = (".mlmodel",)
    directory = False
    modes = frozenset({"fold", "fp16", "linear", "linear_symmetric", "linear_lut", "kmeans_lut", "custom_lut", "dequantize"})
    record_type = inventory.WeightRecord
    evaluator = "neuralnetwork"

    def claims(self, path) -> bool:
        """Any file the ML-program format did not claim: a `.mlmodel` by name, anything else is tried as one
        (its parse names the problem)."""
        return not Path(path).is_dir()

    def owns(self, m) -> bool:
        return isinstance(m, CoreMLModel)

    def load(self, path) -> CoreMLModel:
        return model.load_model(path)

    def from_artifact(self, data: Artifact, where: str) -> CoreMLModel:
        return model.parse_model(data, where)

    def to_artifact(self, m: CoreMLModel) -> bytes:
        return m.SerializeToString()

    def copy(self, m: CoreMLModel) -> CoreMLModel:
        return m.copy()

    def save(self, m: CoreMLModel, path, *, check: bool = True) -> None:
        m.save(path, check=check)

    def source(self, m: CoreMLModel) -> str:
        return m.source

    def inventory(self, m: CoreMLModel) -> list:
        return inventory.inventory(m.spec)

    def version(self, m: CoreMLModel) -> int:
        return m.spec.specificationVersion

    def size(self, m: CoreMLModel) -> int:
        return m.spec.ByteSize()

    def raise_version(self, m: CoreMLModel, change: str) -> None:
        version.raise_versions(m.spec, change)

    def stored_bytes(self, rec, storage: Storage) -> int:
        return writers.stored_bytes(rec, storage) if storage.kind != "empty" else 0

    def write_result(self, rec, result, **options) -> None:
        writers.write_result(rec, result, **options)

    def refusal(self, rec, mode: str) -> str | None:
        return None  # every blob takes every mode (the modes' own checks name the rest)

    def fold(self, m: CoreMLModel, kinds) -> list:
        return fold.fold_model(m.spec, kinds=kinds)

    def edge_layers(self, m: CoreMLModel) -> dict:
        return inventory.edge_layers(m.spec)

    def precision_problems(self, m: CoreMLModel, records, after: dict) -> list[Finding]:
        """Layers a change of storage (`after`: id -> Storage) would leave mixing float16 and float32, unless
        the layer already did."""
        from dataclasses import replace

        by_layer: dict = {}
        for rec in records:
            by_layer.setdefault((rec.model_path, rec.network_path, rec.layer), []).append(rec)
        out = []
        for recs in by_layer.values():
            layer = recs[0].layer_msg
            if check.precision_mix_findings(layer, recs):
                continue  # already mixed in the input: the check reports it on the input itself
            out += check.precision_mix_findings(layer, [replace(r, storage=after.get(r.id, r.storage)) for r in recs])
        return out

    def inherit_findings(self, m: CoreMLModel, original: CoreMLModel, where: str, warn) -> None:
        m.inherited_findings = check.input_findings(original.spec, where, warn=warn)

    def describe(self, m: CoreMLModel) -> dict:
        """What `mlqpipe inspect` shows beside the weights."""
        from mlqpipe.formats.description import feature_rows

        return {"type": m.model_type, "specificationVersion": m.spec.specificationVersion, **feature_rows(m.spec)}

    def check(self, m: CoreMLModel) -> list[Finding]:
        return check.check_spec(m.spec)

    def __repr__(self) -> str:
        return f"<format {self.name}>"


FORMAT = NeuralNetworkFormat()
