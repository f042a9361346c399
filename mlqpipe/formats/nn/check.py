"""Core ML's loading rules for neural-network weights, checked without Core ML.

We cannot run Core ML on Linux; the next best proof that a model loads on a device is to apply the rules
its own validator applies (read from its C++ source: valueType, hasValidQuantizationParams,
hasSufficientBytesInQuantizedWeightParam and the per-layer validators), plus a few of ours: no NaN/Inf,
and specification versions high enough for the OS they declare (warnings: the validator does not check). Every model
mlqpipe writes goes through `raise_on_errors` first; `mlqpipe check` runs `check_spec` on any model.

Beside the weights, the structure rules that quantizing could break or that users' models break
(`structure_findings`: Model::validateGeneric's version check, the recurrent layers' input/output counts,
validateNeuralNetwork's and the pipeline validator's "no blob read before it is written"). They read no
weight data, so checking an input with them is cheap: an input that already breaks one is quantized as it
is, with a warning, and its copy of the problem is not held against the output (`inherited`).
"""

from __future__ import annotations

import numpy as np

from mlqpipe.errors import CheckError
from mlqpipe.formats.base import Finding
from mlqpipe.formats.description import read_description
from mlqpipe.formats.nn.inventory import WeightRecord, layer_records
from mlqpipe.formats.nn.structure import iter_layers
from mlqpipe.formats.nn.layers import layer_type
from mlqpipe.formats.nn.structure import NN_TYPES, PIPELINE_TYPES, neural_networks, pipeline_of
from mlqpipe.formats.nn.version import FP16_SPEC_VERSION, QUANTIZED_SPEC_VERSION
from mlqpipe.formats.nn.weights import set_fields

INT8_DYNAMIC_SPEC_VERSION = 5  # iOS 14
_DYNAMIC_INT8_TYPES = ("innerProduct", "batchedMatmul")
# Groups of blobs that must share one float precision (float16 or float32) inside a layer.
_SAME_PRECISION_TYPES = {"batchnorm", "simpleRecurrent", "gru", "uniDirectionalLSTM", "biDirectionalLSTM"}
# Layer types whose weights Core ML's validator only accepts as floats.
_FLOAT_ONLY = {"convolution3d": "float32 or float16", "layerNormalization": "float32"}
# MLMODEL_SPECIFICATION_VERSION_NEWEST of Core ML's validator in coremltools 9.0 (iOS 26 / macOS 26; the
# same as coremltools' _SPECIFICATION_VERSION_IOS_26): newer versions are refused as "intended for a newer
# version of Xcode", and 0 as "missing or corrupt".
NEWEST_SPEC_VERSION = 10
# Recurrent layers take their state as extra inputs and return it as extra outputs. Core ML's validator
# (validateInputCount / validateOutputCount in each validate...Layer): (min, max) inputs, exact outputs.
_RECURRENT_IO = {
    "simpleRecurrent": ((2, 2), 2),
    "gru": ((1, 2), 2),
    "uniDirectionalLSTM": ((1, 3), 3),
    "biDirectionalLSTM": ((1, 5), 5),
}


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
    return findings + structure_findings(spec)


def raise_on_errors(spec, where: str = "", inherited=()) -> None:
    """Raise CheckError listing every error-level finding; warnings pass, and so do the `inherited` findings
    (those the input already had: the user's model is theirs, we only refuse what quantizing introduced)."""
    known = set(inherited)
    errors = [f for f in check_spec(spec) if f.severity == "error" and f not in known]
    if errors:
        lines = "\n".join(f"  {f}" for f in errors)
        raise CheckError(
            f"{where}: refusing to write a model Core ML would reject ({len(errors)} problem(s)):\n{lines}", errors
        )


def introduced_findings(before, after) -> list[Finding]:
    """The findings of spec `after` that spec `before` did not have: what a transformation broke (tests of
    generated models that Core ML would reject anyway, e.g. without declared inputs, assert this is empty)."""
    known = set(check_spec(before))
    return [f for f in check_spec(after) if f not in known]


def input_findings(spec, source: str, warn=None) -> tuple[Finding, ...]:
    """The structure rules an input about to be quantized already breaks, each reported by one
    `warn(message)` (Python's warnings.warn by default). Store them as the result's `inherited_findings`:
    saving then refuses only problems introduced since — the user's model is theirs, quantized as it is."""
    findings = tuple(structure_findings(spec))
    for f in findings:
        message = f"{source}: the input already breaks a Core ML rule; quantizing it as it is: {f}"
        if warn is None:
            import warnings

            warnings.warn(message, stacklevel=3)
        else:
            warn(message)
    return findings


def structure_findings(spec) -> list[Finding]:
    """The rules that are not about weights: spec versions Core ML knows, recurrent layers' state inputs and
    outputs, and every blob read after it is written (pipelines and nested networks included)."""
    return _check_versions_known(spec, "") + _check_graph(spec, "")


def _check_versions_known(spec, path: str) -> list[Finding]:
    """Core ML validates every model of a pipeline on its own, version included."""
    v = spec.specificationVersion
    findings = []
    if not 1 <= v <= NEWEST_SPEC_VERSION:
        why = "is missing (0)" if v == 0 else f"is {v}, newer than any Core ML release knows"
        findings.append(Finding("error", "spec-version-unknown", path.rstrip("/") or "model",
                                f"specificationVersion {why}; Core ML loads 1..{NEWEST_SPEC_VERSION}"))
    if spec.WhichOneof("Type") in PIPELINE_TYPES:
        for i, sub in enumerate(pipeline_of(spec).models):
            findings += _check_versions_known(sub, f"{path}models[{i}]/")
    return findings


def _names(features) -> set[str]:
    return {f.name for f in features}


def _check_graph(spec, path: str) -> list[Finding]:
    """A network reads its model's declared inputs; a pipeline's model reads the pipeline's inputs and the
    outputs of the models before it (Core ML's pipeline validator, by name)."""
    kind = spec.WhichOneof("Type")
    if kind in NN_TYPES:
        return _check_network(getattr(spec, kind), _names(read_description(spec).input), path, "")
    if kind not in PIPELINE_TYPES:
        return []
    findings = []
    available = _names(read_description(spec).input)
    for i, sub in enumerate(pipeline_of(spec).models):
        sub_path = f"{path}models[{i}]/"
        desc = read_description(sub)
        for name in sorted(_names(desc.input) - available):
            findings.append(Finding("error", "undefined-input", sub_path.rstrip("/"),
                                    f"model input '{name}' is neither an input of the pipeline nor an output of a model before it"))
        available |= _names(desc.output)
        findings += _check_graph(sub, sub_path)
    return findings


def _check_network(network, scope: set[str], model_path: str, net_path: str) -> list[Finding]:
    """Walk the layers in order, as Core ML's validator does; `scope` (the blobs written so far) grows."""
    findings = []
    for layer in network.layers:
        kind = layer_type(layer)
        where = f"{model_path}{net_path}{layer.name}"
        if kind in _RECURRENT_IO:
            findings += _recurrent_io(layer, kind, where)
        if kind == "branch":  # Core ML checks a branch's condition before its branches
            findings += _undefined(layer, scope, where, net_path)
        if kind in _NESTED_SCOPES:
            findings += _NESTED_SCOPES[kind](getattr(layer, kind), scope, model_path, f"{net_path}{layer.name}.")
        if kind != "branch":  # ... and every other layer's inputs after its nested networks
            findings += _undefined(layer, scope, where, net_path)
        scope.update(layer.output)
    return findings


def _undefined(layer, scope: set[str], where: str, net_path: str) -> list[Finding]:
    layers = "no earlier layer of this or an enclosing network" if net_path else "no earlier layer"
    return [
        Finding("error", "undefined-input", where, f"reads '{name}', which is not a model input and {layers} writes")
        for name in dict.fromkeys(layer.input) if name not in scope
    ]


def _recurrent_io(layer, kind: str, where: str) -> list[Finding]:
    (low, high), outs = _RECURRENT_IO[kind]
    if low <= len(layer.input) <= high and len(layer.output) == outs:
        return []
    ins = str(low) if low == high else f"{low} to {high}"
    return [Finding("error", "recurrent-io", where,
                    f"{kind} has {len(layer.input)} input(s) and {len(layer.output)} output(s); Core ML needs {ins} "
                    f"inputs and exactly {outs} outputs (the sequence, then the recurrent state)")]


def _branch_scopes(p, scope, model_path, prefix) -> list[Finding]:
    """Both branches see the enclosing blobs; afterwards only blobs written by both are defined."""
    then_scope, else_scope = set(scope), set(scope)
    findings = _check_network(p.ifBranch, then_scope, model_path, f"{prefix}ifBranch/")
    if p.elseBranch.layers:
        findings += _check_network(p.elseBranch, else_scope, model_path, f"{prefix}elseBranch/")
        scope |= then_scope & else_scope
    return findings


def _loop_scopes(p, scope, model_path, prefix) -> list[Finding]:
    """The condition network's blobs join the enclosing scope; the body's only when there is no condition
    network (with one, only those the condition network also writes, which are already in)."""
    findings = []
    if p.conditionNetwork.layers:
        findings += _check_network(p.conditionNetwork, scope, model_path, f"{prefix}conditionNetwork/")
    body_scope = set(scope)
    findings += _check_network(p.bodyNetwork, body_scope, model_path, f"{prefix}bodyNetwork/")
    if not p.conditionNetwork.layers:
        scope |= body_scope
    return findings


_NESTED_SCOPES = {"branch": _branch_scopes, "loop": _loop_scopes}


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
