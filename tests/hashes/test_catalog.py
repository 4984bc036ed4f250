"""engine.hashes.catalog: the SQLite hash cache on real files, and the relations computed from hashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.checkpoint.format import read_header
from engine.hashes.catalog import CACHE_DIR_ENV, SDXL_BASE_SHA256, Catalog, CatalogError, default_catalog_path
from engine.hashes.hasher import hash_file
from engine.hashes.model import HashCancelled
from engine.hashes.relations import component_groups, group_labels, same_as_reference, selection_duplicates
from engine.library.scan import scan
from engine.synth.checkpoints import BASE_SEED, SynthSpec, write_checkpoint

SHARED_TE = {"te0": BASE_SEED, "te1": BASE_SEED}


@pytest.fixture
def catalog(tmp_path):
    with Catalog(tmp_path / "cat" / "catalog.sqlite3") as c:
        yield c


def _consistent(db_path: Path) -> dict[str, dict]:
    """Check the database the way a reader would and return path -> stored hashes dict."""
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {p: json.loads(d) for p, d in db.execute("SELECT path, data FROM files")}
        comps: dict[str, dict] = {}
        for path, cid, exact, fp16, metric, nan, inf in db.execute("SELECT * FROM components"):
            comps.setdefault(path, {})[cid] = (exact, fp16, metric, nan, inf)
    finally:
        db.close()
    assert set(comps) <= set(rows)
    for path, data in rows.items():
        stored = {
            cid: (c["exact"], c["fp16"], c["metric"], c["nan_count"], c["inf_count"])
            for cid, c in data["components"].items()
        }
        assert comps.get(path, {}) == stored, path
    return rows


# --------------------------------------------------------------------------- location


def test_default_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert default_catalog_path() == tmp_path / "elsewhere" / "catalog.sqlite3"
    with Catalog() as c:
        assert c.path == tmp_path / "elsewhere" / "catalog.sqlite3"
        assert c.path.exists()


def test_wal_mode(catalog):
    db = sqlite3.connect(catalog.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_unreadable_database_is_set_aside(tmp_path):
    path = tmp_path / "catalog.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with Catalog(path) as c:
        assert c.recovered_from is not None and c.recovered_from.read_bytes().startswith(b"this is not")
        assert c.files() == {}


def test_newer_schema_is_left_alone(tmp_path):
    path = tmp_path / "catalog.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(CatalogError, match="newer astolfo"):
        Catalog(path)
    assert path.exists()


def test_locked_catalog_is_an_error_not_a_reset(tmp_path, monkeypatch):
    path = tmp_path / "catalog.sqlite3"
    Catalog(path).close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("PRAGMA journal_mode=DELETE")
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        monkeypatch.setattr("engine.hashes.catalog._BUSY_TIMEOUT_S", 0.1)
        with pytest.raises(CatalogError, match="catalog.sqlite3"):
            Catalog(path)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not list(tmp_path.glob("*.unreadable-*"))


# --------------------------------------------------------------------------- cache behaviour


def test_cache_hit_reads_no_tensor_data(tmp_path, catalog):
    """Overwrite the data section in place with same-size garbage and restore mtime: size,
    mtime and inode are unchanged, so the catalog must return the old result without reading."""
    path = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=1))
    first = catalog.hash_file(path)
    st = os.stat(path)
    start = read_header(path).data_start
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(os.urandom(st.st_size - start))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_ino == st.st_ino
    assert hash_file(path).sha256 != first.sha256  # the bytes really changed
    assert catalog.get(path) == first
    assert catalog.hash_file(path) == first

    seen, progress = [], []
    reports = scan([tmp_path])
    out = catalog.hash_reports(
        reports, on_progress=lambda d, t: progress.append((d, t)), on_file=lambda r, c: seen.append(c)
    )
    assert out[reports[0].model_id] == first
    assert seen == [True]
    assert progress == [(0, 0)]  # nothing to read


def test_changed_file_is_rehashed(tmp_path, catalog):
    path = tmp_path / "a.safetensors"
    write_checkpoint(path, SynthSpec(seed=1))
    first = catalog.hash_file(path)
    time.sleep(0.01)
    write_checkpoint(path, SynthSpec(seed=2))
    assert catalog.get(path) is None
    second = catalog.hash_file(path)
    assert second != first
    assert second == hash_file(path)
    assert catalog.get(path) == second


def test_touched_or_replaced_file_is_rehashed(tmp_path, catalog):
    path = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=1))
    first = catalog.hash_file(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert catalog.get(path) is None
    assert catalog.hash_file(path) == first
    # a new inode with the same size and mtime (a copy renamed over it) is a new file too
    st = os.stat(path)
    copy = shutil.copy(path, tmp_path / "copy.tmp")
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(copy, path)
    assert catalog.get(path) is None


def test_other_hash_version_is_not_trusted(tmp_path, catalog):
    path = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=1))
    catalog.hash_file(path)
    db = sqlite3.connect(catalog.path)
    db.execute("UPDATE files SET hash_version = hash_version - 1")
    db.commit()
    db.close()
    assert catalog.get(path) is None


def test_hash_reports_hashes_misses_and_reports_errors(tmp_path, catalog):
    for i in range(3):
        write_checkpoint(tmp_path / f"m{i}.safetensors", SynthSpec(seed=i))
    reports = scan([tmp_path])
    catalog.hash_file(reports[0].path)
    os.unlink(reports[2].path)
    errors, files, progress = [], [], []
    out = catalog.hash_reports(
        reports,
        on_progress=lambda d, t: progress.append((d, t)),
        on_error=lambda r, msg: errors.append((r.model_id, msg)),
        on_file=lambda r, cached: files.append((r.model_id, cached)),
    )
    ids = [r.model_id for r in reports]
    assert set(out) == set(ids[:2])
    assert out[ids[1]] == hash_file(reports[1].path)
    assert [e[0] for e in errors] == [ids[2]]
    assert files == [(ids[0], True), (ids[1], False), (ids[2], False)]
    size = reports[1].path.stat().st_size
    assert progress[-1] == (size, size)
    _consistent(catalog.path)


def test_cancel_leaves_finished_files_stored(tmp_path, catalog):
    import threading

    for i in range(2):
        write_checkpoint(tmp_path / f"m{i}.safetensors", SynthSpec(seed=i))
    reports = scan([tmp_path])
    cancel = threading.Event()

    def on_file(report, cached):
        if report is reports[1]:
            cancel.set()

    with pytest.raises(HashCancelled):
        catalog.hash_reports(reports, cancel=cancel, on_file=on_file)
    assert catalog.get(reports[0].path) is not None
    assert catalog.get(reports[1].path) is None


# --------------------------------------------------------------------------- interruption

_HASHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from engine.hashes.catalog import Catalog, file_key
    from engine.library.scan import scan

    catalog = Catalog(Path(sys.argv[1]))
    reports = scan([sys.argv[2]])
    mode = sys.argv[3]

    def progress(done, total):
        if mode == "mid" and done > reports[0].file_size:
            print("MID", flush=True)
            time.sleep(60)

    if mode == "mid":
        catalog.hash_reports(reports, on_progress=progress)
    else:  # store results as fast as possible, over and over
        hashes = [catalog.hash_file(r.path, r) for r in reports]
        print("LOOP", flush=True)
        while True:
            for r, h in zip(reports, hashes):
                catalog.put(file_key(r.path), h)
    """
)


def _start(tmp_path, folder, mode):
    return subprocess.Popen(
        [sys.executable, "-c", _HASHER, str(tmp_path / "cat.sqlite3"), str(folder), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_killed_while_hashing_leaves_a_consistent_catalog(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(3):
        write_checkpoint(folder / f"m{i}.safetensors", SynthSpec(seed=i, scale=16))
    proc = _start(tmp_path, folder, "mid")
    try:
        assert proc.stdout.readline().strip() == "MID", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    rows = _consistent(tmp_path / "cat.sqlite3")
    files = sorted(folder.iterdir())
    assert sorted(rows) == [str(files[0])]  # the first file done, the second cut off
    with Catalog(tmp_path / "cat.sqlite3") as c:
        assert c.get(files[0]) == hash_file(files[0])
        assert c.get(files[1]) is None
        assert c.hash_file(files[1]) == hash_file(files[1])  # picks up where it was killed


def test_killed_while_committing_leaves_a_consistent_catalog(tmp_path):
    """Kill a process that does nothing but commit, at several moments, while this process
    reads: readers never wait or fail, and every row stays complete."""
    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(3):
        write_checkpoint(folder / f"m{i}.safetensors", SynthSpec(seed=i, scale=64, nan_in=("vae",) if i else ()))
    expected = {str(p): hash_file(p) for p in folder.iterdir()}
    for delay in (0.05, 0.13, 0.31):
        proc = _start(tmp_path, folder, "loop")
        try:
            assert proc.stdout.readline().strip() == "LOOP", proc.stderr.read()
            end = time.monotonic() + delay
            with Catalog(tmp_path / "cat.sqlite3") as reader:
                while time.monotonic() < end:
                    for path, h in expected.items():
                        assert reader.get(path) == h
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
        rows = _consistent(tmp_path / "cat.sqlite3")
        assert set(rows) == set(expected)
        with Catalog(tmp_path / "cat.sqlite3") as c:
            for path, h in expected.items():
                assert c.get(path) == h


# --------------------------------------------------------------------------- relations


@pytest.fixture
def family(tmp_path, catalog):
    """a and b share base text encoders, a32 is a's fp32 copy, c is different everywhere."""
    specs = {
        "a": SynthSpec(seed=1, component_seeds=SHARED_TE),
        "b": SynthSpec(seed=2, component_seeds=SHARED_TE),
        "a32": SynthSpec(seed=1, component_seeds=SHARED_TE, dtype="F32"),
        "c": SynthSpec(seed=3),
    }
    return {name: catalog.hash_file(write_checkpoint(tmp_path / f"{name}.safetensors", s)) for name, s in specs.items()}


def test_component_groups(family):
    exact = {(g.component, g.model_ids) for g in component_groups(family, "exact")}
    assert exact == {("te0", ("a", "b")), ("te1", ("a", "b"))}
    fp16 = {(g.component, g.model_ids) for g in component_groups(family, "fp16")}
    assert fp16 == {
        ("te0", ("a", "b", "a32")),
        ("te1", ("a", "b", "a32")),
        ("unet", ("a", "a32")),
        ("vae", ("a", "a32")),
    }
    labels = group_labels(component_groups(family, "exact"))
    assert labels == {"a": ["te0#1", "te1#1"], "b": ["te0#1", "te1#1"]}
    with pytest.raises(ValueError):
        component_groups(family, "sha1")


def test_same_as_reference_by_user_mark(family, catalog):
    assert SDXL_BASE_SHA256 == "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"
    assert catalog.reference_sha256s() == {SDXL_BASE_SHA256}
    assert catalog.reference_hashes() == []  # SDXL base was never catalogued here
    assert set(same_as_reference(family, catalog.reference_hashes()).values()) == {None}

    catalog.mark_reference(family["b"].sha256, "my base")
    assert catalog.marked_references() == {family["b"].sha256: "my base"}
    refs = catalog.reference_hashes()
    assert refs == [family["b"]]
    assert same_as_reference(family, refs) == {"a": True, "b": True, "a32": True, "c": False}
    catalog.unmark_reference(family["b"].sha256)
    assert catalog.reference_hashes() == []


def test_same_as_reference_needs_both_text_encoders(family):
    only_te0 = dict(family["c"].components)
    only_te0["te0"] = family["a"].components["te0"]
    mixed = dict(family, m=type(family["c"])(sha256="0" * 64, autov1="0" * 8, autov3=None, components=only_te0))
    flags = same_as_reference(mixed, [family["a"]])
    assert flags["m"] is False and flags["b"] is True


def test_reference_found_in_catalog_when_not_in_the_folder(tmp_path, catalog, family):
    catalog.mark_reference(family["a"].sha256)
    os.unlink(tmp_path / "a.safetensors")  # the reference is known by its stored hashes
    others = {k: v for k, v in family.items() if k != "a"}
    assert same_as_reference(others, catalog.reference_hashes()) == {"b": True, "a32": True, "c": False}


def test_selection_duplicates(family):
    warnings = selection_duplicates(
        {"unet": ["a", "a32", "c"], "te0": ["a", "b", "c"], "vae": ["a", "b"], "nsfw": ["c", "nothashed"]},
        {"unet": "unet", "te0": "te0", "vae": "vae", "nsfw": "unet"},
        family,
    )
    got = {(w.selection, w.component, w.model_ids, w.exact) for w in warnings}
    assert got == {("unet", "unet", ("a", "a32"), False), ("te0", "te0", ("a", "b"), True)}
    msg = next(w.message for w in warnings if w.selection == "unet")
    assert "a, a32" in msg and "up to fp16" in msg


def test_read_only_catalog_reads_and_refuses_writes_clearly(tmp_path, catalog):
    a = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=1))
    b = write_checkpoint(tmp_path / "b.safetensors", SynthSpec(seed=2))
    stored = catalog.hash_file(a)
    with Catalog(catalog.path, read_only=True) as reader:
        assert reader.get(a) == stored
        with pytest.raises(CatalogError, match="cannot store the hashes of .*b.safetensors"):
            reader.hash_file(b)
        with pytest.raises(CatalogError, match="cannot write"):
            reader.mark_reference("ab" * 32)
    with pytest.raises(CatalogError, match="cannot read"):
        Catalog(tmp_path / "absent.sqlite3", read_only=True)
