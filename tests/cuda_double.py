"""A TEST DOUBLE of ``engine.merge.backends.cuda.CudaRuntime``: it runs ``CudaBackend``'s host
logic on the CPU, where no GPU exists. It is not a GPU emulator and proves nothing about CUDA
kernels; it checks the backend's protocol.

Streams are queues of deferred work. Nothing a stream holds runs when it is issued, only when
the schedule lets it or when something forces it: a host wait on an event, a stream waiting on
an event recorded elsewhere, a device-wide synchronize. Schedules:

- ``lazy``: work runs only when forced, as late as CUDA would allow. A host that reads a result
  before waiting for it, or reuses a buffer that a queued copy still has to read, sees wrong
  bytes.
- ``eager``: work runs as soon as what it waits for has run (the GPU far ahead of the host).
- ``random``: after each call some ready work of random streams runs (seeded).
- ``lazy`` with ``eager_streams`` (indexes in creation order): those streams run ahead as far
  as their waits allow, the others only when forced; one stream far ahead of another is what
  exposes a buffer reused without an event (an upload overwriting an input that a compute has
  not read yet, a compute overwriting results that a download has not copied yet).

Device memory starts as garbage (0xFF: NaN in every float dtype) and pinned buffers as 0xAB,
so a read of memory nobody wrote shows. Every call is appended to ``log`` as a tuple, for tests
that assert the order of operations. Allocation failures can be injected
(``oom_after_bytes``: device bytes before ``empty`` raises ``torch.OutOfMemoryError``;
``fail_run``: the n-th ``run`` raises it, as an allocation inside a kernel launch would;
``fail_pinned``: the n-th pinned allocation fails as ``cudaHostAlloc`` does). Kernels compiled
at run time (``compile``) run on the CPU from the same source (``cuda_host_kernels``), deferred
with the stream work that launches them; ``no_compile`` makes ``compile`` fail as it does where
NVRTC is missing.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
from collections import deque

import torch

# ASTOLFO_TEST_CUDA=real (bench/gpu_check.sh, on a machine with a GPU): the tests that run whole
# passes on ``CudaBackend`` take the card itself instead of this double (``runtime``), so their
# fp64 references and byte-identity checks hold for the GPU's kernels too. The protocol's own
# tests (lazy schedules, injected failures) construct the double directly and stay on it.
ON_THE_CARD = os.environ.get("ASTOLFO_TEST_CUDA") == "real"


class _Stream:
    def __init__(self, name: str):
        self.name = name
        self.queue: deque = deque()

    def __repr__(self) -> str:
        return self.name


class _Event:
    def __init__(self, name: str):
        self.name = name
        self.streams: list[_Stream] = []  # the stream of each record, by generation - 1
        self.done = 0  # records that have run

    @property
    def recorded(self) -> int:
        return len(self.streams)

    def __repr__(self) -> str:
        return self.name


def _locked(method):
    """One call at a time: the merge's pipeline and its statistics thread (a median on the
    device) share the runtime, and a call may run any stream's deferred work."""
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class CudaRuntimeDouble:
    """CPU test double of the CUDA runtime (see the module docstring)."""

    def __init__(self, schedule: str = "lazy", seed: int = 0, free: int = 64 << 30, total: int = 80 << 30,
                 oom_after_bytes: int | None = None, fail_run: int | None = None, eager_streams: tuple = (),
                 fail_pinned: int | None = None, no_compile: bool = False):
        assert schedule in ("lazy", "eager", "random")
        self._lock = threading.RLock()
        self.no_compile = no_compile  # compile() fails, as without NVRTC
        assert not eager_streams or schedule == "lazy"
        self.eager_streams = set(eager_streams)
        self.device = torch.device("cpu")
        self.schedule = schedule
        self.rng = random.Random(seed)
        self.free, self.total = free, total
        self.oom_after_bytes = oom_after_bytes
        self.fail_run = fail_run
        self.fail_pinned = fail_pinned
        self.pins = 0
        self.device_bytes = 0
        self.runs = 0
        self.streams: list[_Stream] = []
        self.events: list[_Event] = []
        self.log: list[tuple] = []

    # ---------------------------------------------------------------- the runtime interface

    @_locked
    def stream(self) -> _Stream:
        s = _Stream(f"stream{len(self.streams)}")
        self.streams.append(s)
        return s

    @_locked
    def event(self) -> _Event:
        e = _Event(f"event{len(self.events)}")
        self.events.append(e)
        return e

    @_locked
    def run(self, stream: _Stream, fn) -> None:
        self.runs += 1
        if self.fail_run is not None and self.runs == self.fail_run:
            self.log.append(("oom", "run", stream.name))
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test double)")
        n = self.runs
        self.log.append(("issue", stream.name, n))
        stream.queue.append(("run", fn, n))
        self._progress()

    @_locked
    def record(self, event: _Event, stream: _Stream) -> None:
        event.streams.append(stream)
        self.log.append(("record", event.name, stream.name, event.recorded))
        stream.queue.append(("record", event, event.recorded))
        self._progress()

    @_locked
    def wait(self, stream: _Stream, event: _Event) -> None:
        self.log.append(("wait", stream.name, event.name, event.recorded))
        if event.recorded:  # CUDA: waiting on a never-recorded event is a no-op
            stream.queue.append(("wait", event, event.recorded))
        self._progress()

    @_locked
    def host_wait(self, event: _Event) -> None:
        self.log.append(("host_wait", event.name, event.recorded))
        self._force(event, event.recorded)
        self._progress()

    @_locked
    def pinned(self, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        self.pins += 1
        if self.fail_pinned is not None and self.pins == self.fail_pinned:
            self.log.append(("oom", "pinned", nbytes))
            raise RuntimeError("CUDA error: out of memory (injected by the test double)")
        self.log.append(("pinned", nbytes, str(dtype)))
        if dtype == torch.bool:
            return torch.zeros(nbytes, dtype=torch.bool)  # False: "not finite" unless written
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8).view(dtype)

    @_locked
    def empty(self, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if self.oom_after_bytes is not None and self.device_bytes + nbytes > self.oom_after_bytes:
            self.log.append(("oom", "alloc", nbytes))
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test double)")
        self.device_bytes += nbytes
        self.log.append(("alloc", nbytes, str(dtype)))
        if dtype == torch.bool:
            return torch.zeros(n, dtype=torch.bool)
        return torch.full((nbytes,), 0xFF, dtype=torch.uint8).view(dtype)

    @_locked
    def mem_get_info(self) -> tuple[int, int]:
        return self.free, self.total

    @_locked
    def synchronize(self) -> None:
        self.log.append(("synchronize",))
        for s in self.streams:
            self._drain(s, len(s.queue))

    @_locked
    def release(self) -> None:
        self.log.append(("release",))

    @_locked
    def bind(self) -> None:
        self.log.append(("bind",))

    @_locked
    def compile(self, source: str, names: list[str]) -> dict:
        """The kernels compiled for this CPU (``cuda_host_kernels``: the same source, each launch
        a loop over its threads), run when the stream work that launches them runs; raises,
        as a machine without NVRTC would, where no C++ compiler is installed."""
        from cuda_host_kernels import available, compile_kernels

        if self.no_compile or not available():
            raise RuntimeError("no compiler for CUDA kernels (the test double)")
        self.log.append(("compile", tuple(names)))
        return compile_kernels(source, names)

    # ---------------------------------------------------------------- the deferred work

    @_locked
    def pending(self) -> int:
        """Entries issued that have not run yet (all streams)."""
        return sum(len(s.queue) for s in self.streams)

    def _force(self, event: _Event, gen: int) -> None:
        """Run the stream of record ``gen`` of ``event`` until that record has run."""
        if gen == 0:
            return
        stream = event.streams[gen - 1]
        while event.done < gen:
            if not stream.queue:
                raise AssertionError(f"{event} record {gen} never runs: {stream} is empty")
            self._step(stream, force=True)

    def _drain(self, stream: _Stream, count: int) -> None:
        for _ in range(count):
            if stream.queue:
                self._step(stream, force=True)

    def _ready(self, stream: _Stream) -> bool:
        kind, *rest = stream.queue[0]
        if kind == "wait":
            event, gen = rest
            return event.done >= gen
        return True

    def _step(self, stream: _Stream, force: bool) -> None:
        """Run the head of ``stream`` (forcing what it waits for when ``force``)."""
        kind, *rest = stream.queue[0]
        if kind == "wait":
            event, gen = rest
            if event.done < gen:
                if not force:
                    return
                if event.streams[gen - 1] is stream:
                    raise AssertionError(f"{stream} waits on its own later record of {event}")
                self._force(event, gen)
            stream.queue.popleft()
            return
        stream.queue.popleft()
        if kind == "record":
            event, gen = rest
            event.done = max(event.done, gen)
            self.log.append(("ran_record", event.name, stream.name, gen))
        else:
            fn, n = rest
            self.log.append(("exec", stream.name, n))
            fn()

    def _progress(self) -> None:
        if self.schedule == "lazy" and not self.eager_streams:
            return
        if self.schedule in ("eager", "lazy"):
            eager = [s for i, s in enumerate(self.streams) if self.schedule == "eager" or i in self.eager_streams]
            moved = True
            while moved:
                moved = False
                for s in eager:
                    while s.queue and self._ready(s):
                        self._step(s, force=False)
                        moved = True
            return
        for _ in range(self.rng.randrange(4)):
            ready = [s for s in self.streams if s.queue and self._ready(s)]
            if not ready:
                return
            self._step(self.rng.choice(ready), force=False)


def runtime(schedule: str = "random", seed: int = 0):
    """The runtime of a test's whole CUDA passes: the double, or the card (``ON_THE_CARD``)."""
    if not ON_THE_CARD:
        return CudaRuntimeDouble(schedule, seed)
    if not torch.cuda.is_available():
        raise RuntimeError("ASTOLFO_TEST_CUDA=real, but torch sees no CUDA GPU")
    from engine.merge.backends.cuda import CudaRuntime

    return CudaRuntime(torch.device("cuda", torch.cuda.current_device()))


def backend_factory(first_seed: int = 1):
    """A stand-in for ``engine.merge.run.open_backend``: every pass on ``CudaBackend`` over
    ``runtime()`` (the double's random schedule, one seed a pass; or the card)."""
    seeds = itertools.count(first_seed)

    def factory(plan, device, tuning, items):
        from engine.merge.backends.cuda import CudaBackend

        return CudaBackend(plan, device, tuning.buffer_bytes, items, runtime=runtime("random", next(seeds)))

    return factory
