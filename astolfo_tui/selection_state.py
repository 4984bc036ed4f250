"""What the user has picked in the grid: for each selection (a grid column) the model ids ticked,
the single VAE source, and the recipe settings around them (name, outputs, dtype, device).

A plain class with no Textual in it, so it is tested directly; it converts to and from
``engine.recipe.model.Recipe``, which is what gets saved, checked and merged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoint.architectures import component_ids
from engine.hashes.relations import selection_duplicates
from engine.library.report import ModelReport, Severity
from engine.recipe.model import ModelEntry, OutputSpec, Recipe

SDXL_COLUMNS = (("te0", "te0"), ("te1", "te1"), ("unet", "unet"), ("nsfw", "unet"), ("vae", "vae"))
SD15_COLUMNS = (("te", "te"), ("unet", "unet"), ("vae", "vae"))
COMPONENT_IDS = component_ids()  # every component a recipe may name


@dataclass
class SelectionColumn:
    """One grid column: a named selection of models for one component."""

    name: str
    component: str  # the component its ticks take from each model
    ids: set[str] = field(default_factory=set)

    @property
    def single(self) -> bool:
        """The VAE comes from one model: averaging VAEs is not what mixers do."""
        return self.component == "vae"


def refusal(report: ModelReport, component: str, nan_counts: dict[str, int] | None = None) -> str | None:
    """Why ``component`` of this model cannot be ticked, or None when it can."""
    file_errors = [f.message for f in report.findings if f.severity >= Severity.ERROR]
    if file_errors:
        return "; ".join(file_errors)
    comp = report.component(component)
    if comp is None:
        arch = report.arch or report.kind
        return f"{component} is not part of this {arch} file"
    if not comp.mergeable:
        return comp.problem
    bad = (nan_counts or {}).get(component, 0)
    if bad:
        return f"{component} has {bad} NaN/Inf values"
    return None


class SelectionState:
    """The user's picks over an ordered list of models (the scan order)."""

    def __init__(
        self, reports: list[ModelReport], base_dir: Path, name: str = "mix", output_dir: Path | None = None
    ) -> None:
        self.reports: dict[str, ModelReport] = {r.model_id: r for r in reports}
        self.order: list[str] = [r.model_id for r in reports]
        self.base_dir = Path(base_dir)
        # where new outputs go: outside every scanned folder (engine.library.outputs)
        self.output_dir = Path(output_dir) if output_dir is not None else self.base_dir
        self.name = name
        self.dtype = "fp16"
        self.device = "auto"
        self.weights: dict[str, float] = {}
        self.strict = False
        self.skip_nan = False
        self.date: str | None = None
        self.metadata: dict[str, str] = {}
        # selection -> its [methods.<selection>] table as the user set it (no entry: the mean)
        self.methods: dict[str, dict[str, object]] = {}
        self.arch = _majority_arch(reports)
        layout = SD15_COLUMNS if self.arch == "sd15" else SDXL_COLUMNS
        self.columns: dict[str, SelectionColumn] = {n: SelectionColumn(n, c) for n, c in layout}
        self.outputs: list[OutputSpec] = [
            self._default_output(c) for c in self.columns.values() if c.component == "unet"
        ]
        # component id -> NaN/Inf count per model, filled in as hashing finishes
        self.nan_counts: dict[str, dict[str, int]] = {}
        self.sha256: dict[str, str] = {}

    # -- picking -----------------------------------------------------------------------------

    def refusal(self, column: str, model_id: str) -> str | None:
        col = self.columns[column]
        return refusal(self.reports[model_id], col.component, self.nan_counts.get(model_id))

    def is_ticked(self, column: str, model_id: str) -> bool:
        return model_id in self.columns[column].ids

    def set(self, column: str, model_id: str, on: bool) -> str | None:
        """Tick or untick; returns the refusal reason when ticking is not allowed."""
        col = self.columns[column]
        if not on:
            col.ids.discard(model_id)
            return None
        reason = self.refusal(column, model_id)
        if reason:
            return reason
        if col.single:
            col.ids = {model_id}
        else:
            col.ids.add(model_id)
        return None

    def toggle(self, column: str, model_id: str) -> str | None:
        return self.set(column, model_id, not self.is_ticked(column, model_id))

    def set_many(self, column: str, model_ids: list[str], on: bool) -> list[str]:
        """Tick or untick many models; returns the ids that were refused."""
        refused = []
        for mid in model_ids:
            if self.set(column, mid, on):
                refused.append(mid)
        return refused

    def is_output(self, model_id: str) -> bool:
        """A mix astolfo wrote: shown as an output; a bulk action never ticks it (a tick of its
        own cell still does: a mix of mixes is a choice)."""
        return self.reports[model_id].is_astolfo_output

    def toggle_column(self, column: str, model_ids: list[str]) -> list[str]:
        """All of ``model_ids`` that can be ticked become ticked; if they already all were,
        all become unticked. Returns the ids whose change was refused. Outputs are left out."""
        col = self.columns[column]
        model_ids = [m for m in model_ids if not self.is_output(m) or m in col.ids]
        allowed = [m for m in model_ids if not self.refusal(column, m)]
        on = not all(m in col.ids for m in allowed)
        if col.single:
            return [] if on else self.set_many(column, model_ids, False)
        self.set_many(column, allowed, on)
        return [m for m in model_ids if m not in allowed] if on else []

    def invert(self, column: str, model_ids: list[str]) -> list[str]:
        col = self.columns[column]
        if col.single:
            return []
        refused = []
        for mid in model_ids:
            if mid in col.ids:
                col.ids.discard(mid)
            elif self.is_output(mid):
                continue
            elif self.set(column, mid, True):
                refused.append(mid)
        return refused

    def clear(self, column: str) -> None:
        self.columns[column].ids.clear()

    def ordered(self, column: str) -> list[str]:
        ids = self.columns[column].ids
        return [m for m in self.order if m in ids]

    def count(self, column: str) -> int:
        return len(self.columns[column].ids)

    def selections(self) -> dict[str, list[str]]:
        return {name: self.ordered(name) for name in self.columns}

    def rebased(self, reports: list[ModelReport]) -> "SelectionState":
        """The same picks and settings over a new scan of the folders. Models are followed by
        file path (a positional id can move when files come and go); picks that are no longer
        allowed (file gone or now broken) are dropped."""
        if not self.order:
            return SelectionState(reports, self.base_dir, self.name, self.output_dir)
        new = SelectionState(reports, self.base_dir, self.name, self.output_dir)
        by_path = {_resolved(r.path): r.model_id for r in reports}
        moved = {mid: by_path.get(_resolved(r.path)) for mid, r in self.reports.items()}
        new.arch = self.arch
        new.columns = {}
        for name, col in self.columns.items():
            new.columns[name] = SelectionColumn(name, col.component)
            new.set_many(name, [moved[m] for m in self.ordered(name) if moved.get(m)], True)
        new.outputs = [
            OutputSpec(path=o.path, sources=dict(o.sources), dtype=o.dtype, title=o.title) for o in self.outputs
        ]
        new.dtype, new.device, new.strict, new.skip_nan, new.date = (
            self.dtype,
            self.device,
            self.strict,
            self.skip_nan,
            self.date,
        )
        new.metadata = dict(self.metadata)
        new.weights = {moved[m]: w for m, w in self.weights.items() if moved.get(m)}
        new.methods = {sel: _with_base(fields, moved) for sel, fields in self.methods.items() if sel in new.columns}
        return new

    # -- columns -----------------------------------------------------------------------------

    def add_column(self, name: str, component: str) -> None:
        if name in self.columns:
            raise ValueError(f"there is already a selection named {name!r}")
        if component not in COMPONENT_IDS:
            raise ValueError(f"unknown component {component!r} (one of {', '.join(COMPONENT_IDS)})")
        self.columns[name] = SelectionColumn(name, component)
        if component == "unet":
            self.outputs.append(self._default_output(self.columns[name]))

    def rename_column(self, old: str, new: str) -> None:
        if new in self.columns:
            raise ValueError(f"there is already a selection named {new!r}")
        self.columns = {(new if k == old else k): v for k, v in self.columns.items()}
        self.columns[new].name = new
        if old in self.methods:
            self.methods[new] = self.methods.pop(old)
        for out in self.outputs:
            out.sources = {c: (new if s == old else s) for c, s in out.sources.items()}

    def remove_column(self, name: str) -> None:
        """Drop a selection; outputs whose UNet came from it go too, others lose that source."""
        col = self.columns.pop(name)
        self.methods.pop(name, None)
        kept = []
        for out in self.outputs:
            if out.sources.get("unet") == name:
                continue
            out.sources = {c: s for c, s in out.sources.items() if s != name}
            kept.append(out)
        self.outputs = kept
        del col

    def _default_output(self, unet_column: SelectionColumn) -> OutputSpec:
        sources = {c.component: c.name for c in self.columns.values() if c.component != "unet"}
        sources["unet"] = unet_column.name
        suffix = "base" if unet_column.name == "unet" else unet_column.name
        return OutputSpec(path=self.output_dir / f"{self.name}-{suffix}.safetensors", sources=sources, dtype=None)

    # -- methods and weights -----------------------------------------------------------------

    def set_method(self, column: str, fields: dict[str, object] | None) -> None:
        """How selection ``column`` is combined: its methods table as the user wrote it; None
        or ``method = "mean"`` (the default) removes the table."""
        if not fields or fields.get("method", "mean") == "mean":
            self.methods.pop(column, None)
        else:
            self.methods[column] = dict(fields)

    def method_name(self, column: str) -> str:
        return str(self.methods.get(column, {}).get("method", "mean"))

    def set_weight(self, model_id: str, weight: float | None) -> None:
        """A model's [weights] entry; None or 1 (the default) removes it."""
        if weight is None or weight == 1.0:
            self.weights.pop(model_id, None)
        else:
            self.weights[model_id] = float(weight)

    def weight(self, model_id: str) -> float:
        return self.weights.get(model_id, 1.0)

    # -- recipes -----------------------------------------------------------------------------

    def to_recipe(self) -> Recipe:
        """The recipe for the current picks: only the models some selection uses are listed,
        each pinned to its SHA256 when hashing has produced one."""
        bases = {f.get("base") for sel, f in self.methods.items() if sel in self.columns}
        used = [m for m in self.order if m in bases or any(m in c.ids for c in self.columns.values())]
        models = {m: ModelEntry(id=m, path=self.reports[m].path, sha256=self.sha256.get(m)) for m in used}
        return Recipe(
            name=self.name,
            models=models,
            select=self.selections(),
            outputs=[
                OutputSpec(path=o.path, sources=dict(o.sources), dtype=o.dtype, title=o.title) for o in self.outputs
            ],
            arch=self.arch,
            dtype=self.dtype,
            device=self.device,
            weights={m: w for m, w in self.weights.items() if m in models},
            strict=self.strict,
            skip_nan=self.skip_nan,
            date=self.date,
            base_dir=self.base_dir,
            metadata=dict(self.metadata),
            methods={sel: dict(f) for sel, f in self.methods.items() if sel in self.columns},
        )

    def apply_recipe(self, recipe: Recipe) -> list[str]:
        """Replace the picks with a recipe's. Models are matched to the library by file path,
        then by id; returns a message for each recipe model not found in the library."""
        by_path = {_resolved(r.path): mid for mid, r in self.reports.items()}
        mapping: dict[str, str] = {}
        missing = []
        for rid, entry in recipe.models.items():
            mid = by_path.get(_resolved(entry.path)) or (rid if rid in self.reports else None)
            if mid is None:
                missing.append(f"{rid}: {entry.path} is not in the library")
            else:
                mapping[rid] = mid
        components = _selection_components(recipe)
        self.columns = {}
        for name, ids in recipe.select.items():
            col = SelectionColumn(name, components.get(name, "unet"))
            col.ids = {mapping[i] for i in ids if i in mapping}
            self.columns[name] = col
        self.name = recipe.name
        self.outputs = [
            OutputSpec(path=o.path, sources=dict(o.sources), dtype=o.dtype, title=o.title) for o in recipe.outputs
        ]
        self.metadata = dict(recipe.metadata)
        self.dtype = recipe.dtype
        self.device = recipe.device
        self.weights = {mapping[i]: w for i, w in recipe.weights.items() if i in mapping}
        self.methods = {sel: _with_base(f, mapping) for sel, f in recipe.methods.items() if sel in self.columns}
        self.strict = recipe.strict
        self.skip_nan = recipe.skip_nan
        self.date = recipe.date
        self.base_dir = Path(recipe.base_dir)
        if recipe.arch:
            self.arch = recipe.arch
        return missing

    # -- what the grid shows -----------------------------------------------------------------

    def problems_in(self, model_id: str) -> bool:
        return self.reports[model_id].severity >= Severity.WARNING or any(self.nan_counts.get(model_id, {}).values())

    def duplicates(self, hashes) -> list:
        """The catalog's warnings for selections that would average one component twice
        (``hashes``: model id -> FileHashes of the models hashed so far)."""
        components = {name: col.component for name, col in self.columns.items() if not col.single}
        return selection_duplicates(self.selections(), components, hashes)

    def selected_anywhere(self, model_id: str) -> bool:
        return any(model_id in c.ids for c in self.columns.values())


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(path).absolute()


def _with_base(fields: dict[str, object], ids: dict) -> dict[str, object]:
    """A methods table with its base renamed through ``ids`` (recipe or old id -> library id);
    a base not found stays as written, so the check names it."""
    out = dict(fields)
    base = out.get("base")
    if isinstance(base, str) and ids.get(base):
        out["base"] = ids[base]
    return out


def _majority_arch(reports: list[ModelReport]) -> str:
    counts = Counter(r.arch for r in reports if r.arch)
    return counts.most_common(1)[0][0] if counts else "sdxl"


def _selection_components(recipe: Recipe) -> dict[str, str]:
    """Which component each selection feeds: its own name when that is a component id, else
    what the outputs use it for, else the UNet (a second UNet variant is the common case)."""
    out: dict[str, str] = {}
    for name in recipe.select:
        if name in COMPONENT_IDS:
            out[name] = name
    for spec in recipe.outputs:
        for comp, sel in spec.sources.items():
            out.setdefault(sel, comp)
    return out
