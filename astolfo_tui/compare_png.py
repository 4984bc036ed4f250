"""``astolfo compare --png FILE``: one row per component, the heatmap of pairwise cosines with
the models in grid order and, beside it, the dendrogram of the same average-linkage tree the
``family`` findings are cut from (``engine.compare.findings.linkage``), for people who would
rather look than read.

matplotlib is imported here, inside ``write_png``, with the headless Agg backend: the command
imports this module only when ``--png`` is given, so a plain ``astolfo compare`` (and the app)
never loads matplotlib.
"""

from __future__ import annotations

import math
import os

from engine.compare.findings import Thresholds, cosine_distances, linkage


def tree_segments(merges: list[tuple[int, int, float, int]], k: int):
    """The dendrogram's leaf order and its lines: for each merge, the polyline from one child's
    height up to the merge's height, across, and down to the other child, as (heights,
    positions); leaves sit at height 0 and positions 0..k-1 in the order returned."""
    children = {k + s: (a, b) for s, (a, b, _h, _n) in enumerate(merges)}
    height = {k + s: h for s, (_a, _b, h, _n) in enumerate(merges)}
    order: list[int] = []
    stack = [k + len(merges) - 1] if merges else list(range(k))
    while stack:  # depth first, first child first (no recursion: up to 256 models)
        c = stack.pop()
        if c < k:
            order.append(c)
        else:
            a, b = children[c]
            stack.extend((b, a))
    pos: dict[int, float] = {leaf: float(i) for i, leaf in enumerate(order)}
    lines = []
    for c in sorted(children):
        a, b = children[c]
        pos[c] = (pos[a] + pos[b]) / 2
        ha, hb, hc = height.get(a, 0.0), height.get(b, 0.0), height[c]
        lines.append(([ha, hc, hc, hb], [pos[a], pos[a], pos[b], pos[b]]))
    return order, lines


def write_png(result: dict, path: str | os.PathLike) -> int:
    """Draw every component of ``result`` into ``path``; returns the number of panels drawn
    (a heatmap and a dendrogram per component). Raises OSError when the file cannot be written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    components = list(result["components"].items())
    cut = 1.0 - result.get("thresholds", {}).get("family", Thresholds().family)
    sizes = [len(e["models"]) for _c, e in components] or [1]
    row_h = [max(3.0, 0.32 * n + 1.2) for n in sizes]
    width = max(9.0, 0.32 * max(sizes) * 1.7 + 5)
    fig = Figure(figsize=(width, sum(row_h) + 0.6), layout="constrained")
    ref = result.get("reference")
    fig.suptitle(f"astolfo compare: cosines of the deltas against {ref or 'the mean of the models'}")
    panels = 0
    if not components:
        fig.text(0.5, 0.5, "nothing was compared", ha="center")
    grid = fig.add_gridspec(max(len(components), 1), 2, width_ratios=[1.6, 1], height_ratios=row_h[: len(components)]
                            or [1])
    for row, (comp, entry) in enumerate(components):
        models = entry["models"]
        cos = entry["cosine"]
        heat = fig.add_subplot(grid[row, 0])
        values = [[math.nan if c is None else c for c in r] for r in cos]
        image = heat.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        heat.set_xticks(range(len(models)), models, rotation=90, fontsize=7)
        heat.set_yticks(range(len(models)), models, fontsize=7)
        heat.set_title(f"{comp}: pairwise cosine (grid order)", fontsize=9)
        if len(models) <= 16:
            for i, r in enumerate(cos):
                for j, c in enumerate(r):
                    if c is not None:
                        heat.text(j, i, f"{c:.2f}", ha="center", va="center", fontsize=6,
                                  color="white" if abs(c) > 0.6 else "black")
        fig.colorbar(image, ax=heat, shrink=0.8)
        tree = fig.add_subplot(grid[row, 1])
        live = [i for i in range(len(models)) if cos[i][i] is not None]
        tree.set_title(f"{comp}: average linkage on 1 - cosine", fontsize=9)
        if len(live) >= 2:
            order, lines = tree_segments(linkage(cosine_distances(cos, live)), len(live))
            for xs, ys in lines:
                tree.plot(xs, ys, color="#3b4261", linewidth=1)
            tree.set_yticks(range(len(order)), [models[live[i]] for i in order], fontsize=7)
            tree.axvline(cut, color="#f7768e", linestyle="--", linewidth=0.8, label="family cut")
            tree.legend(fontsize=6, loc="lower right")
            tree.set_ylim(-0.5, len(order) - 0.5)
            tree.invert_yaxis()
            tree.set_xlabel("1 - cosine", fontsize=8)
        else:
            tree.text(0.5, 0.5, "fewer than two changed models", ha="center", va="center", fontsize=8)
            tree.set_axis_off()
        panels += 2
    fig.savefig(os.fspath(path), format="png", dpi=110)
    return panels
