"""The report cache: a reopened folder gives the same reports without reading headers, a changed
file is inspected again, and a cache that cannot be used never stops a scan."""

import os
import shutil

from engine.library.report import UNREADABLE
from engine.library.scan import scan


def _same(a, b):
    assert [r.path for r in a] == [r.path for r in b]
    for x, y in zip(a, b):
        assert x == y
        assert list(x.key_map.items()) == list(y.key_map.items())


def test_cached_reports_equal_fresh_ones_for_every_deviation(synth_models):
    folder = next(iter(synth_models.values())).parent
    first = scan([folder])
    cached = scan([folder])
    fresh = scan([folder], use_cache=False)
    _same(cached, fresh)
    _same(first, fresh)


def test_a_cache_hit_reads_no_header_and_a_change_is_seen(tmp_path, demo_folder):
    path = tmp_path / "_x01-model.safetensors"
    shutil.copy(demo_folder / "_x01-AnimagineLike.safetensors", path)
    (good,) = scan([tmp_path])
    st = path.stat()
    # Same size and mtime, header bytes wrecked: only a cache hit can still give the good report.
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    (hit,) = scan([tmp_path])
    assert hit == good
    # A new mtime: inspected again, and the damage is found.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    (again,) = scan([tmp_path])
    assert again.kind == UNREADABLE


def test_an_unusable_cache_never_stops_a_scan(tmp_path, demo_folder, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ASTOLFO_CACHE_DIR", str(blocker / "cache"))
    reports = scan([demo_folder])
    assert len(reports) == 15
    assert reports == scan([demo_folder], use_cache=False)
