"""Hands each method node's whole-tensor statistics (``tensor_stats``) to the items that hold
its slices, computed one node ahead on a thread of their own.

Trim thresholds, DELLA ranks, model stock's factor and the geometric median read the key's
sources a second time, whole, and work on them before the key's first slice can be merged.
Done on the pipeline's thread, that read and that work stood between two keys with the
readers and the backend idle: on a cold disk a TIES merge spent most of its time there. Here
one thread (``_Ahead``) walks the pass's method nodes in the order their first slices come,
and computes node ``j`` while the pipeline still merges the keys before it, so the second read
overlaps the first and the selection overlaps the element pass. The thread reads through the
page cache (``whole_reads``: several requests in flight, the next tensor fetched while the
current one is worked on), and the merge's readers, which otherwise read past it on a merge
too big to cache, copy those items from there (``reads``): the disk serves each byte once.

What it holds ahead is bounded: the next node always, more only while the nodes computed
and not yet handed out total at most ``AHEAD_ELEMENTS`` elements (many small keys in a row),
so a median's result (8 bytes an element) or DELLA's masks are held for at most one large
key beyond those in flight. The numbers do not depend on when they are computed: every
statistic is a function of the files' bytes and the pass's left-out sources, fixed for the
pass (a NaN skip ends it).

The thread never emits progress: while the pipeline waits for a node, it forwards what the
thread is computing (``working_on``) and keeps ticking. An error or a cancel inside the
computation reaches the pipeline when it asks for that node, as it did when the pipeline
computed it itself; ``end_pass`` stops the thread on every way out of a pass.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.checkpoint.format import DTYPES
from engine.checkpoint.reader import pread_exact
from engine.methods.streamed import mask_key, method_parts
from engine.methods.tensor_stats import TensorStats, compute_stats, needs_stats
from engine.methods.whole_reads import WholeReads, pread_pieces
from engine.methods.widening import read_f64, widen_raw
from engine.plan.model import METHOD, MergePlan, Source

# Elements of computed nodes the thread may hold beyond the next one the pipeline needs.
AHEAD_ELEMENTS = 4 << 20


class _Stopped(Exception):
    """The pass ended while a node was being computed."""


@dataclass
class _Job:
    """One method node's statistics, to be computed (or left alone: ``stats`` None, nothing
    to compute because the backend reports the slice as bad)."""

    index: int  # in the pass's order
    node: int
    key: str
    numel: int
    args: tuple | None  # compute_stats's (params, key, base, models, shas), None: nothing to compute
    done: threading.Event = field(default_factory=threading.Event)
    stats: TensorStats | None = None
    error: BaseException | None = None
    detail: str | None = None  # what the thread is computing, for the progress


class StatsFeed:
    """Each method node's statistics, once per pass, to the items that hold its slices
    (``Item.stats``). ``clamped`` keeps, across passes, the keys whose model stock ``t`` was
    clamped (node id -> (key, raw t))."""

    def __init__(self, plan: MergePlan, fds: list[int], check_cancel: Callable[[], None],
                 tick: Callable[[], None] = lambda: None,
                 working_on: Callable[[str, str | None], None] = lambda key, detail: None):
        from engine.recipe.sizes import memory_budget

        self.budget = memory_budget(plan.recipe.memory)
        self.plan = plan
        self.fds = fds
        self.check_cancel = check_cancel
        self.tick = tick
        self.working_on = working_on
        self.clamped: dict[int, tuple[str, float]] = {}
        self._jobs: dict[int, _Job] = {}
        self._cached: dict[int, list[_Job]] = {}  # items whose sources the thread reads: their jobs
        self._ahead: _Ahead | None = None
        self.device = None  # the pass's median_device.DeviceMedian (a CUDA merge), or None

    def begin_pass(self, items, excluded: dict[int, set], device=None) -> None:
        """A new pass over ``items`` with these sources left out (after a NaN skip they differ:
        nothing of an earlier pass is reused); starts the thread when a node needs statistics.
        ``device``: where the medians may hold their points (a CUDA backend's ``median_device``)."""
        self.end_pass()
        self.device = device
        excluded = {node: set(left) for node, left in excluded.items()}  # the pass's own copy
        jobs: list[_Job] = []
        for item in items:
            for seg in item.segments:
                for ns in seg.nodes:
                    node = self.plan.nodes[ns.node]
                    if node.kind != METHOD or not needs_stats(node.method):
                        continue
                    if ns.node not in self._jobs:
                        job = _Job(len(jobs), ns.node, node.key, node.numel, self._arguments(seg, ns, excluded))
                        self._jobs[ns.node] = job
                        jobs.append(job)
                    if self._jobs[ns.node].args is not None:
                        self._cached.setdefault(item.index, []).append(self._jobs[ns.node])
        if jobs:
            from engine.methods.median import RESULTS

            RESULTS.reserve(_results_elements(self.plan, items, jobs))
            self._ahead = _Ahead(self, jobs)
            self._ahead.start()

    def end_pass(self) -> None:
        """Stop the thread (it ends at its next cancel check) and drop what it held."""
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None
        self._jobs.clear()
        self._cached = {}
        from engine.methods.median import release_buffers

        release_buffers()

    def attach(self, item) -> None:
        """Give ``item`` the statistics of every method node it holds a slice of, waiting for
        the thread where it has not finished them (ticking and naming what it computes)."""
        for seg in item.segments:
            for ns in seg.nodes:
                job = self._jobs.get(ns.node)
                if job is None:
                    continue
                if job.args is not None:
                    self._wait(job)
                    item.stats[ns.node] = job.stats
                if seg.stop >= job.numel:  # its last slice: the thread may go on
                    del self._jobs[ns.node]
                    self._ahead.handed_out(job)
                    job.stats = None  # the items hold it now, until they are done

    def reads(self, item, stop: threading.Event) -> bool:
        """Whether the thread reads ``item``'s sources (through the page cache) before the
        item's turn; if so, once it has (or ``stop`` is set), so that the merge's readers copy
        them from there: a reader ahead of the thread would read them from the disk first,
        and drop them from the cache behind it, and the thread would read them again."""
        jobs = self._cached.get(item.index)
        if jobs is None:
            return False
        for job in jobs:
            while not job.done.wait(0.1) and not stop.is_set():
                pass
        return True

    def _wait(self, job: _Job) -> None:
        if not job.done.is_set():
            self._ahead.wanted(job)
            while not job.done.wait(0.1):
                self.check_cancel()
                self.working_on(job.key, job.detail)
                self.tick()
            self.working_on(job.key, None)
        if job.error is not None:
            raise job.error
        stats = job.stats
        if stats.stock_raw is not None:
            self.clamped[job.node] = (job.key, stats.stock_raw)
        else:
            self.clamped.pop(job.node, None)

    def _arguments(self, seg, ns, excluded) -> tuple | None:
        node = self.plan.nodes[ns.node]
        _, base, base_out, kept, _, shas = method_parts(self.plan, seg, ns, excluded)
        if base_out or not kept:
            return None  # the backend reports the slice as bad
        by_ident = {(s.file, s.key): s for s in self.plan.steps[seg.step].sources}
        return (node.method, node.key, None if base is None else by_ident[(base.file, base.key)],
                [by_ident[(s.file, s.key)] for s in kept], shas)

    def read(self, src: Source, start: int, stop: int, minus: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        return read_f64(self.fds[src.file], src, self.plan.files[src.file].path, start, stop, minus, out)

    def read_span(self, src: Source, start: int, stop: int, view: memoryview) -> None:
        """Elements ``start .. stop`` of ``src``'s stored bytes into ``view``."""
        size = DTYPES[src.dtype].itemsize
        pread_exact(self.fds[src.file], view, src.offset + start * size, self.plan.files[src.file].path)

    def read_raw(self, src: Source, view: memoryview) -> None:
        """``src``'s stored bytes, whole, into ``view``."""
        pread_pieces(self.fds[src.file], view, src.offset, self.plan.files[src.file].path)


class _Ahead(threading.Thread):
    """Computes the pass's jobs in order: the one the pipeline is at and the next always,
    later ones only while those finished beyond the next total ``AHEAD_ELEMENTS``."""

    def __init__(self, feed: StatsFeed, jobs: list[_Job]):
        super().__init__(name="astolfo-stats", daemon=True)
        self.feed = feed
        self.jobs = jobs
        self._before = [0]  # elements of the jobs before each index
        for job in jobs:
            self._before.append(self._before[-1] + job.numel)
        self._lock = threading.Condition()
        self._stopped = False
        self._whole = WholeReads(feed.read_raw, widen_raw)  # this thread's whole-tensor reads, for the pass
        self._at = 0  # index of the first job the pipeline has not handed out the last slice of

    def run(self) -> None:
        try:
            for index, job in enumerate(self.jobs):
                if job.args is not None:
                    if not self._may_start(index, job):
                        return
                    self._whole.then = _first_source(self.jobs, index + 1)
                    self._compute(job)
                job.done.set()
        finally:
            self._whole.close()

    def _may_start(self, index: int, job: _Job) -> bool:
        with self._lock:
            while not self._stopped and index > self._at + 1 and \
                    self._before[index + 1] - self._before[self._at + 1] > AHEAD_ELEMENTS:
                self._lock.wait()
            return not self._stopped

    def _compute(self, job: _Job) -> None:
        def check() -> None:
            if self._stopped:
                raise _Stopped()
            self.feed.check_cancel()

        def report(detail: str | None) -> None:
            job.detail = detail

        try:
            job.stats = compute_stats(*job.args, self.feed.read, check, mask_key, self.feed.budget, report,
                                      self._whole, self.feed.read_span, self.feed.device)
        except _Stopped:
            job.error = RuntimeError("the pass ended")  # never handed out: the pass is over
        except BaseException as e:  # raised where the pipeline asks for this node
            job.error = e

    def wanted(self, job: _Job) -> None:
        """The pipeline waits for ``job``: the jobs before it are no longer ahead."""
        self._move(job.index)

    def handed_out(self, job: _Job) -> None:
        """``job``'s last slice went to an item: it is no longer held here."""
        self._move(job.index + 1)

    def _move(self, at: int) -> None:
        with self._lock:
            self._at = max(self._at, at)
            self._lock.notify_all()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self.join()


def _results_elements(plan: MergePlan, items, jobs: list[_Job]) -> int:
    """Elements of the medians' results alive at once, at most: a key being merged (it may span
    several items) and the next, the keys of a few items in flight (the backend's, and one
    more), and those held ahead (``AHEAD_ELEMENTS``)."""
    medians = [job.numel for job in jobs if job.args is not None and job.args[0].combine == "median"]
    if not medians:
        return 0
    from engine.merge.layout import is_median

    per_item = max(sum(seg.numel for seg in item.segments for ns in seg.nodes if is_median(plan.nodes[ns.node]))
                   for item in items)
    return 2 * max(medians) + 3 * per_item + AHEAD_ELEMENTS


def _first_source(jobs: list[_Job], start: int) -> Source | None:
    """The first source the jobs from ``start`` read whole (trim, DELLA): the base of the
    next that has one, to be fetched while the current job's last model is worked on."""
    for job in jobs[start:start + 1]:
        if job.args is not None and job.args[2] is not None and (job.args[0].trim < 1 or job.args[0].drop_eps != 0):
            return job.args[2]
    return None
