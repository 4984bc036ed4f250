"""What astolfo knows about one file after reading its header: the plain data that the scan,
the catalog, the merge planner, the CLI and the TUI all share.

Errors a user must see are values here (findings), not exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path


class Severity(IntEnum):
    OK = 0  # informational: worth showing, nothing wrong
    WARNING = 1  # still mergeable (e.g. position_ids missing: astolfo writes arange(77))
    ERROR = 2  # this component (or file) cannot be merged

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    severity: Severity
    code: str  # stable identifier, e.g. "position_ids_missing"
    message: str  # one line a user understands
    component: str | None = None  # component id, or None for the whole file

    def to_dict(self) -> dict:
        return {
            "severity": self.severity.label,
            "code": self.code,
            "message": self.message,
            "component": self.component,
        }


# Component states
PRESENT = "present"
PARTIAL = "partial"
ABSENT = "absent"


@dataclass
class ComponentStatus:
    id: str
    label: str
    state: str  # PRESENT | PARTIAL | ABSENT
    keys_found: int
    keys_expected: int
    nbytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # stored dtype -> tensor count
    findings: list[Finding] = field(default_factory=list)

    @property
    def severity(self) -> Severity:
        return max((f.severity for f in self.findings), default=Severity.OK)

    @property
    def mergeable(self) -> bool:
        return self.state != ABSENT and self.severity < Severity.ERROR

    @property
    def problem(self) -> str | None:
        """The reason this component cannot be merged, or None."""
        if self.state == ABSENT:
            return f"{self.id} is absent from this file"
        errors = [f.message for f in self.findings if f.severity >= Severity.ERROR]
        return "; ".join(errors) if errors else None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "state": self.state,
            "keys_found": self.keys_found,
            "keys_expected": self.keys_expected,
            "nbytes": self.nbytes,
            "dtypes": self.dtypes,
            "findings": [f.to_dict() for f in self.findings],
        }


# File kinds
CHECKPOINT = "checkpoint"
LORA = "lora"
DIFFUSERS = "diffusers"
PICKLE = "pickle"
UNREADABLE = "unreadable"
UNKNOWN = "unknown"


@dataclass
class ModelReport:
    path: Path
    model_id: str
    file_size: int
    mtime_ns: int
    kind: str
    arch: str | None = None  # architecture id ("sdxl", "sd15") when recognised
    scale: int = 1  # 1 = real size; N = a synthetic file shrunk by N
    arch_name: str | None = None  # the architecture's display name, e.g. "SDXL 1.0"
    components: dict[str, ComponentStatus] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)  # stored dtype -> tensor count, whole file
    extra_keys: list[str] = field(default_factory=list)  # keys outside every component
    extra_bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)  # the file's __metadata__
    # the few metadata entries a user recognises (ModelSpec title/architecture, trainer tags)
    metadata_summary: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)  # file-level findings
    # canonical key (as in the architecture) -> key as stored in this file, for every
    # recognised tensor; the merge reads through it so renamed-but-equal keys still merge.
    key_map: dict[str, str] = field(default_factory=dict)

    @property
    def all_findings(self) -> list[Finding]:
        out = list(self.findings)
        for comp in self.components.values():
            out.extend(comp.findings)
        return out

    @property
    def severity(self) -> Severity:
        return max((f.severity for f in self.all_findings), default=Severity.OK)

    @property
    def arch_label(self) -> str | None:
        """E.g. "SDXL 1.0", or "SDXL 1.0 (1/32 scale)" for a shrunk synthetic file."""
        if self.arch_name is None:
            return None
        return f"{self.arch_name} (1/{self.scale} scale)" if self.scale > 1 else self.arch_name

    @property
    def is_astolfo_output(self) -> bool:
        """A mix astolfo wrote (its metadata says so): listed as an output, never bulk-ticked."""
        from engine.library.outputs import is_astolfo_output

        return is_astolfo_output(self.metadata)

    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def main_dtype(self) -> str | None:
        return max(self.dtypes, key=self.dtypes.get) if self.dtypes else None

    def component(self, cid: str) -> ComponentStatus | None:
        return self.components.get(cid)

    def to_dict(self) -> dict:
        return {
            "id": self.model_id,
            "path": str(self.path),
            "file_size": self.file_size,
            "kind": self.kind,
            "arch": self.arch,
            "arch_label": self.arch_label,
            "scale": self.scale,
            "dtype": self.main_dtype,
            "dtypes": self.dtypes,
            "severity": self.severity.label,
            "components": {cid: c.to_dict() for cid, c in self.components.items()},
            "extra_keys": len(self.extra_keys),
            "extra_bytes": self.extra_bytes,
            "metadata": {k: v for k, v in self.metadata.items() if len(v) <= 200},
            "metadata_summary": self.metadata_summary,
            "findings": [f.to_dict() for f in self.all_findings],
        }
