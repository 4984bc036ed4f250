"""``astolfo hash``: real synthetic files, the real catalog (in the test's cache dir)."""

from __future__ import annotations

import json

import pytest

from astolfo_tui.cli import main
from engine.hashes.hasher import hash_file
from engine.synth.checkpoints import BASE_SEED, SynthSpec, write_checkpoint, write_garbage

SHARED_TE = {"te0": BASE_SEED, "te1": BASE_SEED}


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    write_checkpoint(d / "m1.safetensors", SynthSpec(seed=1, component_seeds=SHARED_TE))
    write_checkpoint(d / "m2.safetensors", SynthSpec(seed=2, component_seeds=SHARED_TE))
    write_checkpoint(d / "m3.safetensors", SynthSpec(seed=3))
    return d


def _lines(capsys) -> list[dict]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


def test_json_lines_carry_the_hashes(folder, capsys):
    assert main(["hash", str(folder), "--json"]) == 0
    rows = _lines(capsys)
    assert [r["id"] for r in rows] == ["m01", "m02", "m03"]
    for row in rows:
        expected = hash_file(row["path"])
        assert row["hashes"] == expected.to_dict()
        assert row["hashes"]["autov2"] == expected.sha256[:10]
        assert row["findings"] == [] and row["error"] is None
    assert rows[0]["groups"] == rows[1]["groups"] == ["te0#1", "te1#1"]
    assert rows[2]["groups"] == []
    assert {r["same_as_reference"] for r in rows} == {None}  # no reference known yet


def test_reference_marks_are_remembered(folder, capsys):
    assert main(["hash", str(folder), "--json", "--reference", "m01"]) == 0
    flags = [r["same_as_reference"] for r in _lines(capsys)]
    assert flags == [True, True, False]
    assert main(["hash", str(folder), "--json"]) == 0  # from the catalog, no --reference
    assert [r["same_as_reference"] for r in _lines(capsys)] == [True, True, False]


def test_reference_outside_the_folders_by_path(folder, tmp_path, capsys):
    ref = write_checkpoint(tmp_path / "base.safetensors", SynthSpec(seed=9, component_seeds=SHARED_TE))
    assert main(["hash", str(folder), "--json", "--reference", str(ref)]) == 0
    rows = _lines(capsys)
    assert [r["id"] for r in rows] == ["m01", "m02", "m03"]  # the reference is not listed
    assert [r["same_as_reference"] for r in rows] == [True, True, False]


def test_nan_and_unreadable_files_exit_1(folder, capsys):
    write_checkpoint(folder / "m4.safetensors", SynthSpec(seed=4, nan_in=("unet",)))
    assert main(["hash", str(folder), "--json"]) == 1
    row = _lines(capsys)[-1]
    assert row["findings"][0]["component"] == "unet" and "NaN" in row["findings"][0]["message"]
    (folder / "m4.safetensors").unlink()
    write_garbage(folder / "m5.safetensors")
    assert main(["hash", str(folder), "--json"]) == 1


def test_usage_errors_exit_2(folder, tmp_path, capsys):
    assert main(["hash", str(tmp_path / "missing")]) == 2
    assert main(["hash", str(folder), "--reference", "nosuchmodel"]) == 2
    assert "nosuchmodel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["hash"])
    assert e.value.code == 2


def test_table(folder, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    write_checkpoint(folder / "m1_fp32.safetensors", SynthSpec(seed=1, component_seeds=SHARED_TE, dtype="F32"))
    write_checkpoint(folder / "m4.safetensors", SynthSpec(seed=4, nan_in=("vae",)))
    assert main(["hash", str(folder), "--reference", "m01"]) == 1
    out = capsys.readouterr().out
    h1 = hash_file(folder / "m1.safetensors")
    assert h1.autov2 in out and h1.components["unet"].exact_short in out
    assert "te0#1: te0 byte-identical in m01, m03; also identical up to fp16 in m02" in out
    assert "unet#1: unet identical up to fp16 in m01, m02" in out
    assert "vae has" in out and "NaN" in out


def test_narrow_terminal_keeps_every_hash_whole(folder, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["hash", str(folder)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    for name in ("m1", "m2", "m3"):
        h = hash_file(folder / f"{name}.safetensors")
        assert h.autov2 in out
        assert all(c.exact_short in out for c in h.components.values())
