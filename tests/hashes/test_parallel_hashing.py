"""Several files hashed at once: the pool runs files concurrently with callbacks one at a time,
one file at a time in the calling thread where the cores are few, the first error stops the
rest (unless taken), cancel stops all; the catalog gives the same hashes whatever the number of
jobs and stays consistent with concurrent writers (threads of one catalog and two catalogs on
one file); a merge's hashing stage names the files in flight."""

from __future__ import annotations

import threading
import time

import pytest
from merge_support import make_models, recipe_text, sdxl_output

from engine.hashes.catalog import Catalog
from engine.hashes.model import HashCancelled, HashError
from engine.hashes.parallel import HashPool, default_jobs
from engine.library.diagnose import inspect_file
from engine.merge.run import execute
from engine.merge.tuning import Tuning
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint


def test_default_jobs_are_one_per_three_cores():
    assert [default_jobs(c) for c in (1, 2, 3, 5, 16, 64)] == [1, 1, 1, 1, 5, 21]
    assert default_jobs() >= 1


class _Probe:
    """hash_one for the pool: sleeps in steps, reports progress, records how many run at once
    and whether two callbacks ever overlapped."""

    def __init__(self, fail: set[int] = frozenset()):
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.in_callback = False
        self.overlap = False
        self.threads: set[str] = set()
        self.fail = fail

    def __call__(self, item: int, progress, cancel) -> str:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            for step in range(1, 5):
                if cancel.is_set():
                    raise HashCancelled(f"file {item}")
                time.sleep(0.01)
                progress(step * 25, 100)
                if item in self.fail and step == 2:
                    raise HashError(f"file {item}", "unreadable sector")
            return f"hash {item}"
        finally:
            with self.lock:
                self.running -= 1

    def callback(self, *args) -> None:
        if self.in_callback:
            self.overlap = True
        self.in_callback = True
        time.sleep(0.001)
        self.in_callback = False


def _pool(probe: _Probe, items, jobs, **kw) -> tuple[HashPool, dict, list]:
    done: dict = {}
    totals: list = []

    def on_done(item, result):
        probe.callback()
        done[item] = result

    def on_progress(n, total):
        probe.callback()
        totals.append((n, total))

    pool = HashPool(probe, {id(i): 100 for i in items}, jobs, on_progress=on_progress, on_done=on_done,
                    on_file_progress=lambda *a: probe.callback(), **kw)
    return pool, done, totals


def test_files_run_at_once_with_callbacks_one_at_a_time():
    probe = _Probe()
    items = list(range(8))
    pool, done, totals = _pool(probe, items, 3)
    pool.run(items)
    assert done == {i: f"hash {i}" for i in items}
    assert 2 <= probe.most <= 3 and not probe.overlap  # at once, never more than the jobs
    assert totals[-1] == (800, 800) and [n for n, _ in totals] == sorted(n for n, _ in totals)


def test_one_job_hashes_in_the_calling_thread():
    probe = _Probe()
    items = list(range(3))
    pool, done, _ = _pool(probe, items, 1)
    pool.run(items)
    assert probe.threads == {threading.current_thread().name} and probe.most == 1 and len(done) == 3


def test_the_first_error_stops_the_rest_unless_taken():
    probe = _Probe(fail={1})
    items = list(range(12))
    pool, done, _ = _pool(probe, items, 3)
    with pytest.raises(HashError, match="unreadable sector"):
        pool.run(items)
    assert len(done) < 11  # the others stopped early
    taken: list = []
    probe = _Probe(fail={1, 4})
    pool, done, _ = _pool(probe, items, 3, on_error=lambda item, e: taken.append((item, e.reason)))
    pool.run(items)
    assert sorted(taken) == [(1, "unreadable sector"), (4, "unreadable sector")] and len(done) == 10


def test_cancel_stops_every_file():
    cancel = threading.Event()
    probe = _Probe()
    items = list(range(40))
    pool, done, _ = _pool(probe, items, 3, cancel=cancel)
    threading.Timer(0.03, cancel.set).start()
    with pytest.raises(HashCancelled):
        pool.run(items)
    assert len(done) < 40


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel-hash")
    paths = [write_checkpoint(folder / f"m{i}.safetensors", SynthSpec(seed=i, scale=64)) for i in range(5)]
    return [inspect_file(p, f"m{i}") for i, p in enumerate(paths)]


def test_catalog_gives_the_same_hashes_whatever_the_jobs(files, tmp_path):
    results = {}
    for jobs in (1, 3):
        with Catalog(tmp_path / f"c{jobs}.sqlite") as catalog:
            per_file: dict = {}
            results[jobs] = catalog.hash_reports(files, jobs=jobs,
                                                 on_file_progress=lambda r, n, t: per_file.__setitem__(r.model_id, n))
            assert set(per_file) == {r.model_id for r in files}
            assert all(per_file[r.model_id] == r.file_size for r in files)
        with Catalog(tmp_path / f"c{jobs}.sqlite") as catalog:  # stored, and read back equal
            assert {r.model_id: catalog.get(r.path) for r in files} == results[jobs]
    assert results[1] == results[3]


def test_two_catalogs_on_one_file_write_concurrently(files, tmp_path):
    path = tmp_path / "shared.sqlite"
    out: dict = {}
    errors: list = []

    def work(name, reports):
        try:
            with Catalog(path) as catalog:
                out[name] = catalog.hash_reports(reports, jobs=2)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=("a", files)), threading.Thread(target=work, args=("b", files[::-1]))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert out["a"] == out["b"]
    with Catalog(path) as catalog:
        assert {r.model_id: catalog.get(r.path) for r in files} == out["a"]
        assert len(catalog.files()) == len(files)


def test_a_merge_names_the_files_it_is_hashing(tmp_path):
    paths = make_models(tmp_path / "models", 3)
    text = recipe_text({f"m{i}": str(p) for i, p in enumerate(paths)}, {"all": ["m0", "m1", "m2"]},
                       [sdxl_output(str(tmp_path / "o.safetensors"), "all")])
    events: list = []
    execute(build_plan(parse_recipe(text, tmp_path)), on_event=events.append, tuning=Tuning(progress_interval=0.0))
    named = [e.current_key for e in events if e.type == "progress" and e.stage == "hashing" and e.current_key]
    assert named and all(".safetensors" in k and "%" in k for k in named)
    assert {p.name for p in paths} <= {part.split(" ")[0] for k in named for part in k.split(", ")}
