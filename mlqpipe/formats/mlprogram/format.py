"""The ML-program format (`.mlpackage` directories) as one implementation of `formats.base.ModelFormat`.

Loading, inventory, checks, byte-exact saving, and every coremltools.optimize.coreml compression (plus fp16
storage) through the writers. Imports stay lazy: the registry imports this module whenever it meets a directory or a package-like path.
"""

from __future__ import annotations

from pathlib import Path

from mlqpipe.formats.base import Artifact, Finding, Storage

_PACKAGE_SUFFIXES = (".mlpackage", ".mlmodelc", ".zip")


class MLProgramFormat:
    name = "mlprogram"
    suffixes = (".mlpackage",)
    directory = True
    modes: frozenset[str] = frozenset({"fp16", "linear", "linear_symmetric", "linear_lut", "kmeans_lut", "unique_lut",
                                       "custom_lut", "prune", "dequantize"})
    modes_note = "mlqpipe changes an ML program's weights, not its graph (fold is a neural-network layer rewrite)"
    evaluator = "mlprogram"  # quality/evaluate/program.py, through the MIL interpreter (quality/mil)

    @property
    def record_type(self) -> type:
        from mlqpipe.formats.mlprogram.inventory import MLWeightRecord

        return MLWeightRecord

    def claims(self, path) -> bool:
        """Directories (a package, or something a package reader can name the problem of) and files that
        look like packages: zipped ones and compiled ones get their own refusals."""
        p = Path(path)
        if p.is_dir():
            return True
        name = p.name.lower()
        return any(name.endswith(s) for s in _PACKAGE_SUFFIXES) or _is_zip(p)

    def owns(self, m) -> bool:
        from mlqpipe.formats.mlprogram.model import MLProgram

        return isinstance(m, MLProgram)

    def load(self, path):
        from mlqpipe.formats.mlprogram.model import load_package

        return load_package(path)

    def from_artifact(self, data: Artifact, where: str):
        from mlqpipe.formats.mlprogram.model import from_tree

        return from_tree(data, where)

    def to_artifact(self, m) -> dict:
        from mlqpipe.formats.mlprogram.model import to_tree

        return to_tree(m)

    def copy(self, m):
        return m.copy()

    def save(self, m, path, *, check: bool = True) -> None:
        m.save(path, check=check)

    def source(self, m) -> str:
        return m.source

    def inventory(self, m) -> list:
        from mlqpipe.formats.mlprogram.inventory import inventory

        return inventory(m)

    def version(self, m) -> int:
        return m.spec.specificationVersion

    def size(self, m) -> int:
        """Bytes of the package as `save` writes it (every file; see model.written_size)."""
        from mlqpipe.formats.mlprogram.model import written_size

        return written_size(m)

    def raise_version(self, m, change: str) -> None:
        """Compressed-weight ops need iOS16: the writer refuses a function below it (raising a program's
        opset is an explicit recipe choice, not a side effect)."""

    def stored_bytes(self, rec, storage: Storage) -> int:
        """Bytes a weight takes in `storage`: as stored now, or an estimate for the plan (codes packed to
        nbits, one float scale (and zero point) per output channel, a float table per LUT)."""
        if storage == rec.storage:
            return rec.nbytes
        width = {"float32": 4, "float16": 2}.get(storage.kind)
        if width:
            return rec.count * width
        channels = rec.shape[rec.axis] if rec.shape and rec.axis is not None else 1
        codes = -(-rec.count * storage.nbits // 8)
        return codes + (8 * channels if storage.kind == "linear" else 4 * 2 ** storage.nbits)

    def write_result(self, rec, result, **options) -> None:
        from mlqpipe.formats.mlprogram.writers import write_result

        write_result(rec, result, **options)

    def refusal(self, rec, mode: str) -> str | None:
        """coremltools never compresses consts of rank < 2 (Core ML's compressed ops are not used for
        them), and fp16 storage is for fp32 weights."""
        if mode != "dequantize" and len(rec.shape or ()) < 2:
            return f"a rank-{len(rec.shape or ())} const (compressed weights need rank >= 2, as coremltools requires)"
        if mode == "fp16" and rec.dtype != "fp32" and not rec.compressed:
            return f"fp16 storage is for fp32 weights (this one is {rec.dtype})"
        return None

    def compressed_result(self, rec):
        """A compressed weight's parameters as a kernel result, for a joint stage to compress on top."""
        from mlqpipe.formats.mlprogram.readback import compressed_result

        return compressed_result(rec)

    def requirements(self, mode: str, settings) -> list[tuple[int, str]]:
        """(specificationVersion, what) for each part of a stage's settings that needs a newer OS than iOS15:
        any constexpr iOS16; int4/uint4, per_block, grouped, vector, 3-bit or per-channel-scaled LUTs, a
        quantized LUT and joint compression iOS18 (MLPROGRAM.md §4)."""
        from mlqpipe.formats.mlprogram.target import spec_of

        if mode == "dequantize":
            return []
        need = [(spec_of("iOS16"), "compressed weights (constexpr ops)")]
        ios18 = spec_of("iOS18")
        get = lambda name, default=None: getattr(settings, name, default)  # noqa: E731
        if mode in ("linear", "linear_symmetric"):
            if get("dtype") in ("int4", "uint4"):
                need.append((ios18, f"dtype {get('dtype')}"))
            if get("granularity") == "per_block":
                need.append((ios18, "granularity per_block"))
        if mode.endswith("_lut"):
            if get("granularity") == "per_grouped_channel":
                need.append((ios18, "granularity per_grouped_channel"))
            if (get("cluster_dim") or 1) > 1:
                need.append((ios18, f"cluster_dim {get('cluster_dim')} (vector LUTs)"))
            if get("nbits") == 3:
                need.append((ios18, "nbits 3"))
            if get("per_channel_scale"):
                need.append((ios18, "per_channel_scale"))
            if get("lut_dtype") in ("int8", "uint8"):
                need.append((ios18, f"lut_dtype {get('lut_dtype')}"))
        if get("joint"):
            need.append((ios18, "joint compression"))
        return need

    def raise_target(self, m, target: str) -> list[str]:
        from mlqpipe.formats.mlprogram.target import raise_target

        return raise_target(m, target)

    def fold(self, m, kinds) -> list:
        from mlqpipe.errors import ModelError

        raise ModelError(f"{m.source}: ML programs have no layers to fold")

    def edge_layers(self, m) -> dict:
        """{(network, layer): {"first", "last"}}: the first and last weight of each function's own block, in
        program order (weights inside cond / while_loop bodies do not count, as branch bodies do not for
        neural networks)."""
        edges: dict = {}
        by_function: dict = {}
        for rec in self.inventory(m):
            if ".blocks[" not in rec.network:
                by_function.setdefault(rec.network, []).append(rec)
        for network, recs in by_function.items():
            edges.setdefault((network, recs[0].layer), set()).add("first")
            edges.setdefault((network, recs[-1].layer), set()).add("last")
        return edges

    def precision_problems(self, m, records, after: dict) -> list[Finding]:
        return []

    def inherit_findings(self, m, original, where: str, warn) -> None:
        from mlqpipe.formats.mlprogram.check import structure_findings

        found = tuple(structure_findings(original))
        for f in found:
            warn(f"{where}: the input already breaks a Core ML rule; compressing it as it is: {f}")
        m.inherited_findings = found

    # --- inspect and check ------------------------------------------------------------------------------

    def describe(self, m) -> dict:
        """What `mlqpipe inspect` shows beside the weights: features, functions and their opsets, parameters."""
        from collections import Counter

        from mlqpipe.formats.mlprogram import proto
        from mlqpipe.formats.mlprogram.program import functions, walk
        from mlqpipe.formats.description import feature_rows

        desc = proto.read_description(m.spec)
        default = desc.defaultFunctionName or "main"
        features = feature_rows(m.spec)
        for f in desc.functions:  # a multifunction model describes each function; show the default one's
            if f.name == default and not (features["inputs"] or features["outputs"]):
                features = _function_features(f)
        ops = Counter(site.function for site in walk(m.spec.mlProgram, m.source))  # one walk for every function
        rows = [{"name": name, "opset": function.opset, "inputs": [i.name for i in function.inputs], "ops": ops[name],
                 "default": name == default}
                for name, function in sorted(functions(m.spec.mlProgram), key=lambda nf: (nf[0] != default, nf[0]))]
        try:
            from mlqpipe.formats.mlprogram.inventory import parameters

            params = [{"name": p.name, "dtype": p.dtype, "shape": list(p.shape) if p.shape is not None else None}
                      for p in parameters(m)]
        except ImportError:
            params = []
        return {"type": "mlProgram", "specificationVersion": m.spec.specificationVersion, **features,
                "functions": rows, "parameters": params}

    def check(self, m) -> list[Finding]:
        from mlqpipe.formats.mlprogram.check import check_program

        return check_program(m)

    def __repr__(self) -> str:
        return f"<format {self.name}>"


def _function_features(f) -> dict:
    """The feature rows of one FunctionDescription (as description.feature_rows makes them)."""
    from mlqpipe.formats.description import ModelDescription, feature_rows

    return feature_rows(ModelDescription(input=f.input, output=f.output))


def _is_zip(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


FORMAT = MLProgramFormat()
