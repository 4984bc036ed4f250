"""A counter-based uniform hash: u in [0, 1) from (seed, model id, key hash, element index),
with a pure-torch twin made of integer ops that runs on CUDA and gives the same bits.

Drop masks (DARE, DELLA) need one random number per element and model that does not depend on
how the tensor is cut into chunks, on the thread that computes it, or on the device: a hash of
the element's coordinates, not a generator's state. ``stream_key`` folds (seed, model id, key
hash) into one 64-bit key with SplitMix64's finalizer; element ``i`` of the stream is the
finalizer of ``key + (i + 1) * golden`` (SplitMix64's own sequence, which passes BigCrush), and
``u`` is its top 53 bits over 2**53: exact in fp64, never 1.0.

The numba kernel uses uint64; the torch twin uses int64 with wrapping multiplication and
masks after each right shift (torch shifts int64 arithmetically): the same arithmetic mod 2**64.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from engine.kernels.jit import kernel

GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def stream_key(seed: int, model_id: int, key_hash: int) -> int:
    """The 64-bit key of one (seed, model, tensor) stream (each input taken mod 2**64)."""
    z = _mix(((seed & _MASK) + GOLDEN) & _MASK)
    z = _mix(z ^ (model_id & _MASK))
    return _mix(z ^ (key_hash & _MASK))


def key_hash(key: str) -> int:
    """A 64-bit hash of a tensor's name (its first 8 BLAKE2b bytes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


@kernel
def uniform(key, start, out):
    """``out[j]`` = u of element ``start + j`` of the stream ``key`` (int64 holding the 64 bits)."""
    k = np.uint64(key)
    g = np.uint64(GOLDEN)
    for j in range(out.size):
        z = k + np.uint64(start + j + 1) * g
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        z = z ^ (z >> np.uint64(31))
        out[j] = np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


def uniform_numpy(key: int, start: int, n: int) -> np.ndarray:
    out = np.empty(n, np.float64)
    uniform(_signed(key), start, out)
    return out


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # a logical shift of the 64 bits


def uniform_torch(key: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """The same numbers as ``uniform``, with torch integer ops (CPU or CUDA)."""
    i = torch.arange(start + 1, start + n + 1, dtype=torch.int64, device=device)
    z = i * _signed(GOLDEN) + _signed(key)
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    z = z ^ _shr(z, 31)
    return _shr(z, 11).to(torch.float64) * 2.0**-53
