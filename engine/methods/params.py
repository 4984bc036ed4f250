"""A selection's merge method: the ``[methods.<selection>]`` fields, the presets that fill their
defaults, and the checks of every value (each problem names the selection, the field and the
value given, so ``astolfo merge --check`` can list them all at once).

The recipe keeps only what the user wrote (``engine.recipe.model.MethodSpec``), so saving it
back does not turn preset defaults into explicit settings; ``resolve`` fills the rest from the
preset, then from the global defaults, into the ``MethodParams`` the plan and the backends use.

Every method is computed by the streamed merge: element-wise in one read of each source, except
where a per-tensor statistic of each delta is needed first (the trim threshold, DELLA's ranks,
model stock's cosines: ``engine.methods.tensor_stats`` reads those keys' sources once more).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

METHODS = ("mean", "add_difference", "ties", "ties_soup", "dare", "della", "model_stock", "geometric_median", "tgmd",
           "dgmla")
VOTES = ("sum", "count", "none")
COMBINES = ("mean", "sum", "stock", "median")
FIELDS = ("method", "base", "alpha", "trim", "vote", "drop", "drop_eps", "rescale", "seed", "combine", "eps", "maxiter",
          "ftol")

# Every field's value when neither the table nor the preset sets it (base has none).
DEFAULTS = {"alpha": 1.0, "trim": 1.0, "vote": "none", "drop": 0.0, "drop_eps": 0.0, "rescale": True, "seed": 0,
            "combine": "mean", "eps": 1e-6, "maxiter": 100, "ftol": 1e-20}
# the geometric median's own fields (Weiszfeld: distance floor, iteration cap, relative stop)
MEDIAN_FIELDS = ("eps", "maxiter", "ftol")
MAXITER_LIMIT = 100_000
_TGMD = {"trim": 1.0, "vote": "sum", "drop": 0.1, "rescale": False, "combine": "median", "seed": 0}

PRESETS: dict[str, dict] = {
    "mean": {},
    "add_difference": {"vote": "none", "combine": "sum"},
    "ties": {"trim": 0.2, "vote": "sum"},
    "ties_soup": {"trim": 1.0, "vote": "count"},
    "dare": {"vote": "none", "rescale": True},
    "della": {"vote": "none", "rescale": True},
    "model_stock": {"combine": "stock"},
    "geometric_median": {"combine": "median"},
    "tgmd": dict(_TGMD),  # the AstolfoMix author's x116a: TIES vote, DARE drop, median
    "dgmla": {**_TGMD, "drop_eps": -0.1},  # x215a: tgmd with DELLA's rank-dependent drop
}
REQUIRED = {"dare": ("drop",), "della": ("drop", "drop_eps")}

SEED_LIMIT = 1 << 64


@dataclass(frozen=True)
class MethodParams:
    """Every field of a selection's method, defaults filled (see ``resolve``)."""

    method: str
    base: str | None
    alpha: float = 1.0
    trim: float = 1.0
    vote: str = "none"
    drop: float = 0.0
    drop_eps: float = 0.0
    rescale: bool = True
    seed: int = 0
    combine: str = "mean"
    eps: float = 1e-6
    maxiter: int = 100
    ftol: float = 1e-20

    @property
    def filtered(self) -> bool:
        """Whether the deltas are trimmed, dropped or voted on (else each model is used whole)."""
        return self.trim < 1 or self.drop > 0 or self.drop_eps != 0 or self.vote != "none"

    @property
    def rescale_divisor(self) -> float | None:
        """What the combined delta is divided by (1 - drop), or None when it is not."""
        return 1.0 - self.drop if self.rescale and self.drop > 0 else None

    def as_dict(self) -> dict:
        """Every parameter (the median's own only where combine is "median")."""
        d = asdict(self)
        if self.combine != "median":
            for name in MEDIAN_FIELDS:
                del d[name]
        return d

    def summary(self) -> str:
        """The method and its parameters in one line (``ties_soup(base=_x00, vote=count)``)."""
        shown = {k: v for k, v in self.as_dict().items() if k != "method"}
        return f"{self.method}({', '.join(f'{k}={v}' for k, v in shown.items())})"


def resolve(fields: dict) -> MethodParams:
    """The parameters of a checked ``[methods.<selection>]`` table: given fields, then the
    preset's, then the defaults."""
    method = fields.get("method", "mean")
    values = dict(DEFAULTS)
    values.update(PRESETS.get(method, {}))
    values.update({k: v for k, v in fields.items() if k != "method"})
    return MethodParams(
        method=method, base=values.get("base"), alpha=float(values["alpha"]), trim=float(values["trim"]),
        vote=values["vote"], drop=float(values["drop"]), drop_eps=float(values["drop_eps"]),
        rescale=bool(values["rescale"]), seed=int(values["seed"]), combine=values["combine"],
        eps=float(values["eps"]), maxiter=int(values["maxiter"]), ftol=float(values["ftol"]),
    )


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def problems(sel: str, fields: dict, models: dict, weights: dict, selection: list[str]) -> list[tuple[str, str]]:
    """(code, message) for every bad field of selection ``sel``'s method table ``fields``
    (``models``: the recipe's model ids, ``weights``: its [weights], ``selection``: the ids the
    selection lists)."""
    out: list[tuple[str, str]] = []
    where = f"methods.{sel}"

    def bad(name: str, why: str, code: str = "bad_method_param", value=None) -> None:
        if name in fields:
            shown = repr(fields[name])
        else:  # a preset's or the default value
            shown = f"{value!r} (the default of method {fields.get('method')!r})"
        out.append((code, f"{where}.{name} = {shown}: {why}"))

    method = fields.get("method")
    if "method" not in fields:
        out.append(("bad_method", f"{where}: method missing (one of {', '.join(METHODS)})"))
        return out
    if method not in METHODS:
        bad("method", f"unknown method (one of {', '.join(METHODS)})", "bad_method")
        return out
    if method == "mean":
        extra = [k for k in fields if k != "method"]
        if extra:
            out.append(("bad_method_param", f"{where}: method 'mean' is the plain weighted mean and takes no "
                                            f"parameters (given: {', '.join(extra)})"))
        return out
    for name in REQUIRED.get(method, ()):
        if name not in fields:
            out.append(("bad_method_param", f"{where}.{name}: required by method {method!r}"))
    if "base" in fields and (not isinstance(fields["base"], str) or fields["base"] not in models):
        bad("base", "not a model id in [models]")
    typed_ok = True
    for name in ("alpha", "trim", "drop", "drop_eps", "eps", "ftol"):
        if name in fields and not _number(fields[name]):
            bad(name, "expected a finite number")
            typed_ok = False
    for name, choices in (("vote", VOTES), ("combine", COMBINES)):
        if name in fields and fields[name] not in choices:
            bad(name, f"expected one of {', '.join(choices)}")
            typed_ok = False
    if "rescale" in fields and not isinstance(fields["rescale"], bool):
        bad("rescale", "expected true or false")
        typed_ok = False
    if "seed" in fields:
        s = fields["seed"]
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < SEED_LIMIT:
            bad("seed", f"expected an integer from 0 to {SEED_LIMIT - 1}")
            typed_ok = False
    if "maxiter" in fields:
        it = fields["maxiter"]
        if isinstance(it, bool) or not isinstance(it, int) or not 1 <= it <= MAXITER_LIMIT:
            bad("maxiter", f"expected an integer from 1 to {MAXITER_LIMIT}")
            typed_ok = typed_ok and isinstance(it, int) and not isinstance(it, bool)  # a range error: go on
    if not typed_ok:
        return out
    p = resolve(fields)
    if "base" not in fields and (p.combine != "median" or p.filtered):
        why = "a model id from [models]" if p.combine != "median" else (
            "a model id from [models]; only an unfiltered median (no trim, drop or vote) is taken of the models "
            "themselves")
        out.append(("bad_method_param", f"{where}.base: required by method {method!r} ({why})"))
    if not p.eps > 0:
        bad("eps", "the distance floor must be > 0", value=p.eps)
    if not p.ftol >= 0:
        bad("ftol", "the stopping tolerance must be >= 0", value=p.ftol)
    if p.combine != "median":
        for name in MEDIAN_FIELDS:
            if name in fields:
                bad(name, "only used by combine = 'median'")
    if not 0 < p.trim <= 1:
        bad("trim", "the kept fraction must be in (0, 1]", value=p.trim)
    if not 0 <= p.drop < 1:
        bad("drop", "the drop probability must be in [0, 1)", value=p.drop)
    if p.combine == "sum" and p.vote != "none":
        out.append(("bad_method_combination", f"{where}: vote = {p.vote!r} with combine = 'sum' is not defined "
                                              "(a vote elects a sign for a mean)"))
    if p.combine == "stock":
        for name, off in (("trim", p.trim != 1), ("drop", p.drop != 0), ("vote", p.vote != "none"),
                          ("alpha", p.alpha != 1), ("drop_eps", p.drop_eps != 0)):
            if off:
                out.append(("bad_method_combination", f"{where}.{name} = {getattr(p, name)!r}: not defined with "
                                                      "combine = 'stock'"))
        if len(selection) < 2:
            out.append(("bad_method_combination", f"{where}: combine = 'stock' needs at least two models "
                                                  f"(selection {sel!r} has {len(selection)})"))
        weighted = [m for m in selection if weights.get(m, 1.0) != 1.0]
        if weighted:
            out.append(("bad_method_combination", f"{where}: combine = 'stock' does not use weights "
                                                  f"(weights given for {', '.join(weighted)})"))
    return out
