"""The k-th smallest magnitude of a tensor, exactly, by histograms of its float bits.

For floats of one sign the order of the values is the order of their bit patterns, so the
magnitude ``bits & ~sign`` sorts like ``|x|`` (a NaN counts above Inf). A pass counts
the magnitudes of the tensor in 65536 bins of 16 bits (``magnitude_histogram``); the bin holding
the k-th one (``pick``) fixes those 16 bits, and the next pass counts the next 16 bits among the
elements with that prefix: one pass for fp16/bf16, two for fp32, four for fp64. Each pass is a
streaming scan, so a method can run it over a tensor's chunks as they are read; the answer
equals ``torch.kthvalue(x.abs().flatten(), k)`` (k from 1), with no sort and no copy.
"""

from __future__ import annotations

import numpy as np

from engine.kernels.jit import kernel

BINS = 1 << 16
# magnitude bits of each width, and the shift of each 16-bit digit, top digit first
DIGITS = {16: (0,), 32: (16, 0), 64: (48, 32, 16, 0)}


@kernel
def magnitude_histogram(bits, width, shift, prefix, hist):
    """Count, in ``hist`` (int64[65536], added to), the 16-bit digit at ``shift`` of the
    magnitude of each element of ``bits`` (an integer view of fp16/bf16/fp32/fp64 data of
    ``width`` bits) whose digits above ``shift`` equal ``prefix``."""
    sign_off = (1 << (width - 1)) - 1 if width < 64 else 0x7FFFFFFFFFFFFFFF
    top = shift + 16
    for i in range(bits.size):
        mag = np.int64(bits[i]) & sign_off
        above = (mag >> top) if top < 64 else 0
        if above == prefix:
            hist[(mag >> shift) & 0xFFFF] += 1


@kernel
def pick(hist, k):
    """(bin, rank inside it) of the k-th smallest counted element, k from 1."""
    seen = 0
    for b in range(hist.size):
        if seen + hist[b] >= k:
            return b, k - seen
        seen += hist[b]
    return -1, 0


def kth_smallest_magnitude_bits(chunks, width: int, k: int) -> int:
    """The magnitude bits of the k-th smallest |x| over ``chunks`` (a list of integer views of
    one tensor's data, in any order; re-read once per 16-bit digit)."""
    prefix = 0
    for shift in DIGITS[width]:
        hist = np.zeros(BINS, np.int64)
        for c in chunks:
            magnitude_histogram(c, width, shift, prefix, hist)
        digit, k = pick(hist, k)
        if digit < 0:
            raise ValueError("k is larger than the number of elements")
        prefix = (prefix << 16) | int(digit)
    return prefix


RADIX_BITS = 11
RADIX = 1 << RADIX_BITS


@kernel
def magnitude_ranks(bits, ranks):
    """``ranks[i]`` = the rank (1 for the smallest) of ``|x[i]|`` among the fp64 values whose
    bits are ``bits`` (int64), ties by element order (scipy's ``ordinal``): a stable LSD radix
    sort of the magnitude bits, 11 bits a pass, a pass skipped where every element has the same
    digit (the high digits of deltas mostly do). No comparison sort: a few ns per element."""
    n = bits.size
    keys = np.empty(n, np.int64)
    idx = np.empty(n, np.int64)
    keys2 = np.empty(n, np.int64)
    idx2 = np.empty(n, np.int64)
    for i in range(n):
        keys[i] = bits[i] & 0x7FFFFFFFFFFFFFFF
        idx[i] = i
    count = np.zeros(RADIX, np.int64)
    for shift in range(0, 63, RADIX_BITS):
        count[:] = 0
        for i in range(n):
            count[(keys[i] >> shift) & (RADIX - 1)] += 1
        if n == 0 or count[(keys[0] >> shift) & (RADIX - 1)] == n:
            continue  # one digit value: the order stays
        total = 0
        for d in range(RADIX):
            c = count[d]
            count[d] = total
            total += c
        for i in range(n):
            d = (keys[i] >> shift) & (RADIX - 1)
            j = count[d]
            count[d] = j + 1
            keys2[j] = keys[i]
            idx2[j] = idx[i]
        keys, keys2 = keys2, keys
        idx, idx2 = idx2, idx
    for j in range(n):
        ranks[idx[j]] = j + 1


# Below this many elements a selection by numpy's introselect beats the 65536-bin histogram
# (whose zeroing and scan alone cost ~50 us a call).
SMALL = 1 << 16
_MAG64 = 0x7FFFFFFFFFFFFFFF


@kernel
def _gather_prefix(bits, shift, prefix, out):
    """The magnitudes of the fp64 ``bits`` whose bits above ``shift`` equal ``prefix``, into ``out``
    (sized one more than their count); returns their count."""
    j = 0
    last = out.size - 1  # out has one spare slot: every element is stored, the index moves on a match
    for i in range(bits.size):
        mag = bits[i] & 0x7FFFFFFFFFFFFFFF
        out[min(j, last)] = mag
        j += (mag >> shift) == prefix
    return min(j, last)


def kth_smallest_magnitude64(bits: np.ndarray, k: int) -> int:
    """``kth_smallest_magnitude_bits([bits], 64, k)`` for one whole fp64 tensor (int64 view), in
    two scans instead of four: a histogram of the top 16 magnitude bits picks the bin of the
    k-th, whose elements (a small share of the tensor, usually) are gathered and selected by
    introselect. Small tensors are selected directly."""
    n = bits.size
    if not 1 <= k <= n:
        raise ValueError("k is larger than the number of elements")
    if n <= SMALL:
        return int(np.partition(bits & _MAG64, k - 1)[k - 1])
    hist = np.zeros(BINS, np.int64)
    magnitude_histogram(bits, 64, 48, 0, hist)
    digit, k = pick(hist, k)
    count = int(hist[digit])
    cand = np.empty(count + 1, np.int64)
    _gather_prefix(bits, 48, digit, cand)
    return int(np.partition(cand[:count], k - 1)[k - 1])
