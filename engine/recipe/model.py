"""The recipe data model: which models feed which component of which output (plain dataclasses)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Component ids an [[output]] may name, over all known architectures.


class RecipeError(Exception):
    """A recipe that cannot be read. ``reasons`` lists every structural problem found."""

    def __init__(self, path: str | os.PathLike, reasons: str | list[str]):
        self.path = str(path)
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        if len(self.reasons) == 1:
            message = f"{self.path}: {self.reasons[0]}"
        else:
            message = f"{self.path}: {len(self.reasons)} problems:\n" + "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(message)


@dataclass
class ModelEntry:
    id: str
    path: Path  # as written in the recipe; relative paths resolve against Recipe.base_dir
    sha256: str | None = None  # pinned full SHA256 (64 hex) or AutoV2 (10 hex), lower case


@dataclass
class OutputSpec:
    path: Path  # as written; relative paths resolve against Recipe.base_dir
    sources: dict[str, str]  # component id -> selection name
    dtype: str | None = None  # None: the recipe's dtype
    title: str | None = None  # None: the file name's stem


@dataclass
class Recipe:
    name: str
    models: dict[str, ModelEntry]
    select: dict[str, list[str]]
    outputs: list[OutputSpec]
    arch: str | None = None
    dtype: str = "fp16"
    device: str = "auto"
    # how much a method may hold in memory ("8GB"; engine.recipe.sizes): a run setting, like device
    memory: str | None = None
    weights: dict[str, float] = field(default_factory=dict)
    strict: bool = False
    skip_nan: bool = False
    date: str | None = None
    base_dir: Path = field(default_factory=Path)
    metadata: dict[str, str] = field(default_factory=dict)
    # selection -> its [methods.<selection>] table as written (engine.methods.params fills the
    # preset's defaults); a selection without one is the weighted mean
    methods: dict[str, dict[str, object]] = field(default_factory=dict)

    def resolve(self, path: str | os.PathLike) -> Path:
        """``path`` from the recipe as a usable path (relative ones against ``base_dir``)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def model_path(self, model_id: str) -> Path:
        return self.resolve(self.models[model_id].path)

    def output_path(self, output: OutputSpec) -> Path:
        return self.resolve(output.path)

    def output_dtype(self, output: OutputSpec) -> str:
        return output.dtype or self.dtype

    def weight(self, model_id: str) -> float:
        return self.weights.get(model_id, 1.0)
