"""Weiszfeld's iteration in the coefficients of the points, for the geometric median of a few
points (``engine.methods.median``'s Gram route).

Every iterate is an affine combination of the points, ``m = sum_j a_j p_j`` with
``sum_j a_j = 1`` (the weighted mean, then ``w_i' p_i / sum w_i'``), so each distance follows
from the points' Gram matrix: ``||p_i - m||^2 = G_ii - 2 (G a)_i + a^T G a``. The Gram matrix is
taken of the points less their per-element mean (any common shift leaves the distances as
they are, and this one keeps the three terms the size of the distances, so they cancel no
digits that matter); the iterate itself is formed once, at the end, from the last coefficients.
"""

from __future__ import annotations

import math

import numpy as np

from engine.kernels.jit import kernel


@kernel
def center(points):
    """Subtract from every point (float64[N, m], in place) the points' mean at each element:
    the values added in point order and divided once by N (``engine.kernels.deltas``' mean)."""
    n_pts, m = points.shape
    mean = np.zeros(m, np.float64)
    for i in range(n_pts):
        row = points[i]
        for e in range(np.uint64(m)):
            mean[e] = mean[e] + row[e]
    for e in range(np.uint64(m)):
        mean[e] = mean[e] / n_pts
    for i in range(n_pts):
        row = points[i]
        for e in range(np.uint64(m)):
            row[e] = row[e] - mean[e]


@kernel
def distances(gram, a, out):
    """``out[i] = ||p_i - sum_j a_j p_j||`` from ``gram`` (float64[N, N]) and the coefficients
    ``a`` (summing to 1), in a fixed order; a negative square from rounding (a point on the
    iterate) is a distance of 0, a NaN stays NaN."""
    n_pts = gram.shape[0]
    ga = np.empty(n_pts, np.float64)
    for i in range(n_pts):
        s = 0.0
        for j in range(n_pts):
            s += gram[i, j] * a[j]
        ga[i] = s
    q = 0.0
    for i in range(n_pts):
        q += a[i] * ga[i]
    for i in range(n_pts):
        v = gram[i, i] - 2.0 * ga[i] + q
        if v != v:
            out[i] = v
        elif v > 0.0:
            out[i] = math.sqrt(v)
        else:
            out[i] = 0.0


@kernel
def iterate(gram, w, eps, maxiter, ftol, coef):
    """Weiszfeld's steps on ``gram`` (``engine.methods.median``'s definition: start at the
    weighted mean, ``coef_i = w_i / max(d_i, eps)``, stop when ``|obj_prev - obj| <= ftol *
    obj``, obj the mean of ``w_i d_i``, or after ``maxiter`` steps, or at a NaN objective),
    all in one call: per step a few hundred operations, which numpy and Python would spend
    microseconds each on, for every one of a checkpoint's thousands of tensors. ``coef``
    (out): the last step's coefficients, whose iterate is ``sum coef_i p_i / sum coef_i``
    (sums in point order). Returns the number of steps."""
    n_pts = gram.shape[0]
    a = np.empty(n_pts, np.float64)
    d = np.empty(n_pts, np.float64)
    for i in range(n_pts):
        coef[i] = w[i]
    obj = _step(gram, w, coef, a, d)
    steps = 0
    while steps < maxiter and math.isfinite(obj):
        steps += 1
        prev = obj
        for i in range(n_pts):
            x = d[i]
            coef[i] = w[i] / (x if (x != x or x > eps) else eps)  # np.maximum(d, eps): NaN stays
        obj = _step(gram, w, coef, a, d)
        if abs(prev - obj) <= ftol * obj:
            break
    return steps


@kernel
def _step(gram, w, coef, a, d):
    """The distances ``d`` to the iterate of ``coef`` and the objective there."""
    n_pts = gram.shape[0]
    total = 0.0
    for i in range(n_pts):
        total += coef[i]
    for i in range(n_pts):
        a[i] = coef[i] / total
    distances(gram, a, d)
    obj = 0.0
    for i in range(n_pts):
        obj += w[i] * d[i]
    return obj / n_pts
