"""The validated recipe as typed, immutable objects; nothing downstream touches raw YAML data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlqpipe.fileio import without_model_suffix


@dataclass(frozen=True)
class Range:
    min: int | None = None
    max: int | None = None

    def contains(self, value: int | None) -> bool:
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


@dataclass(frozen=True)
class CoremltoolsSelector:
    """coremltools' selector settings, for rules that reproduce a quantize_weights call exactly."""

    type: str  # default | advanced | matrix_multiply
    settings: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    layer: tuple[str, ...] = ()
    layer_regex: tuple[str, ...] = ()
    layer_type: tuple[str, ...] = ()
    field: tuple[str, ...] = ()
    network: tuple[str, ...] = ()
    function: tuple[str, ...] = ()  # ML programs: globs over the functions holding the weight
    count: Range | None = None
    in_channels: Range | None = None
    out_channels: Range | None = None
    kernel_channels: Range | None = None
    layer_weight_count: Range | None = None
    depthwise: bool | None = None
    position: tuple[str, ...] = ()  # "first", "last"
    storage: tuple[str, ...] = ()
    coremltools_selector: CoremltoolsSelector | None = None
    python: str | None = None
    exclude: bool = False
    optional: bool = False
    min_snr_db: float | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    mode: str
    nbits: int | None = None
    rules: tuple[str, ...] = ()
    function: str | None = None
    fold: tuple[str, ...] = ()
    coremltools_rounding: bool = False
    # ML-program settings (None: not set in the recipe; engine/modes.py's ModeSettings gives the defaults)
    dtype: str | None = None
    granularity: str | None = None
    block_size: int | tuple[int, ...] | None = None
    group_size: int | None = None
    channel_axis: int | None = None
    cluster_dim: int | None = None
    per_channel_scale: bool | None = None
    lut_dtype: str | None = None
    target_sparsity: float | None = None
    n_m: tuple[int, int] | None = None
    dim: int | None = None
    threshold: float | None = None
    minimum_sparsity: float | None = None
    joint: bool | None = None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.mode}{f' {self.nbits}-bit' if self.nbits else ''}{f' {self.dtype}' if self.dtype else ''})"

    def keys_set(self) -> tuple[str, ...]:
        """The weight settings this stage's recipe entry gives (what a format is asked to read)."""
        return tuple(k for k in STAGE_SETTINGS if getattr(self, k) not in (None, False))


# the stage keys that are weight settings (besides mode, name, rules, fold)
STAGE_SETTINGS = ("nbits", "function", "coremltools_rounding", "dtype", "granularity", "block_size", "group_size",
                  "channel_axis", "cluster_dim", "per_channel_scale", "lut_dtype", "target_sparsity", "n_m", "dim",
                  "threshold", "minimum_sparsity", "joint")


@dataclass(frozen=True)
class Gates:
    min_snr_db: float | None = None
    max_size_bytes: int | None = None
    min_compression: float | None = None
    min_top1_agreement: float | None = None
    max_output_error: float | None = None
    max_accuracy_drop: float | None = None
    min_accuracy: float | None = None


@dataclass(frozen=True)
class Evaluation:
    data: Path | None = None
    inputs: tuple[tuple[str, str], ...] = ()
    labels: str | None = None
    random_inputs: int | None = None
    allow_unevaluated: bool = False
    max_samples: int | None = None
    memory_mb: int | None = None


@dataclass(frozen=True)
class Candidate:
    """A setting the search may choose for a weight group: `stage` (a stage whose rules are the group's),
    or None for keep (the group stays as the fixed stages left it)."""

    stage: Stage | None
    at: tuple = ()  # where the recipe writes it (search.candidates[j], or search.rules.NAME[j])

    @property
    def label(self) -> str:
        if self.stage is None:
            return "keep"
        s = self.stage
        extra = [f"{k} {getattr(s, k)}" for k in s.keys_set() if k != "nbits"]
        return " ".join([s.mode] + ([str(s.nbits)] if s.nbits else []) + extra)


@dataclass(frozen=True)
class Search:
    """What `mlqpipe search` looks for: per group (a rule's weights in one model, or one weight), the smallest
    candidate such that the model keeps `gates` on the search data."""

    rules: tuple[str, ...]
    candidates: dict  # rule name -> tuple[Candidate, ...], keep first
    per_weight: bool = False
    evaluation: "Evaluation | None" = None  # None: each model's own evaluation
    gates: "Gates | None" = None  # None: each model's own relative gates
    max_size_bytes: int | None = None
    output: str = "{recipe}.resolved.yaml"


@dataclass(frozen=True)
class Report:
    formats: tuple[str, ...] = ("json", "markdown")
    path: str | None = None


@dataclass(frozen=True)
class ModelJob:
    """One input model of a recipe with everything that applies to it resolved."""

    input: Path
    output: Path
    stages: tuple[Stage, ...]
    gates: Gates
    evaluation: Evaluation | None
    entry: int  # index in the recipe's models list
    deployment_target: str | None = None  # ML programs: raise the model's target to this before the stages


@dataclass(frozen=True)
class Recipe:
    path: Path
    files: tuple[Path, ...]  # the recipe and every file it extends
    rules: tuple[Rule, ...]
    stages: tuple[Stage, ...]
    models: tuple[ModelJob, ...]
    report: Report
    gates: Gates
    python_path: tuple[Path, ...]
    search: Search | None = None
    document: dict = field(compare=False, repr=False, default_factory=dict)  # the merged document, for digests
    locations: dict = field(compare=False, repr=False, default_factory=dict)  # path -> (file, line, col)

    def rule(self, name: str) -> Rule:
        return next(r for r in self.rules if r.name == name)

    @property
    def resolved_path(self) -> Path | None:
        """Where `mlqpipe search` writes this recipe's result (beside it); None without a search."""
        return None if self.search is None else self.path.parent / self.search.output.format(recipe=self.path.stem)

    def where(self, *path) -> str:
        file, line, col = self.locations.get(tuple(path), (str(self.path), 0, 0))
        return f"{file}:{line}:{col}" if line else file

    def report_paths(self, job: ModelJob) -> tuple[Path, Path, Path]:
        """Where the JSON, Markdown and PNG reports of `job` go: report.path (a template) or beside the output."""
        if self.report.path:
            base = self.path.parent / self.report.path.format(stem=job.input.stem, name=job.input.name, recipe=self.path.stem)
        else:
            out = Path(job.output)
            base = out.with_name(without_model_suffix(out.name))
        return Path(f"{base}.report.json"), Path(f"{base}.report.md"), Path(f"{base}.report.png")

    def written_reports(self, job: ModelJob) -> list[Path]:
        """The report files of `job` in the formats this recipe asks for."""
        return [p for p, fmt in zip(self.report_paths(job), ("json", "markdown", "png")) if fmt in self.report.formats]
