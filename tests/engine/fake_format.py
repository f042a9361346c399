"""A tiny model format that exists only to prove the engine, plan, build, cache, lock and reports run
against the `ModelFormat` protocol alone (tests/engine/test_format_seam.py).

A fake model is a directory `NAME.fakemodel/` holding `model.json` (a version and a list of tensors: name,
op, shape, storage and its parameters) and one `data/<name>.bin` per tensor (float32, float16 or uint8
codes). It has no layers to fold, no evaluator and none of the neural-network rule conditions.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from mlqpipe.artifacts import read_tree, write_tree
from mlqpipe.errors import ModelError
from mlqpipe.formats.base import Storage, WeightRecord
from mlqpipe.quant.results import Float16Result, Float32Result, LinearResult, LutResult

_DTYPES = {"float32": "<f4", "float16": "<f2", "linear": "u1", "lut": "u1"}
_FLOORS = {"float16": 2, "quantized": 3}


@dataclass
class FakeModel:
    doc: dict  # {"version": int, "tensors": [{"name", "op", "shape", "storage", "nbits"?, "scale"?, "bias"?, "lut"?}]}
    data: dict  # tensor name -> bytes
    source: str = "<fake>"


@dataclass(kw_only=True)
class FakeRecord(WeightRecord):
    FORMAT: ClassVar[str] = "fake"

    def values(self, count=None) -> np.ndarray:
        model, t = self.handle
        raw = np.frombuffer(model.data[t["name"]], _DTYPES[t["storage"]])
        if t["storage"] == "linear":
            rows = raw.reshape(self.shape[0], -1).astype(np.float32)
            out = rows * np.float32(t["scale"])[:, None] + np.float32(t["bias"])[:, None]
        elif t["storage"] == "lut":
            out = np.asarray(t["lut"], np.float32)[raw]
        else:
            out = raw.astype(np.float32)
        return out.reshape(self.shape)

    @property
    def nbytes(self) -> int:
        model, t = self.handle
        return len(model.data[t["name"]])


def _storage(t: dict) -> Storage:
    return Storage(t["storage"], t.get("nbits", {"float32": 32, "float16": 16}.get(t["storage"], 8)))


class FakeFormat:
    name = "fake"
    suffixes = (".fakemodel",)
    directory = True
    modes = frozenset({"fp16", "linear", "linear_symmetric", "linear_lut", "dequantize"})
    record_type = FakeRecord
    evaluator = None

    def claims(self, path) -> bool:
        return Path(path).suffix == ".fakemodel"

    def owns(self, model) -> bool:
        return isinstance(model, FakeModel)

    def load(self, path) -> FakeModel:
        if not Path(path).is_dir():
            raise ModelError(f"{path}: no such fake model")
        return self.from_artifact(read_tree(path), str(path))

    def from_artifact(self, files: dict, where: str) -> FakeModel:
        try:
            doc = json.loads(files["model.json"])
            data = {t["name"]: files[f"data/{t['name']}.bin"] for t in doc["tensors"]}
        except (KeyError, ValueError) as e:
            raise ModelError(f"{where}: not a fake model ({e})") from None
        return FakeModel(doc, data, where)

    def to_artifact(self, model: FakeModel) -> dict:
        files = {f"data/{name}.bin": b for name, b in model.data.items()}
        files["model.json"] = (json.dumps(model.doc, sort_keys=True, indent=1) + "\n").encode()
        return files

    def copy(self, model: FakeModel) -> FakeModel:
        return FakeModel(copy.deepcopy(model.doc), dict(model.data), model.source)

    def save(self, model: FakeModel, path, *, check: bool = True) -> None:
        write_tree(path, self.to_artifact(model))

    def source(self, model: FakeModel) -> str:
        return model.source

    def inventory(self, model: FakeModel) -> list[FakeRecord]:
        return [FakeRecord(layer=t["name"], layer_type=t["op"], field="weight", shape=tuple(t["shape"]),
                           axis=0 if len(t["shape"]) > 1 else None, count=int(np.prod(t["shape"])), storage=_storage(t),
                           handle=(model, t)) for t in model.doc["tensors"]]

    def version(self, model: FakeModel) -> int:
        return model.doc["version"]

    def size(self, model: FakeModel) -> int:
        return sum(len(b) for b in self.to_artifact(model).values())

    def raise_version(self, model: FakeModel, change: str) -> None:
        model.doc["version"] = max(model.doc["version"], _FLOORS[change])

    def stored_bytes(self, rec, storage: Storage) -> int:
        per = {"float32": 4, "float16": 2}.get(storage.kind)
        return rec.count * per if per else rec.count + 8 * (rec.shape[0] if storage.kind == "linear" else 2 ** storage.nbits // 2)

    def write_result(self, rec: FakeRecord, result, **options) -> None:
        model, t = rec.handle
        for key in ("nbits", "scale", "bias", "lut"):
            t.pop(key, None)
        if isinstance(result, (Float32Result, Float16Result)):
            t["storage"] = "float32" if isinstance(result, Float32Result) else "float16"
            model.data[t["name"]] = result.values.astype(_DTYPES[t["storage"]]).tobytes()
        elif isinstance(result, LinearResult):
            t.update(storage="linear", nbits=result.nbits, scale=result.scale.tolist(), bias=result.bias.tolist())
            model.data[t["name"]] = result.codes.astype("u1").tobytes()
        elif isinstance(result, LutResult):
            t.update(storage="lut", nbits=result.nbits, lut=result.lut.tolist())
            model.data[t["name"]] = result.indices.astype("u1").tobytes()
        else:
            raise ModelError(f"{rec.where}: fake models cannot store {type(result).__name__}")

    def refusal(self, rec, mode) -> str | None:
        return None

    def fold(self, model, kinds) -> list:
        raise ModelError("fake models have no layers to fold")

    def edge_layers(self, model) -> dict:
        return {}

    def precision_problems(self, model, records, after) -> list:
        return []

    def inherit_findings(self, model, original, where, warn) -> None:
        pass


FAKE = FakeFormat()


def write_fake_model(path, tensors: dict[str, np.ndarray], version: int = 1) -> None:
    """A float32 fake model with these tensors (op "dense" for 2-D ones, "bias" for the rest)."""
    doc = {"version": version, "tensors": [{"name": n, "op": "dense" if v.ndim > 1 else "bias", "shape": list(v.shape),
                                            "storage": "float32"} for n, v in tensors.items()]}
    files = {f"data/{n}.bin": np.asarray(v, "<f4").tobytes() for n, v in tensors.items()}
    files["model.json"] = (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()
    write_tree(path, files)
