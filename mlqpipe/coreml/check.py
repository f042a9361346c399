"""Core ML's loading rules for neural-network weights, checked without Core ML.

We cannot run Core ML on Linux; the next best proof that a model loads on a device is to apply the rules
its own validator applies (read from its C++ source: valueType, hasValidQuantizationParams,
hasSufficientBytesInQuantizedWeightParam and the per-layer validators), plus a few of ours: no NaN/Inf,
and specification versions high enough for the OS they declare (warnings: the validator does not check). Every model
mlqpipe writes goes through `raise_on_errors` first; `mlqpipe check` runs `check_spec` on any model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import CheckError
from .inventory import WeightRecord, iter_layers, layer_records
from .layers import layer_type
from .model import PIPELINE_TYPES, neural_networks, pipeline_of
from .version import FP16_SPEC_VERSION, QUANTIZED_SPEC_VERSION
from .weights import set_fields

INT8_DYNAMIC_SPEC_VERSION = 5  # iOS 14
_DYNAMIC_INT8_TYPES = ("innerProduct", "batchedMatmul")
# Groups of blobs that must share one float precision (float16 or float32) inside a layer.
_SAME_PRECISION_TYPES = {"batchnorm", "simpleRecurrent", "gru", "uniDirectionalLSTM", "biDirectionalLSTM"}
# Layer types whose weights Core ML's validator only accepts as floats.
_FLOAT_ONLY = {"convolution3d": "float32 or float16", "layerNormalization": "float32"}


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    rule: str
    where: str
    message: str

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message} [{self.rule}]"


def check_spec(spec) -> list[Finding]:
    """Every rule broken anywhere in the model (pipelines and nested networks included)."""
    findings: list[Finding] = []
    for model_path, model_spec, nn in neural_networks(spec):
        needs = 1
        for net_path, network, layer in iter_layers(nn):
            records = layer_records(model_path, net_path, network, layer, model_spec, include_empty=True)
            findings += _check_layer(layer, records)
            for rec in records:
                if rec.storage.kind == "float16":
                    needs = max(needs, FP16_SPEC_VERSION)
                elif rec.storage.is_quantized:
                    needs = max(needs, QUANTIZED_SPEC_VERSION if rec.storage.kind != "int8" else INT8_DYNAMIC_SPEC_VERSION)
        if model_spec.specificationVersion < needs:
            findings.append(
                Finding(
                    "warning",  # Core ML's validator accepts it; a device on the declared version cannot load it
                    "spec-version",
                    model_path.rstrip("/") or "model",
                    f"specificationVersion {model_spec.specificationVersion} is too low for its weights "
                    f"(needs >= {needs}: float16 weights need {FP16_SPEC_VERSION}, quantized {QUANTIZED_SPEC_VERSION})",
                )
            )
    findings += _check_pipeline_versions(spec, "")
    return findings


def raise_on_errors(spec, where: str = "") -> None:
    """Raise CheckError listing every error-level finding; warnings pass."""
    errors = [f for f in check_spec(spec) if f.severity == "error"]
    if errors:
        lines = "\n".join(f"  {f}" for f in errors)
        raise CheckError(
            f"{where}: refusing to write a model Core ML would reject ({len(errors)} problem(s)):\n{lines}", errors
        )


def _check_pipeline_versions(spec, path: str) -> list[Finding]:
    if spec.WhichOneof("Type") not in PIPELINE_TYPES:
        return []
    findings = []
    for i, sub in enumerate(pipeline_of(spec).models):
        if sub.specificationVersion > spec.specificationVersion:
            findings.append(
                Finding(
                    "warning",  # not checked by Core ML's validator; the pipeline claims an older OS than it needs
                    "pipeline-version",
                    f"{path}models[{i}]",
                    f"inner specificationVersion {sub.specificationVersion} is higher than the pipeline's "
                    f"{spec.specificationVersion}; raise the pipeline's version",
                )
            )
        findings += _check_pipeline_versions(sub, f"{path}models[{i}]/")
    return findings


def _check_layer(layer, records: list[WeightRecord]) -> list[Finding]:
    findings: list[Finding] = []
    for rec in records:
        findings += _check_blob(layer, rec)
    findings += precision_mix_findings(layer, records)
    return findings


def _f(rec: WeightRecord, rule: str, message: str, severity: str = "error") -> Finding:
    return Finding(severity, rule, rec.id, message)


def _check_blob(layer, rec: WeightRecord) -> list[Finding]:
    wp = rec.wp
    fields = set_fields(wp)
    st = rec.storage
    out: list[Finding] = []
    if len(fields) > 1:
        return [_f(rec, "one-storage-field", f"{' and '.join(fields)} are all set; exactly one storage field may hold data")]
    if not fields:
        if rec.expected and rec.count:
            out.append(_f(rec, "missing-data", f"the layer's parameters say it holds {rec.count} values, but it is empty"))
        return out
    if not rec.count:
        return out
    if st.kind == "float16" and rec.layer_type == "layerNormalization":
        out.append(_f(rec, "quantized-unsupported", "layerNormalization gamma and beta must be float32; Core ML rejects float16 ones"))
    if st.is_float:
        data = wp.floatValue if st.kind == "float32" else wp.float16Value  # one copy of the bytes
        itemsize = 4 if st.kind == "float32" else 2
        if len(data) // itemsize != rec.count or len(data) % itemsize:
            out.append(_f(rec, "element-count", f"holds {len(data) / itemsize:g} {st.kind} values; the layer's parameters imply {rec.count} (shape {_shape(rec)})"))
            return out
        bad = _non_finite(data, st.kind)
        if bad:
            out.append(_f(rec, "finite-values", f"{bad} NaN or Inf value(s)"))
        return out
    # quantized
    if rec.layer_type in _FLOAT_ONLY:
        return [_f(rec, "quantized-unsupported", f"{rec.layer_type} weights must be float ({_FLOAT_ONLY[rec.layer_type]}); Core ML rejects quantized ones")]
    if rec.updatable:
        out.append(_f(rec, "updatable-quantized", "an updatable weight is quantized; Core ML only trains float weights"))
    if st.kind == "int8":
        return out + _check_int8(layer, rec)
    return out + _check_quantized(rec)


def _non_finite(data: bytes, kind: str) -> int:
    """NaN/Inf count from the exponent bits (numpy's float16 isfinite is emulated and slow)."""
    if kind == "float32":
        values = np.frombuffer(data, "<f4")
        return int(values.size - np.count_nonzero(np.isfinite(values)))
    exponent = np.frombuffer(data, "<u2") & np.uint16(0x7C00)
    return int(np.count_nonzero(exponent == 0x7C00))


def _shape(rec: WeightRecord) -> str:
    return "x".join(str(d) for d in rec.shape) if rec.shape else "?"


def _check_quantized(rec: WeightRecord) -> list[Finding]:
    wp, st = rec.wp, rec.storage
    q = wp.quantization
    out = []
    if st.kind == "raw":
        return [_f(rec, "quantization-params", "rawValue is set without linear or lookup-table quantization parameters")]
    if not 1 <= st.nbits <= 8:
        return [_f(rec, "nbits", f"numberOfBits is {st.nbits}; Core ML allows 1..8")]
    needed = (rec.count * st.nbits + 7) // 8
    if len(wp.rawValue) < needed:
        out.append(_f(rec, "packed-size", f"rawValue has {len(wp.rawValue)} bytes; {rec.count} values of {st.nbits} bits need {needed}"))
    elif len(wp.rawValue) > needed:
        out.append(_f(rec, "packed-size", f"rawValue has {len(wp.rawValue)} bytes, more than the {needed} its values need", "warning"))
    if st.kind == "lut":
        table = np.asarray(q.lookupTableQuantization.floatValue, dtype=np.float32)
        if table.size != 1 << st.nbits:
            out.append(_f(rec, "lut-size", f"lookup table has {table.size} entries; {st.nbits}-bit quantization needs exactly {1 << st.nbits}"))
        if not np.all(np.isfinite(table)):
            out.append(_f(rec, "finite-values", "lookup table holds NaN or Inf"))
        return out
    lq = q.linearQuantization
    scale = np.asarray(lq.scale, dtype=np.float32)
    bias = np.asarray(lq.bias, dtype=np.float32)
    allowed = sorted(_allowed_scale_counts(rec))
    if scale.size not in allowed:
        out.append(_f(rec, "scale-count", f"{scale.size} linear scales; Core ML needs {' or '.join(map(str, allowed))}"))
    if bias.size not in (0, scale.size):
        out.append(_f(rec, "bias-count", f"{bias.size} linear biases for {scale.size} scales; needs 0 or {scale.size}"))
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(bias))):
        out.append(_f(rec, "finite-values", "linear quantization scale or bias holds NaN or Inf"))
    return out


def _allowed_scale_counts(rec: WeightRecord) -> set[int]:
    """Core ML (hasValidQuantizationParams with the layer's expected size): 1 scale, or one per output
    channel for weight matrices and kernels; vectors (biases, batchnorm, peepholes) take exactly one, except
    scale / bias / loadConstant blobs of shape [C, H, W] with C > 1, which may take C."""
    if rec.axis is not None and rec.out_channels:
        return {1, rec.out_channels}
    layer = rec.layer_msg
    if rec.layer_type in ("scale", "bias", "loadConstant"):
        params = getattr(layer, rec.layer_type)
        shape = list(params.shapeScale if rec.slot_path == "scale" else params.shapeBias) if rec.layer_type == "scale" else list(params.shape)
        if len(shape) == 3 and shape[0] > 1:
            return {1, int(shape[0])}
    return {1}


def _check_int8(layer, rec: WeightRecord) -> list[Finding]:
    kind = layer_type(layer)
    out = []
    if kind not in _DYNAMIC_INT8_TYPES or not getattr(layer, kind).int8DynamicQuantize:
        out.append(_f(rec, "int8-dynamic", "int8RawValue is only valid for innerProduct/batchedMatmul weights with int8DynamicQuantize"))
    if len(rec.wp.int8RawValue) != rec.count:
        out.append(_f(rec, "element-count", f"int8RawValue has {len(rec.wp.int8RawValue)} bytes; the layer implies {rec.count}"))
    return out


def precision_mix_findings(layer, records: list[WeightRecord]) -> list[Finding]:
    """float16 and float32 blobs may not be mixed within a layer's weights and bias (nor within batchnorm's
    four parameters or one recurrent layer); quantized blobs may sit beside either."""
    records = [rec for rec in records if rec.count]  # a blob with no values has no precision
    kinds = {rec.storage.kind for rec in records if rec.storage.is_float}
    if len(kinds) < 2:
        return []
    kind = layer_type(layer)
    if kind not in _SAME_PRECISION_TYPES and not any(r.is_bias for r in records):
        return []
    first = records[0]
    parts = ", ".join(f"{r.slot_path}={r.storage}" for r in records if r.storage.is_float)
    # Core ML's validator skips this check for biDirectionalLSTM (it reads the unidirectional field): warn
    severity = "warning" if kind == "biDirectionalLSTM" else "error"
    return [
        Finding(
            severity,
            "precision-mix",
            f"{first.model_path}{first.network_path}{first.layer}",
            f"mixes float16 and float32 storage ({parts}); Core ML needs one precision per layer",
        )
    ]
