"""The merge plan's data model (a leaf: it imports no other part of the plan). ``Problem`` is
what the checks report; a ``MergePlan`` is what ``plan.planner.build_plan`` returns when no
problem is an error:

- **nodes**: one per distinct tensor to compute. A node is the weighted mean of one key over
  the models of a selection that have it (``mean``), one model's tensor (``copy``: one-model
  selections, buffers, keys outside every component), or ``arange`` (``position_ids``, never
  averaged), or ``method``: a selection's merge method other than the mean
  (``engine.methods``), whose first source is the base and the rest the models. Outputs that
  use the same selection for a component share its nodes, so the mean is
  computed once.
- **steps**: nodes grouped by output key, in the order the outputs write them. A step reads
  each source tensor it needs once and feeds every node that uses it.
- **outputs**: per file, its tensors in safetensors' canonical order and the node of each.

The merge itself (``engine.merge.run.execute``) only follows the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoint.architectures import Architecture
from engine.checkpoint.format import DTYPES, TensorPlan
from engine.library.report import ModelReport, Severity
from engine.recipe.model import Recipe

OUTPUT_DTYPE = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}

MEAN, COPY, ARANGE, METHOD = "mean", "copy", "arange", "method"



@dataclass
class Problem:
    severity: Severity
    message: str
    model_id: str | None = None
    output: str | None = None
    code: str = ""

    def to_dict(self) -> dict:
        return {"severity": self.severity.label, "code": self.code, "message": self.message,
                "model_id": self.model_id, "output": self.output}


class PlanError(Exception):
    """The recipe cannot be merged; ``problems`` lists every problem (errors and warnings)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        errors = [p for p in problems if p.severity >= Severity.ERROR]
        lines = "\n".join(f"  - {p.message}" for p in errors)
        super().__init__(f"the recipe cannot be merged ({len(errors)} problem{'s' * (len(errors) != 1)}):\n{lines}")


@dataclass(frozen=True)
class Source:
    """One stored tensor a node reads."""

    file: int  # index into MergePlan.files
    key: str  # key as stored in that file
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    weight: float = 1.0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass
class Node:
    id: int
    kind: str  # MEAN | COPY | ARANGE | METHOD
    key: str  # output key
    shape: tuple[int, ...]
    sources: tuple[Source, ...]
    check_finite: bool  # stop (or skip, with skip_nan) on NaN/Inf in a source
    dtype: str | None = None  # fixed output dtype (copies of buffers, arange); None: the output's
    factors: tuple[float, ...] = ()  # multiplier of each source in the sum (see plan.build.exact_factors)
    # METHOD: the parameters (engine.methods.params.MethodParams); sources[0] is the base and
    # factors[0] is unused (1.0); the models' factors are their weights times ``scale``
    method: object | None = None
    scale: float = 1.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Step:
    key: str
    nodes: list[int]
    sources: list[Source]  # distinct stored tensors the step reads


@dataclass
class SourceFile:
    model_id: str
    path: Path
    size: int
    mtime_ns: int
    report: ModelReport
    sha256_pin: str | None = None


@dataclass
class OutputPlan:
    index: int
    path: Path  # absolute
    dtype: str  # safetensors dtype of merged weights: F16 | BF16 | F32
    title: str
    sources: dict[str, str]  # component id -> selection
    tensors: list[TensorPlan]  # write order
    nodes: list[int]  # node id of each tensor
    metadata: dict[str, str] = field(default_factory=dict)  # filled by the merge (needs hashes)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class MergePlan:
    recipe: Recipe
    arch: Architecture
    device: str
    files: list[SourceFile]
    nodes: list[Node]
    steps: list[Step]
    outputs: list[OutputPlan]
    problems: list[Problem]  # warnings and notes (a plan has no errors)
    hashes: dict = field(default_factory=dict)  # model id -> FileHashes known without reading

    @property
    def tensor_count(self) -> int:
        return sum(len(o.tensors) for o in self.outputs)

    @property
    def bytes_to_read(self) -> int:
        return sum(s.nbytes for step in self.steps for s in step.sources)

    @property
    def bytes_to_write(self) -> int:
        """Tensor data of every output (headers add a few hundred KB)."""
        return sum(o.data_bytes for o in self.outputs)

    @property
    def uses_methods(self) -> bool:
        """Some node is a merge method's (``[methods]``), not a weighted mean or a copy."""
        return any(n.kind == METHOD for n in self.nodes)
