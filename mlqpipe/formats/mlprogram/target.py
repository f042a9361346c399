"""Raising an ML program's deployment target: every function's opset and the specification version.

Compressed-weight ops need a minimum OS (any constexpr iOS16; int4, per-block, grouped, vector and 3-bit
LUTs, per-channel scales and joint chains iOS18). Raising is never a side effect in recipes (the recipe
says `deployment_target:`); coremltools' API raises iOS15 programs to iOS16 silently, ours with a warning.

A function's ops are kept as they are: MIL opsets only add op versions, so a program valid in CoreML6 is
valid in CoreML8 — except the three constexpr ops iOS18 redefines with inputs instead of attributes
(lut_to_dense, sparse_to_dense, cast). A function that already holds those in the iOS16 form is refused
rather than silently re-encoded.
"""

from __future__ import annotations

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram import proto
from mlqpipe.formats.mlprogram.program import active_block, walk

# deployment target -> (specificationVersion, opset)
TARGETS = {"iOS15": (6, "CoreML5"), "iOS16": (7, "CoreML6"), "iOS17": (8, "CoreML7"), "iOS18": (9, "CoreML8"),
           "iOS26": (10, "CoreML9")}
OPSET_TARGET = {opset: name for name, (_, opset) in TARGETS.items()}
SPEC_TARGET = {spec: name for name, (spec, _) in TARGETS.items()}
_REDEFINED_IN_IOS18 = ("constexpr_lut_to_dense", "constexpr_sparse_to_dense", "constexpr_cast")


def spec_of(target: str) -> int:
    return TARGETS[target][0]


def target_of(model) -> str:
    """The lowest deployment target among the model's functions (what the program needs at least)."""
    opsets = [fn.opset for _, fn in ((e.key, e.value) for e in model.spec.mlProgram.functions)]
    known = [spec_of(OPSET_TARGET[o]) for o in opsets if o in OPSET_TARGET]
    return SPEC_TARGET.get(min(known, default=model.spec.specificationVersion), "iOS15")


def raise_target(model, target: str) -> list[str]:
    """Raise every function below `target` to its opset and the spec version to at least its version, in
    place; returns what changed ("function 'main': opset CoreML6 -> CoreML8", "specificationVersion 7 -> 9"),
    empty when the model already targets it."""
    if target not in TARGETS:
        raise ModelError(f"unknown deployment target {target!r}; choose one of {', '.join(TARGETS)}")
    spec, opset = TARGETS[target]
    changes = []
    for entry in model.spec.mlProgram.functions:
        name, fn = entry.key, entry.value
        old = fn.opset
        if old not in OPSET_TARGET:
            raise ModelError(f"{model.source}: function '{name}' has opset {old!r}, which no deployment target names")
        if spec_of(OPSET_TARGET[old]) >= spec:
            continue
        if spec_of(OPSET_TARGET[old]) < spec_of("iOS18") <= spec:
            _refuse_ios16_constexprs(model, name, old, target)
        active_block(name, fn, model.source)  # a function without its opset's block is damaged: say so
        if proto.find_entry(fn.block_specializations, opset) is not None:
            raise ModelError(f"{model.source}: function '{name}' already has a block for {opset} beside its {old} one; "
                             "the model is ambiguous (re-export it)")
        for e in fn.block_specializations:  # renamed in place: the entries keep their order
            if e.key == old:
                e.key = opset
        fn.opset = opset
        changes.append(f"function '{name}': opset {old} ({OPSET_TARGET[old]}) -> {opset} ({target})")
    if model.spec.specificationVersion < spec:
        changes.append(f"specificationVersion {model.spec.specificationVersion} -> {spec}")
        model.spec.specificationVersion = spec
    return changes


def _refuse_ios16_constexprs(model, function: str, opset: str, target: str) -> None:
    for site in walk(model.spec.mlProgram, model.source):
        if site.function == function and site.op.type in _REDEFINED_IN_IOS18:
            raise ModelError(
                f"{model.source}: function '{function}' holds op '{site.name}' ({site.op.type}) in its {opset} form, "
                f"which {target} defines differently; decompress it first (a dequantize stage) or keep the deployment target")
