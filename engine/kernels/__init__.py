"""Fused CPU kernels (numba): exact arithmetic in one pass over memory.

A torch op is one pass over its operands; the exact mean (widen, accumulate in fp64, divide,
round to odd, narrow, check finite) took a dozen of them and made a CPU merge compute-bound.
These kernels do all of it per element while the values sit in registers, release the GIL
(``nogil``) so the merge's worker threads overlap reads, compute and writes, and are cached on
disk (``cache=True``) and warmed in the background so the first call does not compile.

- ``jit``: numba, its on-disk cache directory, bit casts and a fused multiply-add.
- ``floats``: fp16/bf16 decoded from their bits, fp64 narrowed to fp32/fp16/bf16 rounding once,
  byte-identical to the torch engine (``engine.merge.arithmetic.Kernel``).
- ``mean``: the weighted mean (and the checked copy) of a merge node, sources and outputs given
  as element offsets into dtype views of the read and output buffers.
- ``vote``, ``select``, ``hashing``, ``gram``: per-element primitives for the merge methods
  (masked sums and sign votes, the k-th smallest magnitude by histogram, a counter-based
  uniform hash with a bit-identical torch twin, fp64 Gram matrices).
- ``warm``: compile (or load from the cache) every signature in a background thread.

Nothing here knows about plans or files; ``engine.merge.backends.cpu_fused`` maps a plan's
node onto ``mean``.
"""
