"""The hash data model: what a file's hashes are, as plain dataclasses (no torch), shared by
the hasher, the SQLite catalog, the CLI and the TUI.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

from engine.library.report import Finding, ModelReport, Severity

# Bump when any definition below changes: the catalog re-hashes files hashed by another version.
HASH_VERSION = 1
SHORT_HEX = 8

# te0 keys carry "transformer." after the prefix where SD 1.5's te prefix already includes it.
_REL_KEY_STRIP = {"te0": "transformer."}

ProgressFn = Callable[[int, int], None]


class HashError(Exception):
    """A file could not be hashed. The message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class HashCancelled(HashError):
    """Hashing was stopped by its cancel event; nothing was produced for this file."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, "hashing cancelled")


# --------------------------------------------------------------------------- the toolkit metric


@dataclass(frozen=True)
class MetricReference:
    """One of arenasys' model-toolkit reference sums: ``ref`` is the sum for the original SD1
    component, ``k`` the scale of the 4-digit number, ``select`` picks the keys it sums."""

    name: str
    ref: float
    k: int
    select: Callable[[str], bool]


CLIP_METRIC = MetricReference("CLIP-v1", -2097.8596, 1_000_000, lambda key: "mlp." in key and ".23." not in key)
VAE_METRIC = MetricReference("VAE-v1", 17870.7051, 10_000, lambda key: "encoder." in key or "decoder." in key)


def metric_string(total: float, ref: MetricReference) -> str | None:
    """The toolkit's 4-digit form of ``total``: ``int(|total/ref - 1| * k)`` folded below 10000
    by subtracting 5000 (done here in one step, which a loop would take ages to do for huge n).
    None where the toolkit prints "----" (nothing summed) or the sum is not finite."""
    if total == 0 or not math.isfinite(total):
        return None
    n = int(abs(total / ref.ref - 1) * ref.k)
    if n >= 10000:
        n = 5000 + n % 5000
    return f"{n:04d}"


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ComponentHashes:
    exact: str  # 64 hex
    fp16: str  # 64 hex
    metric: str | None  # toolkit 4-digit metric, where a reference exists
    nan_count: int
    inf_count: int
    tensors: int = 0
    metric_sum: float | None = None  # the raw toolkit sum behind ``metric``

    @property
    def exact_short(self) -> str:
        return self.exact[:SHORT_HEX]

    @property
    def nonfinite(self) -> int:
        return self.nan_count + self.inf_count

    def to_dict(self) -> dict:
        return {
            "exact": self.exact,
            "fp16": self.fp16,
            "metric": self.metric,
            "nan_count": self.nan_count,
            "inf_count": self.inf_count,
            "tensors": self.tensors,
            "metric_sum": self.metric_sum,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ComponentHashes":
        return cls(
            exact=d["exact"],
            fp16=d["fp16"],
            metric=d.get("metric"),
            nan_count=int(d.get("nan_count", 0)),
            inf_count=int(d.get("inf_count", 0)),
            tensors=int(d.get("tensors", 0)),
            metric_sum=d.get("metric_sum"),
        )


@dataclass(frozen=True)
class FileHashes:
    sha256: str  # 64 hex
    autov1: str  # 8 hex
    autov3: str | None  # 64 hex; None for a file without a valid safetensors header
    components: dict[str, ComponentHashes] = field(default_factory=dict)
    size: int = 0
    arch: str | None = None
    version: int = HASH_VERSION

    @property
    def autov2(self) -> str:
        return self.sha256[:10]

    @property
    def autov3_short(self) -> str | None:
        return self.autov3[:12] if self.autov3 else None

    def to_dict(self) -> dict:
        return {
            "sha256": self.sha256,
            "autov1": self.autov1,
            "autov2": self.autov2,
            "autov3": self.autov3,
            "size": self.size,
            "arch": self.arch,
            "version": self.version,
            "components": {cid: c.to_dict() for cid, c in self.components.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FileHashes":
        return cls(
            sha256=d["sha256"],
            autov1=d["autov1"],
            autov3=d.get("autov3"),
            components={cid: ComponentHashes.from_dict(c) for cid, c in d.get("components", {}).items()},
            size=int(d.get("size", 0)),
            arch=d.get("arch"),
            version=int(d.get("version", 0)),
        )


def nonfinite_findings(hashes: FileHashes) -> list[Finding]:
    """One ERROR finding per component holding NaN or Inf values, with the counts: the scan
    and the TUI merge these into the model's report."""
    out = []
    for cid, comp in hashes.components.items():
        if comp.nonfinite:
            parts = []
            if comp.nan_count:
                parts.append(f"{comp.nan_count:,} NaN")
            if comp.inf_count:
                parts.append(f"{comp.inf_count:,} Inf")
            out.append(
                Finding(Severity.ERROR, "nonfinite_values", f"{cid} has {' and '.join(parts)} values", cid)
            )
    return out


def add_nonfinite_findings(report: ModelReport, hashes: FileHashes) -> None:
    """Merge ``nonfinite_findings`` into ``report``'s components (each finding once, however
    often this is called), so the grid and the merge planner see NaN/Inf like any other error."""
    for finding in nonfinite_findings(hashes):
        comp = report.components.get(finding.component)
        target = comp.findings if comp is not None else report.findings
        if finding not in target:
            target.append(finding)


def relative_key(cid: str, prefix: str, canonical_key: str) -> str:
    """The key a component hash uses: the canonical key without the component prefix."""
    rel = canonical_key[len(prefix):]
    strip = _REL_KEY_STRIP.get(cid)
    if strip and rel.startswith(strip):
        rel = rel[len(strip):]
    return rel
