"""The element-wise arithmetic of the merge methods over one slice of a key, in torch ops that
run the same on the CPU and on CUDA (so both backends write the same bytes).

For each element, in the order the methods issue defines (fp64 throughout, one rounding to the
output dtype at the end):

- ``tau_i = x_i - base`` (exact for 16-bit sources);
- DARE's drop: ``tau_i`` set to 0 where ``u < drop``, ``u`` the counter-based uniform of
  (seed, the model's SHA256, the key, the element index) (``engine.kernels.hashing``), so the
  mask does not depend on how the tensor is cut, on the device, or on the order of the models;
- each delta times its model's factor (the weight, scaled to an exact integer by
  ``plan.build.exact_factors``: every product and sum below is then exact);
- the vote (``sum``: sign of ``sum f_i tau_i``; ``count``: sign of ``sum f_i sign tau_i``) and
  the disjoint mean of the entries with the elected sign (0 where none, or on a tied vote), or
  without a vote the sum (``combine = "sum"``, divided back by the factors' scale) or the mean
  over all the models' factors;
- divided by ``1 - drop`` when ``rescale``; times ``alpha``; plus the base.

Everything is one pass over the sources already in the read buffer, with a fixed number of
scratch vectors whatever the number of models. ``all inputs finite`` is the returned flag: a
running sum of the raw deltas and the base (a NaN/Inf anywhere makes it non-finite; fp16/fp32
values cannot overflow it in fp64), taken before any drop or vote could hide a bad value.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from engine.kernels.hashing import key_hash, stream_key, uniform_torch
from engine.merge.arithmetic import Kernel, all_finite

F64 = torch.float64
# Scratch vectors of one slice (names of Kernel.buf; the CUDA backend sizes them ahead).
SCRATCH = ("m_base", "m_tau", "m_total", "m_probe", "m_pos", "m_posw", "m_neg", "m_negw", "m_abs")


@lru_cache(maxsize=4096)
def mask_key(seed: int, sha256: str, key: str) -> int:
    """The stream key of one model's drop mask on one tensor: (seed, the model's SHA256, the
    output key), never its position in the recipe."""
    return stream_key(seed, int(sha256[:16], 16), key_hash(key))


def compute(k: Kernel, params, key: str, start: int, base: torch.Tensor, views: list[torch.Tensor],
            factors: list[float], shas: list[str | None], scale: float, outs: list[torch.Tensor],
            stats=None, idents: list[tuple[int, str]] | None = None) -> torch.Tensor:
    """Elements ``start ..`` of ``key`` by method ``params`` (MethodParams) into each of ``outs``:
    ``base`` and the models' ``views`` (same length), their ``factors`` and SHA256s (for the
    drop masks; None only when nothing is dropped), ``scale``: factors / weights; ``stats``:
    the key's ``tensor_stats.TensorStats`` where the method needs them, with ``idents`` the
    models' ``(file, stored key)``. Returns the 0-dim "every input finite" flag."""
    n = outs[0].numel()  # a median reads no model (element_models)
    b = k.buf("m_base", F64, n)
    if base is None:  # a median of the models themselves: deltas against 0 (exact)
        b.zero_()
    else:
        k.load(b, base)
    probe = k.buf("m_probe", F64, n)
    probe.copy_(b)
    tau = k.buf("m_tau", F64, n)
    total = k.buf("m_total", F64, n)
    total.zero_()
    median = params.combine == "median"  # the key's median is in ``stats``; no model is passed (element_models)
    voting = params.vote != "none" and not median
    if voting:
        pos, posw = k.buf("m_pos", F64, n).zero_(), k.buf("m_posw", F64, n).zero_()
        neg, negw = k.buf("m_neg", F64, n).zero_(), k.buf("m_negw", F64, n).zero_()
    drop = params.drop
    idents = idents or [None] * len(views)
    for view, f, sha, ident in zip(views, factors, shas, idents):
        k.load(tau, view)
        tau.sub_(b)
        probe.add_(tau)
        if params.drop_eps != 0:  # DELLA: the keep mask from the key's ranks
            keep = torch.from_numpy(stats.keep_mask(ident, start, n)).to(tau.device, non_blocking=True)
            tau.masked_fill_(~keep, 0.0)
        elif drop > 0:
            u = uniform_torch(mask_key(params.seed, sha, key), start, n, device=tau.device)
            tau.masked_fill_(u < drop, 0.0)
        if params.trim < 1:  # kept where |tau| >= the model's threshold on this key
            mag = torch.abs(tau, out=k.buf("m_abs", F64, n))
            tau.masked_fill_(mag < stats.thresholds[ident], 0.0)
        if f != 1.0:
            tau.mul_(f)  # then add: never an FMA
        if not voting:
            total.add_(tau)
            continue
        if params.vote == "sum":
            total.add_(tau)
        else:
            total.add_(torch.sign(tau).mul_(f))
        up, down = tau > 0, tau < 0
        pos.add_(torch.where(up, tau, 0.0))
        posw.add_(up.to(F64).mul_(f))
        neg.add_(torch.where(down, tau, 0.0))
        negw.add_(down.to(F64).mul_(f))
    if median:
        delta = total
        delta.copy_(torch.from_numpy(stats.median[start:start + n]))
    elif voting:
        # the elected sign's disjoint mean (its weight is > 0 wherever that sign won); 0 on a tie
        delta = torch.where(total > 0, pos.div_(posw), torch.where(total < 0, neg.div_(negw), 0.0))
    else:
        delta = total
        if params.combine in ("mean", "stock"):
            delta.div_(k.divisor(math.fsum(factors), F64))
            if params.combine == "stock":
                delta.mul_(stats.stock_t)
        elif scale != 1.0:
            delta.div_(k.divisor(scale, F64))
    divisor = params.rescale_divisor
    if divisor is not None:
        delta.div_(k.divisor(divisor, F64))
    if params.alpha != 1.0:
        delta.mul_(params.alpha)
    delta.add_(b)
    for out in outs:
        k.narrow(delta, out)
    return all_finite(probe)


def element_models(node, kept: list, factors: list, shas: list, stats) -> tuple[list, list, list, list]:
    """What a method node's element pass reads of its models: (models, factors, SHA256s, the
    sources to blame for NaN/Inf). A geometric median's models are not read
    (``engine.merge.layout``): its statistics computed the median from the files and counted
    their NaN/Inf values (``stats.nonfinite``), so the pass reads the base alone, and blames
    those sources before it computes anything."""
    if node.method.combine != "median":
        return kept, factors, shas, []
    return [], [], [], list(stats.nonfinite)


def method_parts(plan, seg, ns, excluded: dict[int, set]):
    """A method node's slice: (node, base slice or None, whether the base is left out for NaN/Inf, the
    models' slices not left out, their factors, their SHA256s or None where not known)."""
    node = plan.nodes[ns.node]
    skip = excluded.get(ns.node, ())
    has_base = node.method.base is not None  # else a median of the models themselves
    base = seg.sources[ns.sources[0]] if has_base else None
    kept, factors = [], []
    for i, f in zip(ns.sources[1:] if has_base else ns.sources, node.factors[1:] if has_base else node.factors):
        s = seg.sources[i]
        if (s.file, s.key) not in skip:
            kept.append(s)
            factors.append(f)
    shas = []
    for s in kept:
        h = plan.hashes.get(plan.files[s.file].model_id)
        shas.append(h.sha256 if h is not None else None)
    if node.method.drop > 0 and None in shas:
        missing = plan.files[kept[shas.index(None)].file].model_id
        raise RuntimeError(f"model {missing}: its SHA256 is needed for the drop masks of {node.key} and is not known "
                           "(the merge hashes every source before it starts)")
    return node, base, base is not None and (base.file, base.key) in skip, kept, factors, shas
