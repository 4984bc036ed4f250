"""What a NaN or Inf in a source does to a merge: stop, naming the model and key (the
default), or with ``skip_nan`` leave that source out of that key and restart from the last
durable point. A key where no source is left, or a copy of a single model, cannot be skipped.
Warnings are one per key up to a limit per model, then a count, so 2,000 bad keys of one
model do not drown the log."""

from __future__ import annotations

from typing import Callable

from engine.merge.backends.base import Bad
from engine.merge.errors import MergeError
from engine.plan.model import MEAN, METHOD, MergePlan

WARNINGS_PER_MODEL = 10  # one warning per key up to this many, then a count


class NanPolicy:
    def __init__(self, plan: MergePlan, warn: Callable[..., None]):
        self.plan = plan
        self.warn = warn
        self.skip = plan.recipe.skip_nan
        self.excluded: dict[int, set[tuple[int, str]]] = {}  # node -> (file, stored key) left out
        self.skipped_keys: dict[str, int] = {}  # model id -> keys it was left out of

    def handle(self, bads: list[Bad]) -> None:
        """Record the sources to leave out, or raise MergeError when the merge must stop."""
        plan = self.plan
        for bad in bads:
            node = plan.nodes[bad.node]
            key = node.key
            if not bad.sources:
                raise MergeError(f"{key}: every model of the selection holds NaN/Inf values here; nothing left to "
                                 "average", key=key)
            first = plan.files[bad.sources[0][0]]
            if not self.skip:
                names = ", ".join(f"{plan.files[f].model_id} ({plan.files[f].path.name})" for f, _ in bad.sources)
                raise MergeError(f"NaN/Inf values in {key} of model {names}: stopped (skip_nan = true leaves that "
                                 "model out of the keys where this happens)", first.model_id, key)
            if node.kind == METHOD and (node.sources[0].file, node.sources[0].key) in bad.sources:
                base = plan.files[node.sources[0].file].model_id
                raise MergeError(f"NaN/Inf values in {key} of the base {base}: a method's base cannot be left out",
                                 base, key)
            models = len(node.sources) - (node.kind == METHOD)
            left = models - len(self.excluded.get(bad.node, ()))
            if node.kind not in (MEAN, METHOD) or left <= len(bad.sources):
                raise MergeError(f"NaN/Inf values in {key} of model {first.model_id} ({first.path.name}), and no "
                                 "other model of the selection has this tensor: cannot skip it", first.model_id, key)
            for f, stored in bad.sources:
                self.excluded.setdefault(bad.node, set()).add((f, stored))
                mid = plan.files[f].model_id
                shown = self.skipped_keys.get(mid, 0)
                self.skipped_keys[mid] = shown + 1
                if shown < WARNINGS_PER_MODEL:
                    self.warn("nan_skipped", f"model {mid}: {key} holds NaN/Inf values; left out of this key "
                              "(skip_nan)", mid, key)

    def summarize(self) -> None:
        """One warning per model whose skipped keys were not all listed."""
        for mid, n in self.skipped_keys.items():
            if n > WARNINGS_PER_MODEL:
                self.warn("nan_skipped", f"model {mid}: left out of {n} keys in all for NaN/Inf values "
                          f"({n - WARNINGS_PER_MODEL} not listed one by one)", mid)
