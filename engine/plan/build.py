"""Building a merge plan from a checked recipe: nodes (what to compute), their exact weight
factors, outputs in canonical order, and steps (nodes grouped by key so each source tensor is
read once). Problems found on the way (shapes that differ, missing keys) go to the planner.
See ``plan.model`` for the vocabulary."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from engine.checkpoint.architectures import Architecture
from engine.checkpoint.format import DTYPES, TensorInfo, TensorPlan, canonical_order, read_header
from engine.checkpoint.keys import is_fp8_scale, normal_name, stored_variants
from engine.library.report import CHECKPOINT, Severity
from engine.methods.params import resolve as resolve_method
from engine.plan.model import (
    ARANGE,
    COPY,
    MEAN,
    METHOD,
    OUTPUT_DTYPE,
    MergePlan,
    Node,
    OutputPlan,
    Source,
    SourceFile,
    Step,
)

# Significant bits of each float source dtype (what a product with a weight must keep exact).
_SOURCE_BITS = {"F16": 11, "BF16": 8, "F32": 24, "F64": 53, "F8_E4M3": 4, "F8_E5M2": 3}


class Builder:
    """Turns a checked recipe into nodes, steps and outputs (adding the shape and missing-key
    problems it finds on the way)."""

    def __init__(self, planner, arch: Architecture, hashes: dict):
        self.p = planner
        self.r = planner.recipe
        self.arch = arch
        self.hashes = hashes
        self.files: list[SourceFile] = []
        self.file_index: dict[str, int] = {}
        self.headers: dict[str, dict[str, TensorInfo]] = {}
        self.data_start: dict[str, int] = {}
        self.nodes: list[Node] = []
        self.node_ids: dict[tuple, int] = {}
        self.reported: set[tuple] = set()

    def build(self) -> MergePlan:
        for mid in self.p.used_models():
            self.open(mid)
        outputs = [self.output(i, spec) for i, spec in enumerate(self.r.outputs)]
        steps = self.steps(outputs)
        return MergePlan(
            recipe=self.r,
            arch=self.arch,
            device=self.r.device,
            files=self.files,
            nodes=self.nodes,
            steps=steps,
            outputs=outputs,
            problems=[],
            hashes=self.hashes,
        )

    def open(self, mid: str) -> None:
        report = self.p.reports[mid]
        if report.kind != CHECKPOINT:
            return
        header = self.p.headers.pop(mid, None)  # parsed when the planner inspected the file, if it did
        if header is None:  # a report the caller had: the header is read here
            try:
                header = read_header(report.path)
            except Exception as e:  # changed since inspection; check_models reported readable
                self.p.error(f"model {mid}: {report.path}: cannot read the header: {e}", mid, code="unreadable")
                return
        self.file_index[mid] = len(self.files)
        self.files.append(
            SourceFile(
                mid,
                Path(os.path.abspath(report.path)),
                header.file_size,
                report.mtime_ns,
                report,
                self.r.models[mid].sha256,
            )
        )
        self.headers[mid] = header.tensors
        self.data_start[mid] = header.data_start

    def source(self, mid: str, stored: str) -> Source:
        info = self.headers[mid][stored]
        return Source(
            self.file_index[mid],
            stored,
            info.dtype,
            tuple(info.shape),
            self.data_start[mid] + info.begin,
            self.r.weight(mid),
        )

    def node(self, kind: str, key: str, sources: list[Source], check: bool, dtype: str | None = None,
             method=None) -> int:
        ident = (kind, key, dtype, tuple((s.file, s.key, s.weight) for s in sources), method)
        nid = self.node_ids.get(ident)
        if nid is None:
            shape = sources[0].shape if sources else self.arch.tensors[key].shape
            scale = 1.0
            if kind == MEAN:
                factors = exact_factors(sources)
            elif kind == METHOD:  # the base first (unused factor; none for a plain median), then the models'
                models = sources[1:] if method.base is not None else sources
                model_factors = exact_factors(models)
                scale = factor_scale(models[0], model_factors[0])
                factors = (1.0, *model_factors) if method.base is not None else model_factors
            else:
                factors = (1.0,) * len(sources)
            nid = len(self.nodes)
            self.nodes.append(Node(nid, kind, key, shape, tuple(sources), check, dtype, factors, method, scale))
            self.node_ids[ident] = nid
        return nid

    # ------------------------------------------------------------------ outputs

    def output(self, index: int, spec) -> OutputPlan:
        r = self.r
        dtype = OUTPUT_DTYPE[r.output_dtype(spec)]
        path = Path(os.path.abspath(r.output_path(spec)))
        label = str(spec.path)
        entries: dict[str, tuple[str, int]] = {}  # key -> (dtype, node)
        for cid, sel in spec.sources.items():
            models = [m for m in r.select[sel] if m in self.file_index]
            for key, nid in self.component(cid, sel, models, label):
                node = self.nodes[nid]
                entries[key] = (node.dtype or dtype, nid)
        for key, nid in self.outside(spec, label, entries):
            entries[key] = (self.nodes[nid].dtype or dtype, nid)
        plans = canonical_order(TensorPlan(k, d, self.nodes[n].shape) for k, (d, n) in entries.items())
        title = spec.title or Path(spec.path).stem
        return OutputPlan(index, path, dtype, title, dict(spec.sources), plans, [entries[t.key][1] for t in plans])

    def component(self, cid: str, sel: str, models: list[str], label: str):
        arch = self.arch
        comp = arch.components[cid]
        extras = self.extra_keys_under(cid, models)
        missing: dict[str, list[str]] = {}
        fields = self.r.methods.get(sel)
        method = resolve_method(fields) if fields and fields.get("method", "mean") != "mean" else None
        base = method.base if method is not None and method.base in self.file_index else None
        base_lacks: list[str] = []
        for key in list(comp.keys) + extras:
            stored = [(m, self.stored_key(m, key)) for m in models]
            present = [(m, s) for m, s in stored if s is not None]
            if key == arch.position_ids_key:
                yield key, self.arange(key, present)
                continue
            if key in arch.tensors:
                for m, s in stored:
                    if s is None:
                        missing.setdefault(m, []).append(key)
            if not present:
                self.report_once(
                    ("absent", sel, key),
                    Severity.WARNING,
                    f"{key} is in no model of selection {sel!r}: {label} will not have it",
                    output=label,
                    code="key_absent",
                )
                continue
            sources = [self.source(m, s) for m, s in present]
            if not self.same_shapes(sel, key, present, sources):
                continue
            floats = all(DTYPES[x.dtype].is_float for x in sources)
            if method is not None and method.base is None and floats:  # a median of the models themselves
                yield key, self.node(METHOD, key, sources, check=True, method=method)
                continue
            if method is not None and base is not None and floats:
                stored_base = self.stored_key(base, key)
                if stored_base is not None:
                    base_source = self.source(base, stored_base)
                    if base_source.shape == sources[0].shape:
                        yield key, self.node(METHOD, key, [base_source, *sources], check=True, method=method)
                        continue
                    self.report_once(
                        ("base-shape", sel, key), Severity.ERROR,
                        f"selection {sel!r}: {key} is {list(sources[0].shape)} in the models but "
                        f"{list(base_source.shape)} in the base {base}", model_id=base, code="shape_mismatch")
                    continue
                base_lacks.append(key)
            kind = MEAN if len(sources) > 1 else COPY
            yield key, self.node(kind, key, sources, check=True)
        if extras:
            self.report_once(
                ("extras", sel, cid),
                Severity.OK,
                f"selection {sel!r}: {len(extras)} {cid} tensors that {arch.name} does not have "
                f"(e.g. {extras[0]}) are kept, averaged over the models that have them",
                output=label,
                code="extra_kept",
            )
        if base_lacks:
            example = ", ".join(base_lacks[:2]) + (", ..." if len(base_lacks) > 2 else "")
            self.report_once(
                ("base-lacks", sel, cid), Severity.WARNING,
                f"selection {sel!r}: the base {base} lacks {len(base_lacks)} {cid} keys ({example}); they are the "
                f"selection's weighted mean instead of {method.method}", model_id=base, output=label,
                code="base_lacks_key")
        for m, keys_missing in missing.items():
            severity = Severity.ERROR if self.r.strict else Severity.WARNING
            example = ", ".join(keys_missing[:2]) + (", ..." if len(keys_missing) > 2 else "")
            action = (
                "strict = true refuses this"
                if self.r.strict
                else "those keys are averaged over the models of the selection that have them"
            )
            self.report_once(
                ("missing", sel, cid, m),
                severity,
                f"model {m} lacks {len(keys_missing)} {cid} keys of selection {sel!r} ({example}); {action}",
                model_id=m,
                code="key_missing",
            )

    def stored_key(self, mid: str, key: str) -> str | None:
        report = self.p.reports[mid]
        if key in self.arch.tensors:
            return report.key_map.get(key)
        # a key the architecture lacks: matched by its stored name, prefix renamings undone
        for variant in stored_variants(key):
            if variant in self.headers[mid] and normal_name(self.arch, variant) == key:
                return variant
        return None

    def extra_keys_under(self, cid: str, models: list[str]) -> list[str]:
        """Keys under component ``cid``'s prefix that the architecture lacks (kept, not dropped)."""
        comp = self.arch.components[cid]
        seen: dict[str, None] = {}
        for m in models:
            for stored in self.p.reports[m].extra_keys:
                name = normal_name(self.arch, stored)
                if comp.owns(name) and not is_fp8_scale(name):
                    seen.setdefault(name, None)
        return sorted(seen)

    def same_shapes(self, sel: str, key: str, present, sources: list[Source]) -> bool:
        first = sources[0].shape
        for (m, _), s in zip(present, sources):
            if s.shape != first:
                self.report_once(
                    ("shape", sel, present[0][0], m),
                    Severity.ERROR,
                    f"selection {sel!r}: {key} is {list(first)} in {present[0][0]} but "
                    f"{list(s.shape)} in {m} (models of different architectures or sizes)",
                    model_id=m,
                    code="shape_mismatch",
                )
                return False
        return True

    def arange(self, key: str, present) -> int:
        """position_ids: arange(77) in the dtype of the first model that stores it (never averaged)."""
        reference = self.arch.tensors[key]
        dtype = self.headers[present[0][0]][present[0][1]].dtype if present else reference.dtype
        return self.node(ARANGE, key, [], check=False, dtype=dtype)

    def outside(self, spec, label: str, entries: dict):
        """Tensors outside every component, copied unchanged from the first model of the unet
        selection (the first that has them, for the architecture's own buffers): schedule
        buffers and the like, and EMA copies of the UNet (kept, with a warning that they are
        that model's EMA). ComfyUI fp8 scale factors are left out: they belong to one model's fp8
        weights and would rescale the merged ones."""
        sel = spec.sources.get("unet") or next(iter(spec.sources.values()), None)
        models = [m for m in self.r.select.get(sel, []) if m in self.file_index]
        if not models:
            return
        names: dict[str, tuple[str, str]] = {}
        for key in self.arch.tensors:
            if self.arch.component_of(key) is None:
                for m in models:
                    stored = self.p.reports[m].key_map.get(key)
                    if stored is not None:
                        names.setdefault(key, (m, stored))
                        break
        first = models[0]
        ema = scales = 0
        for stored in self.p.reports[first].extra_keys:
            name = normal_name(self.arch, stored)
            if self.arch.component_of(name) is not None or name in names:
                continue
            if is_fp8_scale(name):
                scales += 1
                continue
            ema += name.startswith("model_ema.")
            names[name] = (first, stored)
        if ema:
            self.report_once(
                ("ema", first),
                Severity.WARNING,
                f"model {first}: its {ema} EMA tensors (model_ema.*) are copied unchanged into "
                f"{label}: they are {first}'s EMA weights, not an average",
                model_id=first,
                output=label,
                code="ema_copied",
            )
        if scales:
            self.report_once(
                ("fp8-scale", first),
                Severity.WARNING,
                f"model {first}: {scales} fp8 scale factors left out of {label}: they belong to its "
                "fp8 weights, not to the merged ones",
                model_id=first,
                output=label,
                code="extra_dropped",
            )
        for name, (m, stored) in names.items():
            if name in entries:
                self.report_once(
                    ("collide", name),
                    Severity.WARNING,
                    f"model {m}: extra tensor {stored!r} has the name of a merged tensor; left out",
                    model_id=m,
                    output=label,
                    code="extra_collision",
                )
                continue
            source = self.source(m, stored)
            yield name, self.node(COPY, name, [source], check=False, dtype=source.dtype)

    def report_once(self, ident: tuple, severity: Severity, message: str, model_id=None, output=None, code="") -> None:
        if ident not in self.reported:
            self.reported.add(ident)
            self.p.add(severity, message, model_id, output, code)

    # ------------------------------------------------------------------ steps

    def steps(self, outputs: list[OutputPlan]) -> list[Step]:
        """Nodes grouped by output key, ordered by the earliest position any output writes the
        key at, so each output's writes come (almost always) in its own order."""
        position: dict[tuple, int] = {}
        members: dict[tuple, list[int]] = {}
        for out in outputs:
            for pos, (t, nid) in enumerate(zip(out.tensors, out.nodes)):
                group = (t.key, self.nodes[nid].shape)
                position[group] = min(position.get(group, pos), pos)
                if nid not in members.setdefault(group, []):
                    members[group].append(nid)
        steps = []
        for group in sorted(members, key=lambda g: (position[g], g[0], g[1])):
            seen: dict[tuple[int, str], Source] = {}
            for nid in members[group]:
                for s in self.nodes[nid].sources:
                    seen.setdefault((s.file, s.key), s)
            steps.append(Step(group[0], members[group], list(seen.values())))
        return steps


def exact_factors(sources: list[Source]) -> tuple[float, ...]:
    """Per-source multipliers of a weighted mean (summed in fp64).

    Weights are taken as the decimals the user wrote (0.3 is 3/10, not the binary double nearest
    it) and scaled to the smallest integers with the same ratios (0.3, 1.7, 5 -> 3, 17, 50): the
    mean is the same and every product is exact. Sums are kept in fp64, where they are exact for
    any realistic inputs; fp32 is not enough: a source value 2^13 times smaller than another in
    the same element is partly lost, and where the mean sits on an fp16 tie (common: 3a + 17b +
    50c hits one in ~1e-4 of elements) that lost part decides the rounding. Weights with too many
    digits for exact products keep their binary values."""
    return _exact_factors(tuple((s.weight, s.dtype) for s in sources))


@lru_cache(maxsize=256)
def _exact_factors(pairs: tuple[tuple[float, str], ...]) -> tuple[float, ...]:
    weights = [Fraction(repr(w)) for w, _ in pairs]
    scale = math.lcm(*(w.denominator for w in weights))
    ints = [int(w * scale) for w in weights]
    widest = max(_SOURCE_BITS.get(d, 53) for _, d in pairs)
    if all(_significant_bits(k) <= 53 - widest for k in ints) and sum(ints) < 2**53:
        return tuple(float(k) for k in ints)
    return tuple(w for w, _ in pairs)


def factor_scale(source: Source, factor: float) -> float:
    """What ``exact_factors`` multiplied the weights by (an integer, or 1.0 where the weights
    kept their binary values): a sum of factor * delta divided by it is the sum of weight *
    delta, exactly rounded once (add-difference is not normalised by the weights)."""
    if factor == source.weight:
        return 1.0
    return float(Fraction(repr(factor)) / Fraction(repr(source.weight)))


def _significant_bits(k: int) -> int:
    return (k >> ((k & -k).bit_length() - 1)).bit_length() if k else 0
