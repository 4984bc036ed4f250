"""Inspect one model file without trusting it: what kind of file it is, which architecture,
each component's state, and a named finding for every way real checkpoints deviate.

Only the header is read, plus the 77-value ``position_ids`` tensor when present (a few hundred
bytes). Pickles (``.ckpt``/``.pt``/``.pth``/``.bin``) are never unpickled: loading one runs
whatever code it carries.

Keys that real files store under other names (an extra or missing ``model.`` prefix, NAI-style
CLIP keys without ``text_model.``) are normalised into ``report.key_map`` (canonical key -> key
as stored), so the merge reads renamed-but-equal tensors under their standard names.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter
from pathlib import Path

import humanize

from engine.checkpoint.architectures import Architecture, Component, architectures, infer_scale, scaled_shape
from engine.checkpoint.format import DTYPES, Header, SafetensorsError, paused_gc, read_header
from engine.checkpoint.keys import (
    EXTRA_MODEL_PREFIX,
    MISSING_MODEL_PREFIX,
    component_of,
    is_fp8_scale,
    prefix_variants,
    without_model_prefix,
)
from engine.checkpoint.reader import TensorReader
from engine.library.report import (
    ABSENT,
    CHECKPOINT,
    DIFFUSERS,
    LORA,
    PARTIAL,
    PICKLE,
    PRESENT,
    UNKNOWN,
    UNREADABLE,
    ComponentStatus,
    Finding,
    ModelReport,
    Severity,
)

_DTYPE_OF = attrgetter("dtype")

SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
MODEL_SUFFIXES = SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES

OK, WARNING, ERROR = Severity.OK, Severity.WARNING, Severity.ERROR

# Written by engine.synth.checkpoints; real files are judged by their shapes alone.
SCALE_METADATA_KEY = "astolfo.synthetic_scale"

# Top-level noise diffusion schedule buffers that ldm-era trainers save with the model.
DDPM_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "denoiser.sigmas",
        "denoiser.log_sigmas",
    }
)

_LORA_RE = re.compile(
    r"^(?:lora_unet_|lora_te[12]?_|lycoris_)|\.lora_(?:down|up|A|B)\.|\.lora\.(?:down|up)\.|\.dora_scale"
    r"|hada_w[12]_|lokr_w[12]|\.oft_(?:blocks|diag)",
    re.MULTILINE,
)
_LYCORIS_RE = re.compile(r"hada_w[12]_|lokr_w[12]|\.oft_(?:blocks|diag)")
_DIFFUSERS_SEGMENTS = frozenset({"down_blocks", "up_blocks", "mid_block"})
_DIFFUSERS_ROOTS = {
    "unet": "UNet",
    "text_encoder": "text encoder",
    "text_encoder_2": "second text encoder",
    "vae": "VAE",
}
_LAYER_RE = re.compile(r"\.(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.")

# modelspec.architecture values start with these for each architecture family.
_MODELSPEC_FAMILY = {"sdxl": "stable-diffusion-xl-v1-base", "sd15": "stable-diffusion-v1"}

_SUMMARY_KEYS = {
    "modelspec.title": "title",
    "modelspec.architecture": "architecture",
    "modelspec.author": "author",
    "modelspec.date": "date",
    "modelspec.license": "license",
    "ss_sd_model_name": "trained from",
    "ss_base_model_version": "base model version",
    "ss_output_name": "training output name",
    "ss_network_module": "network module",
    "ss_num_train_images": "training images",
    "ss_num_epochs": "epochs",
    "ss_steps": "steps",
    "ss_learning_rate": "learning rate",
    "ss_resolution": "training resolution",
    "ss_training_comment": "training comment",
}


def inspect_file(path: str | os.PathLike, model_id: str = "",
                 on_header: Callable[[Header], None] | None = None) -> ModelReport:
    """A ModelReport for ``path``. Never raises for bad content: problems become findings.
    ``on_header``: handed the parsed header of a readable file (a planner builds the plan from
    it instead of parsing the header a second time; a scan keeps only the report)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        report = ModelReport(path=path, model_id=model_id, file_size=0, mtime_ns=0, kind=UNREADABLE)
        report.findings.append(Finding(ERROR, "unreadable", f"cannot read the file: {e.strerror or e}"))
        return report
    report = ModelReport(path=path, model_id=model_id, file_size=st.st_size, mtime_ns=st.st_mtime_ns, kind=UNKNOWN)
    # One collection after the whole inspection rather than several during it; the header is
    # dropped inside _read_and_inspect (unless ``on_header`` keeps it), so that collection has
    # little left to walk.
    with paused_gc():
        _read_and_inspect(report, on_header)
    return report


def _read_and_inspect(report: ModelReport, on_header: Callable[[Header], None] | None = None) -> None:
    path = report.path
    is_pickle_name = path.suffix.lower() in PICKLE_SUFFIXES
    try:
        header = read_header(path)
    except SafetensorsError as e:
        if is_pickle_name or _looks_like_pickle(path):
            _report_pickle(report)
        else:
            report.kind = UNREADABLE
            report.findings.append(Finding(ERROR, "unreadable", f"not a readable safetensors file: {e.reason}"))
        return
    if is_pickle_name:
        report.findings.append(
            Finding(OK, "safetensors_renamed", f"named {path.suffix} but it is a safetensors file; read as one")
        )
    _inspect_header(report, header)
    if on_header is not None:
        on_header(header)


def _looks_like_pickle(path: Path) -> bool:
    """A torch zip archive or a raw pickle stream renamed to .safetensors (reads 2 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _report_pickle(report: ModelReport) -> None:
    report.kind = PICKLE
    what = (
        f"{report.path.suffix} is a Python pickle"
        if report.path.suffix.lower() in PICKLE_SUFFIXES
        else f"despite its {report.path.suffix} name this is a Python pickle (torch.save format)"
    )
    report.findings.append(
        Finding(
            ERROR,
            "pickle_file",
            f"{what}, which astolfo never unpickles: loading a pickle can run any code inside it. "
            "Convert it to safetensors with a tool you trust.",
        )
    )


def _inspect_header(report: ModelReport, header: Header) -> None:
    tensors = header.tensors
    report.metadata = dict(header.metadata)
    report.metadata_summary = summarize_metadata(header.metadata)
    report.dtypes = dict(Counter(map(_DTYPE_OF, tensors.values())))
    if not tensors:
        report.findings.append(Finding(ERROR, "no_tensors", "the file holds no tensors"))
        return

    match = _best_match(tensors)
    # A checkpoint whose keys mostly matched cannot be a LoRA: skip the search then.
    lora_keys, lora_name = _lora_keys(tensors) if match is None or len(match.key_map) * 2 < len(tensors) else ([], "")
    if len(lora_keys) * 2 > len(tensors) or (match is None and lora_keys):
        report.kind = LORA
        report.findings.append(
            Finding(
                ERROR,
                "lora_file",
                f"this is a {lora_name}, not a checkpoint: its {len(tensors)} tensors are weight updates "
                "for some other model; apply it to a model with a LoRA tool before merging",
            )
        )
        return
    if match is None:
        parts, example = _diffusers_parts(tensors)
        if parts:
            report.kind = DIFFUSERS
            report.findings.append(
                Finding(
                    ERROR,
                    "diffusers_format",
                    f"diffusers-format keys ({', '.join(parts)}; e.g. {example!r}), not a single-file "
                    "checkpoint: convert it to one before merging",
                )
            )
        else:
            names = " or ".join(a.name for a in architectures().values())
            report.findings.append(
                Finding(
                    ERROR,
                    "unknown_architecture",
                    f"none of its {len(tensors)} tensor names fit {names} (e.g. {next(iter(tensors))!r})",
                )
            )
        return
    report.kind = CHECKPOINT
    _describe_checkpoint(report, header, match)


# --------------------------------------------------------------------------- key matching


@dataclass
class KeyMatch:
    """How the keys of one file line up with one architecture."""

    arch: Architecture
    key_map: dict[str, str] = field(default_factory=dict)  # canonical -> stored
    renames: Counter = field(default_factory=Counter)  # (rule, component id) -> tensors renamed
    unmatched: list[str] = field(default_factory=list)  # stored keys that map to nothing

    fractions: dict[str, float] = field(default_factory=dict)  # component id -> share of its keys found

    @property
    def score(self) -> float:
        """Sum over components of the fraction of their keys found (1.0 per complete component).
        Sums rather than key counts, so a VAE-only file does not read as SD 1.5 just because
        SD 1.5 has fewer keys in all."""
        return sum(self.fractions.values())


def match_keys(arch: Architecture, stored_keys) -> KeyMatch:
    """Map ``stored_keys`` onto ``arch``'s canonical keys, undoing the known renamings."""
    match = KeyMatch(arch)
    known = arch.tensors
    rest = []
    for key in stored_keys:
        if key in known:
            match.key_map[key] = key
        else:
            rest.append(key)
    clip_root = _clip_root(arch)
    for key in rest:
        canonical, rules = _canonical(key, known, clip_root)
        if canonical is None or canonical in match.key_map:
            match.unmatched.append(key)
            continue
        match.key_map[canonical] = key
        comp = arch.component_of(canonical)
        for rule in rules:
            match.renames[(rule, comp)] += 1
    for cid in arch.components:
        expected = _expected_keys(arch.id, cid)
        found = len(match.key_map.keys() & expected)
        match.fractions[cid] = found / len(expected) if expected else 0.0
    return match


def _clip_root(arch: Architecture) -> str:
    """Where the CLIP text model's keys start, e.g. ``conditioner.embedders.0.transformer.``."""
    return arch.position_ids_key[: arch.position_ids_key.index("text_model.")]


def _canonical(key: str, known, clip_root: str) -> tuple[str | None, tuple[str, ...]]:
    for variant, rule in prefix_variants(key):
        rules = (rule,) if rule else ()
        if variant in known and rules:
            return variant, rules
        if variant.startswith(clip_root) and not variant.startswith(clip_root + "text_model."):
            nai = clip_root + "text_model." + variant[len(clip_root) :]
            if nai in known:
                return nai, rules + ("nai_clip_keys",)
    return None, ()


def _best_match(tensors) -> KeyMatch | None:
    """The architecture the keys fit best, if at least half of some component is there."""
    best = None
    for arch in architectures().values():
        match = match_keys(arch, tensors)
        if best is None or match.score > best.score:
            best = match
        if best.score == len(best.arch.components):  # every component complete: no better fit
            break
    if best is None or max(best.fractions.values(), default=0.0) < 0.5:
        return None
    return best


@lru_cache(maxsize=None)
def _expected_keys(arch_id: str, comp_id: str) -> frozenset[str]:
    """A component's weight keys: what must be there for it to be complete. position_ids is
    left out (many good files lack it, and merges write arange(77) anyway)."""
    arch = architectures()[arch_id]
    return frozenset(k for k in arch.components[comp_id].keys if k != arch.position_ids_key and k not in arch.buffers)


@lru_cache(maxsize=16)
def _expected_shapes(arch_id: str, scale: int) -> dict[str, tuple[int, ...]]:
    """Every key's shape in a file of ``arch_id`` shrunk by ``scale``; position_ids always
    has 77 token positions."""
    arch = architectures()[arch_id]
    shapes = {key: scaled_shape(spec.shape, scale) for key, spec in arch.tensors.items()}
    shapes[arch.position_ids_key] = arch.tensors[arch.position_ids_key].shape
    return shapes


def _lora_keys(tensors) -> tuple[list[str], str]:
    """Keys named like LoRA/LyCORIS weights, and what to call the file if it is one."""
    text = "\n".join(tensors)
    if not any(word in text for word in ("lora", "lycoris", "hada_", "lokr_", "oft_")):  # the common case
        return [], "LoRA"
    keys = [k for k in tensors if _LORA_RE.search(k)]
    lycoris = any(_LYCORIS_RE.search(k) for k in keys)
    return keys, ("LyCORIS (LoRA-family) file" if lycoris else "LoRA")


def _diffusers_parts(tensors) -> tuple[list[str], str | None]:
    """The diffusers sub-models a file holds (by their roots or block names), and an example key."""
    blocks = [k for k in tensors if _DIFFUSERS_SEGMENTS.intersection(k.split("."))]
    roots = {k.split(".", 1)[0] for k in tensors}
    parts = [label for root, label in _DIFFUSERS_ROOTS.items() if root in roots]
    if blocks and not parts:
        parts = ["UNet or VAE"]
    if not parts or not (blocks or "text_encoder" in roots or "text_encoder_2" in roots):
        return [], None
    return parts, (blocks or list(tensors))[0]


# --------------------------------------------------------------------------- checkpoints


def _describe_checkpoint(report: ModelReport, header: Header, match: KeyMatch) -> None:
    arch = match.arch
    tensors = header.tensors
    report.arch = arch.id
    report.arch_name = arch.name
    report.key_map = match.key_map
    report.scale = _scale(arch, header, match)

    scaled_fp8 = "scaled_fp8" in tensors
    unmatched_by_comp: dict[str | None, list[str]] = {}
    for key in match.unmatched:
        unmatched_by_comp.setdefault(component_of(arch, key), []).append(key)

    for comp in arch.components.values():
        unknown = [k for k in unmatched_by_comp.get(comp.id, []) if not is_fp8_scale(k)]
        status = _component_status(report, header, match, comp, scaled_fp8, len(unknown))
        if unknown:
            status.findings.append(
                Finding(
                    OK,
                    "unknown_keys",
                    f"{len(unknown)} extra tensors under {comp.prefix}* that {arch.name} does not have "
                    f"({_size(_nbytes(tensors, unknown))}, e.g. {unknown[0]!r})",
                    comp.id,
                )
            )
        report.components[comp.id] = status

    _check_position_ids(report, header, match)
    report.extra_keys = list(match.unmatched)
    report.extra_bytes = _nbytes(tensors, match.unmatched)
    _describe_extras(report, tensors, [k for k in match.unmatched if component_of(arch, k) is None])
    _file_findings(report, header, match)


def _scale(arch: Architecture, header: Header, match: KeyMatch) -> int:
    declared = header.metadata.get(SCALE_METADATA_KEY, "")
    if declared.isdecimal() and 1 <= int(declared) <= 4096:
        return int(declared)
    shapes = {
        canonical: header.tensors[stored].shape
        for canonical, stored in match.key_map.items()
        if canonical != arch.position_ids_key
    }
    return infer_scale(arch, shapes) or 1


def _component_status(
    report: ModelReport, header: Header, match: KeyMatch, comp: Component, scaled_fp8: bool, n_unknown: int
) -> ComponentStatus:
    arch, tensors = match.arch, header.tensors
    expected = _expected_keys(arch.id, comp.id)
    n_found = len(match.key_map.keys() & expected)
    mapped = [k for k in comp.keys if k in match.key_map]  # reference order
    infos = [tensors[match.key_map[k]] for k in mapped]
    if not n_found:
        state = ABSENT
    elif n_found == len(expected):
        state = PRESENT
    else:
        state = PARTIAL
    status = ComponentStatus(
        id=comp.id,
        label=comp.label,
        state=state,
        keys_found=n_found,
        keys_expected=len(expected),
        nbytes=sum(i.end - i.begin for i in infos),
        dtypes=dict(Counter(map(_DTYPE_OF, infos))),
    )
    add = status.findings.append
    if state == ABSENT:
        where = (
            f"its {n_unknown} tensors under {comp.prefix}* are none of the expected ones"
            if n_unknown
            else f"{comp.prefix}* absent"
        )
        add(Finding(ERROR, "component_missing", f"no {comp.label} in this file ({where})", comp.id))
        return status
    if state == PARTIAL:
        add(
            _missing_keys_finding(
                comp, [k for k in comp.keys if k in expected and k not in match.key_map], len(expected)
            )
        )

    shapes = _expected_shapes(arch.id, report.scale)
    wrong = [(k, i.shape, shapes[k]) for k, i in zip(mapped, infos) if i.shape != shapes[k]]
    if wrong:
        key, got, want = wrong[0]
        add(
            Finding(
                ERROR,
                "shape_mismatch",
                f"{len(wrong)} tensors have shapes that do not fit {report.arch_label}, e.g. "
                f"{match.key_map[key]!r} is {list(got)}, expected {list(want)}",
                comp.id,
            )
        )
    _dtype_findings(
        status, comp, arch, scaled_fp8, [(k, i) for k, i in zip(mapped, infos) if k != arch.position_ids_key]
    )
    _rename_findings(status, match, comp)
    return status


# SDXL's text encoders whose last layer some trainers drop, and what that layer is used for.
# (SD 1.5 reads its text encoder's last layer, so there a pruned layer is a real loss.)
_PRUNABLE = {
    "te0": "SDXL reads te0's penultimate layer, so it is unused",
    "te1": "SDXL reads te1's penultimate layer, though its pooled output passes through the last one",
}


def _missing_keys_finding(comp: Component, missing: list[str], expected: int) -> Finding:
    n_found = expected - len(missing)
    last = _last_layer_keys(comp) if comp.id in _PRUNABLE else set()
    if last and set(missing) == last:
        layer = _LAYER_RE.search(next(iter(last))).group(0).strip(".")
        why = _PRUNABLE[comp.id]
        return Finding(
            WARNING,
            "pruned_last_layer",
            f"partial ({n_found} of {expected} keys): its last layer ({layer}.*, {len(missing)} keys) was "
            f"pruned; {why}. A merge takes those keys only from models that have them",
            comp.id,
        )
    short = [k[len(comp.prefix) :] for k in missing[:3]]
    return Finding(
        ERROR,
        "keys_missing",
        f"partial: {len(missing)} of {expected} keys missing (e.g. {', '.join(short)})",
        comp.id,
    )


def _last_layer_keys(comp: Component) -> set[str]:
    layers = {}
    for key in comp.keys:
        m = _LAYER_RE.search(key)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(key)
    return layers[max(layers)] if layers else set()


def _dtype_findings(status: ComponentStatus, comp: Component, arch: Architecture, scaled_fp8: bool, pairs) -> None:
    """``pairs``: (canonical key, stored TensorInfo) for the component's weights."""
    fp8 = sorted(d for d in status.dtypes if d.startswith("F8_"))
    if fp8 and scaled_fp8:
        status.findings.append(
            Finding(
                ERROR,
                "scaled_fp8",
                "ComfyUI scaled fp8: its F8 weights are only right once multiplied by their .scale_weight "
                "factors, which astolfo does not apply, so merging it would average wrong values",
                comp.id,
            )
        )
    elif fp8:
        status.findings.append(
            Finding(
                WARNING,
                "fp8_storage",
                f"stored as {'/'.join(fp8)} (8-bit float): precision already lost; merging averages the rounded values",
                comp.id,
            )
        )
    if all(DTYPES[d].is_float for d in status.dtypes):
        return
    ints = [i for k, i in pairs if not i.is_float and DTYPES[arch.tensors[k].dtype].is_float]
    if ints:
        status.findings.append(
            Finding(
                ERROR,
                "integer_weights",
                f"{len(ints)} weights stored as integers ({ints[0].dtype}, e.g. {ints[0].key!r}): quantized "
                "weights cannot be averaged",
                comp.id,
            )
        )


def _rename_findings(status: ComponentStatus, match: KeyMatch, comp: Component) -> None:
    nai = match.renames.get(("nai_clip_keys", comp.id), 0)
    if nai:
        status.findings.append(
            Finding(
                OK,
                "nai_clip_keys",
                f"{nai} keys are NAI-style ({_clip_root(match.arch)}* without 'text_model.'); "
                "read under their standard names",
                comp.id,
            )
        )
    missing_prefix = match.renames.get((MISSING_MODEL_PREFIX, comp.id), 0)
    if missing_prefix:
        status.findings.append(
            Finding(
                OK,
                "missing_model_prefix",
                f"{missing_prefix} keys lack the 'model.' prefix (diffusion_model.* instead of "
                "model.diffusion_model.*); read under their standard names",
                comp.id,
            )
        )


# --------------------------------------------------------------------------- position_ids


def _check_position_ids(report: ModelReport, header: Header, match: KeyMatch) -> None:
    arch = match.arch
    key = arch.position_ids_key
    comp_id = arch.component_of(key)
    status = report.components.get(comp_id)
    if status is None or status.state == ABSENT:
        return
    add = status.findings.append
    stored = match.key_map.get(key)
    if stored is None:
        add(
            Finding(
                WARNING,
                "position_ids_missing",
                "position_ids missing (transformers >= 4.31 and kohya do not save it); merges write arange(77)",
                comp_id,
            )
        )
        return
    info = header.tensors[stored]
    reference = arch.tensors[key].dtype
    if info.is_float and not DTYPES[reference].is_float:
        add(
            Finding(
                WARNING,
                "position_ids_float",
                f"position_ids stored as {info.dtype} where {arch.name} stores {reference}; "
                "merges write integer arange(77)",
                comp_id,
            )
        )
    problem = _position_ids_problem(report.path, header, stored)
    if problem:
        add(Finding(WARNING, "position_ids_corrupted", f"{problem}; merges write arange(77) instead", comp_id))


_STRUCT_CODES = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b", "U8": "B"}


def _decode_values(raw: bytes, dtype: str) -> list[float]:
    """A small tensor's values as Python floats, without importing torch (scans stay fast)."""
    code = _STRUCT_CODES.get(dtype)
    if code is not None:
        n = len(raw) // struct.calcsize(code)
        return [float(v) for v in struct.unpack(f"<{n}{code}", raw)]
    if dtype == "BF16":
        halves = struct.unpack(f"<{len(raw) // 2}H", raw)
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
    import torch  # fp8 and bool: rare enough to pay for torch

    from engine.checkpoint.format import DTYPES

    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(DTYPES[dtype].torch_dtype)
    return t.to(torch.float64).tolist()


def _position_ids_problem(path: Path, header: Header, stored: str) -> str | None:
    """Why the stored position_ids are not 0..76, or None when they are."""
    info = header.tensors[stored]
    if info.numel != 77 or info.nbytes > 77 * 8:
        return f"position_ids has shape {list(info.shape)} instead of [1, 77]"
    try:
        with TensorReader(path, header) as reader:
            values = _decode_values(reader.read_bytes(stored), info.dtype)
    except (SafetensorsError, OSError) as e:
        return f"position_ids could not be read ({getattr(e, 'reason', e)})"
    wrong = [i for i, v in enumerate(values) if v != i]
    if not wrong:
        return None
    truncated = [int(v) if math.isfinite(v) else -1 for v in values]
    misread = [i for i in wrong if truncated[i] != i]
    shown = (misread[-2:] + [i for i in wrong if i not in misread])[:3] if misread else wrong[:3]
    examples = ", ".join(
        f"[{i}] = {values[i]:.6g}" + (f" (reads as {truncated[i]})" if i in misread else "") for i in sorted(shown)
    )
    reads = f"; {len(misread)} of them truncate to the wrong position" if misread else ""
    return f"position_ids corrupted by earlier merges: {len(wrong)} of 77 values are not 0..76, e.g. {examples}{reads}"


# --------------------------------------------------------------------------- whole file


def _describe_extras(report: ModelReport, tensors, outside: list[str]) -> None:
    """Findings for the keys outside every component, by kind. fp8 scale factors are left to
    the scaled_fp8 finding."""
    groups: dict[str, list[str]] = {"ema": [], "ddpm": [], "junk": []}
    for key in outside:
        bare = without_model_prefix(key)
        if bare.startswith("model_ema."):
            groups["ema"].append(key)
        elif bare in DDPM_BUFFERS:
            groups["ddpm"].append(key)
        elif not is_fp8_scale(key):
            groups["junk"].append(key)
    add = report.findings.append
    if groups["ema"]:
        keys = groups["ema"]
        add(
            Finding(
                OK,
                "ema_keys",
                f"{len(keys)} EMA tensors (model_ema.*, {_size(_nbytes(tensors, keys))}), outside every component",
            )
        )
    if groups["ddpm"]:
        keys = groups["ddpm"]
        add(
            Finding(
                OK,
                "ddpm_buffers",
                f"{len(keys)} noise-schedule buffers ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}; "
                f"{_size(_nbytes(tensors, keys))}) outside every component",
            )
        )
    if groups["junk"]:
        keys = groups["junk"]
        add(
            Finding(
                OK,
                "extra_keys",
                f"{len(keys)} tensors belong to no component ({_size(_nbytes(tensors, keys))}, e.g. {keys[0]!r})",
            )
        )


def _file_findings(report: ModelReport, header: Header, match: KeyMatch) -> None:
    arch = match.arch
    add = report.findings.append
    extra_prefix = sum(n for (rule, _), n in match.renames.items() if rule == EXTRA_MODEL_PREFIX)
    if extra_prefix:
        add(
            Finding(
                OK,
                "extra_model_prefix",
                f"{extra_prefix} keys carry an extra 'model.' prefix (e.g. model.{arch.components['unet'].prefix}*); "
                "read under their standard names",
            )
        )
    floats = Counter()
    for comp in report.components.values():
        floats.update({d: n for d, n in comp.dtypes.items() if DTYPES[d].is_float})
    main = max(floats, key=floats.get) if floats else None
    if main and main != arch.float_dtype and not main.startswith("F8_"):
        add(
            Finding(
                OK,
                "storage_dtype",
                f"weights stored as {main} ({arch.name} ships {arch.float_dtype}); read exactly, the output "
                "dtype is chosen in the recipe",
            )
        )
    declared = header.metadata.get("modelspec.architecture")
    family = _MODELSPEC_FAMILY.get(arch.id)
    if declared and family and not declared.startswith(family):
        add(
            Finding(
                WARNING,
                "modelspec_mismatch",
                f"metadata says modelspec.architecture {declared!r}, but its keys are {arch.name}",
            )
        )
    json_keys = [k for k, v in header.metadata.items() if v[:1] in ("{", "[") and v.rstrip()[-1:] in ("}", "]")]
    if json_keys:
        add(
            Finding(
                OK,
                "json_metadata",
                f"metadata {', '.join(json_keys[:3])}{', ...' if len(json_keys) > 3 else ''} hold JSON text; "
                "kept as text (safetensors metadata must stay str to str)",
            )
        )


def summarize_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata entries a user recognises, under readable names, each cut to one line."""
    out = {}
    for key, label in _SUMMARY_KEYS.items():
        value = metadata.get(key, "").strip()
        if value and value != "None":
            out[label] = _one_line(value)
    if "sd_merge_models" in metadata:
        out["merged by"] = "A1111 checkpoint merger (sd_merge_models)"
    if any(k.startswith("ss_") for k in metadata) and "network module" not in out:
        out.setdefault("trainer", "kohya sd-scripts (ss_* tags)")
    return out


def _one_line(value: str, limit: int = 120) -> str:
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _nbytes(tensors, keys) -> int:
    return sum(tensors[k].nbytes for k in keys)


def _size(n: int) -> str:
    return humanize.naturalsize(n)
