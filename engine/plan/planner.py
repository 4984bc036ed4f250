"""From a recipe to a merge plan: ``check_recipe`` lists every problem at once, ``build_plan``
returns the ``MergePlan`` when none is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from engine.checkpoint.format import Header
from engine.library.report import ModelReport, Severity
from engine.plan.model import MergePlan, PlanError, Problem
from engine.recipe.model import Recipe

# --------------------------------------------------------------------------- entry points


def check_recipe(recipe: Recipe, reports=None) -> list[Problem]:
    """Every problem of ``recipe`` at once (errors, warnings and notes); [] when all is well."""
    return _Planner(recipe, reports).run(build=False)[0]


def build_plan(recipe: Recipe, reports=None) -> MergePlan:
    """The merge plan of ``recipe``; raises PlanError listing every problem when any is an error.

    ``reports``: ModelReports the caller already has (a dict by model id or any iterable);
    they are used for files they describe unchanged, the rest are inspected here.

    A plan is built to be merged: on the CPU its kernels start loading now, in the background
    (``engine.kernels.warm.start_for``), so that they are ready when its first item is."""
    from engine.kernels import warm

    warm.start_for(recipe.device, methods=bool(recipe.methods))
    problems, plan = _Planner(recipe, reports).run(build=True)
    if plan is None:
        raise PlanError(problems)
    return plan


# --------------------------------------------------------------------------- the planner


class _Planner:
    def __init__(self, recipe: Recipe, reports):
        self.recipe = recipe
        self.given = _index_reports(reports)
        self.problems: list[Problem] = []
        self.reports: dict[str, ModelReport] = {}
        # the headers parsed by this planner's own inspections, by model id: the plan is built
        # from them (the report's size and mtime are those of the same read)
        self.headers: dict[str, Header] = {}

    def add(self, severity: Severity, message: str, model_id=None, output=None, code="") -> None:
        self.problems.append(Problem(severity, message, model_id, output, code))

    def error(self, message: str, model_id=None, output=None, code="") -> None:
        self.add(Severity.ERROR, message, model_id, output, code)

    def warn(self, message: str, model_id=None, output=None, code="") -> None:
        self.add(Severity.WARNING, message, model_id, output, code)

    def note(self, message: str, model_id=None, output=None, code="") -> None:
        self.add(Severity.OK, message, model_id, output, code)

    @property
    def has_errors(self) -> bool:
        return any(p.severity >= Severity.ERROR for p in self.problems)

    def run(self, build: bool) -> tuple[list[Problem], MergePlan | None]:
        from engine.plan import checks as plan_checks

        r = self.recipe
        plan_checks.check_settings(self, r)
        used = self.used_models()
        self.inspect(used)
        arch = plan_checks.check_models(self, r, used)
        hashes = plan_checks.check_hashes(self, r, used)
        plan_checks.check_outputs(self, r)
        plan = None
        if arch is not None and not any(p.code in plan_checks.STRUCTURAL for p in self.problems):
            from engine.plan.build import Builder

            plan = Builder(self, arch, hashes).build()
            plan_checks.check_disk(self, plan)
        if self.has_errors or not build:
            return self.problems, None
        plan.problems = list(self.problems)
        return self.problems, plan

    def used_models(self) -> list[str]:
        """Model ids that feed some output (the bases of methods included), in [models] order."""
        from engine.plan.checks import method_bases

        r = self.recipe
        bases = method_bases(r)
        wanted = set()
        for out in r.outputs:
            for sel in out.sources.values():
                wanted.update(r.select.get(sel, ()))
                if sel in bases:
                    wanted.add(bases[sel])
        return [m for m in r.models if m in wanted]

    def inspect(self, model_ids: Iterable[str]) -> None:
        from engine.library.diagnose import inspect_file

        for mid in model_ids:
            path = self.recipe.model_path(mid)
            report = self.given.get(_path_key(path))
            if report is None or not _fresh(report, path):
                report = inspect_file(path, mid, on_header=lambda header, mid=mid: self.headers.update({mid: header}))
            self.reports[mid] = report


def _index_reports(reports) -> dict[str, ModelReport]:
    if reports is None:
        return {}
    values = reports.values() if isinstance(reports, Mapping) else reports
    return {_path_key(r.path): r for r in values}


def _path_key(path: Path) -> str:
    return os.path.realpath(path)


def _fresh(report: ModelReport, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (report.file_size, report.mtime_ns)
