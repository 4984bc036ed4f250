"""Finding files, their order and ids, scanning a mixed folder, the demo folder, and the
`astolfo scan` / `astolfo demo` / `astolfo DIR` commands (real files, real CLI)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import unicodedata

import pytest

from astolfo_tui.cli import main
from engine.library.report import CHECKPOINT, LORA, UNREADABLE, Severity
from engine.library.scan import article_id, assign_ids, find_model_files, natural_key, scan
from engine.synth import checkpoints as synth
from engine.synth.checkpoints import SynthSpec
from engine.synth.demo import DEMO_MODELS, make_demo_folder

# --------------------------------------------------------------------------- natural order


def test_natural_key_compares_numbers_as_numbers_and_ignores_case():
    names = ["m10.safetensors", "M2.safetensors", "m1.safetensors", "m02.safetensors", "a.safetensors", "B.safetensors"]
    expected = [
        "a.safetensors",
        "B.safetensors",
        "m1.safetensors",
        "M2.safetensors",
        "m02.safetensors",
        "m10.safetensors",
    ]
    for seed in range(5):
        shuffled = names[:]
        random.Random(seed).shuffle(shuffled)
        assert sorted(shuffled, key=natural_key) == expected


def test_natural_key_is_a_total_order_even_for_names_that_differ_only_in_case_or_zeros():
    names = ["x1", "x01", "X1", "x001", "x1a", "x1A"]
    orders = {tuple(sorted(random.Random(s).sample(names, len(names)), key=natural_key)) for s in range(10)}
    assert len(orders) == 1


def test_natural_key_treats_composed_and_decomposed_unicode_alike():
    composed = unicodedata.normalize("NFC", "café2")
    decomposed = unicodedata.normalize("NFD", "café10")
    assert natural_key(composed) < natural_key(decomposed)
    assert natural_key(unicodedata.normalize("NFD", "café")) == natural_key(unicodedata.normalize("NFC", "café"))


def test_natural_key_handles_digits_next_to_text_and_non_ascii_digits():
    assert sorted(["v1.10", "v1.9", "v1.9a", "v²"], key=natural_key) == ["v1.9", "v1.9a", "v1.10", "v²"]


# --------------------------------------------------------------------------- finding files


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_model_files_walks_folders_in_natural_order_and_skips_what_it_should(tmp_path):
    root = tmp_path / "models"
    for rel in [
        "m10.safetensors",
        "m2.safetensors",
        "sub10/a.safetensors",
        "sub2/b.sft",
        "sub2/c.CKPT",
        "old.pt",
        "old.pth",
        "diffusion_pytorch_model.bin",
        "notes.txt",
        "preview.png",
        ".hidden.safetensors",
        ".cache/x.safetensors",
        "out.safetensors.partial",
    ]:
        _touch(root / rel)
    found = [p.relative_to(root).as_posix() for p in find_model_files([root])]
    assert found == [
        "diffusion_pytorch_model.bin",
        "m2.safetensors",
        "m10.safetensors",
        "old.pt",
        "old.pth",
        "sub2/b.sft",
        "sub2/c.CKPT",
        "sub10/a.safetensors",
    ]


def test_find_model_files_keeps_argument_order_named_files_and_lists_each_file_once(tmp_path):
    a = _touch(tmp_path / "a" / "x2.safetensors")
    b = _touch(tmp_path / "b" / "x1.safetensors")
    note = _touch(tmp_path / "b" / "readme.txt")
    found = find_model_files([tmp_path / "b", tmp_path / "a", a, note])
    assert found == [b, a, note]


def test_find_model_files_names_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        find_model_files([tmp_path / "nope"])


def test_order_does_not_depend_on_creation_order(tmp_path):
    names = [f"model {i}.safetensors" for i in (3, 20, 1, 100, 7)]
    orders = []
    for attempt in range(2):
        folder = tmp_path / f"f{attempt}"
        for name in names if attempt == 0 else reversed(names):
            _touch(folder / name)
        orders.append([p.name for p in find_model_files([folder])])
    assert orders[0] == orders[1] == [f"model {i}.safetensors" for i in (1, 3, 7, 20, 100)]


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "name, expected",
    [
        ("_x01-AnimagineXL.safetensors", "_x01"),
        ("x39a-AstolfoMix.safetensors", "x39a"),
        ("_x25.safetensors", "_x25"),
        ("x01te1-AstolfoMix-_x01_x02.safetensors", "x01te1"),
        ("_x17_x18.safetensors", "_x17"),
        ("xylophone.safetensors", None),
        ("animagine-x01.safetensors", None),
        ("x1000 big.safetensors", "x1000"),
    ],
)
def test_article_ids(name, expected):
    assert article_id(name) == expected


def test_ids_are_article_prefixes_or_positions_and_unique(tmp_path):
    names = ["_x01-a.safetensors", "plain.safetensors", "_x01-b.safetensors", "x39a-c.safetensors", "other.safetensors"]
    assert assign_ids([tmp_path / n for n in names]) == ["_x01", "m02", "_x01-2", "x39a", "m05"]


def test_position_ids_widen_past_99_files(tmp_path):
    ids = assign_ids([tmp_path / f"f{i}.safetensors" for i in range(120)])
    assert ids[0] == "m001" and ids[-1] == "m120" and len(set(ids)) == 120


# --------------------------------------------------------------------------- scanning


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, synth_models):
    """A folder as users have them: checkpoints, a LoRA, a pickle, a broken download, in subfolders."""
    root = tmp_path_factory.mktemp("mixed")
    layout = {
        "_x10-Clean.safetensors": "clean",
        "_x2-SD15.safetensors": "sd15",
        "loras/detail.safetensors": "lora",
        "broken/_x03-Truncated.safetensors": "truncated",
        "_x01-NoVAE.safetensors": "no_vae",
    }
    for rel, name in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_models[name], root / rel)
    (root / "old.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    (root / "readme.txt").write_text("not a model")
    return root


def test_scan_reports_every_file_in_order_with_ids(mixed_folder):
    reports = scan([mixed_folder])
    got = [(r.model_id, r.path.relative_to(mixed_folder).as_posix(), r.kind) for r in reports]
    assert got == [
        ("_x01", "_x01-NoVAE.safetensors", CHECKPOINT),
        ("_x2", "_x2-SD15.safetensors", CHECKPOINT),
        ("_x10", "_x10-Clean.safetensors", CHECKPOINT),
        ("_x03", "broken/_x03-Truncated.safetensors", UNREADABLE),
        ("m01", "loras/detail.safetensors", LORA),  # first sight (engine.library.ids)
        ("m02", "old.ckpt", "pickle"),
    ]
    assert reports[1].arch == "sd15" and reports[2].arch == "sdxl"


def test_scan_of_the_demo_folder(demo_folder):
    reports = scan([demo_folder])
    assert [r.file_name for r in reports] == [m.name for m in DEMO_MODELS]
    assert [r.model_id for r in reports] == [f"_x{i:02d}" for i in range(len(DEMO_MODELS))]
    by_id = {r.model_id: r for r in reports}
    assert by_id["_x00"].severity == Severity.OK and by_id["_x00"].arch_label == "SDXL 1.0 (1/32 scale)"
    assert by_id["_x12"].kind == LORA
    assert by_id["_x13"].kind == UNREADABLE
    every_code = {f.code for r in reports for f in r.all_findings}
    assert {
        "position_ids_missing",
        "position_ids_corrupted",
        "pruned_last_layer",
        "nai_clip_keys",
        "component_missing",
        "json_metadata",
        "storage_dtype",
        "scaled_fp8",
        "lora_file",
        "unreadable",
    } <= every_code
    clean = [r for r in reports if r.kind == CHECKPOINT and r.severity == Severity.OK]
    assert len(clean) >= 4


def test_demo_folder_is_idempotent_and_repairs_itself(tmp_path):
    folder = tmp_path / "demo"
    paths = make_demo_folder(folder)
    assert [p.name for p in paths] == [m.name for m in DEMO_MODELS]
    stamps = {p.name: p.stat().st_mtime_ns for p in paths}
    base_bytes = paths[0].read_bytes()

    paths[1].unlink()
    with open(paths[2], "ab") as f:
        f.write(b"junk")
    again = make_demo_folder(folder)
    assert again == paths
    assert paths[0].stat().st_mtime_ns == stamps[paths[0].name]  # untouched
    assert paths[0].read_bytes() == base_bytes
    assert paths[1].exists()
    assert scan([paths[2]])[0].severity == Severity.OK  # rewritten whole
    assert not [p for p in folder.iterdir() if p.name.endswith((".partial", ".tmp"))]


def test_demo_models_share_base_text_encoders_exactly(demo_folder):
    from engine.checkpoint.reader import TensorReader

    key = "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight"
    unet_key = "model.diffusion_model.out.2.weight"
    with (
        TensorReader(demo_folder / "_x00-SDXL-Base.safetensors") as base,
        TensorReader(demo_folder / "_x03-BaseClipTune.safetensors") as same,
        TensorReader(demo_folder / "_x01-AnimagineLike.safetensors") as other,
    ):
        assert base.read_bytes(key) == same.read_bytes(key)
        assert base.read_bytes(key) != other.read_bytes(key)
        assert base.read_bytes(unet_key) != same.read_bytes(unet_key)


# --------------------------------------------------------------------------- the commands


def test_scan_command_exit_codes(mixed_folder, tmp_path, synth_models, capsys):
    assert main(["scan", str(mixed_folder)]) == 1  # truncated file, LoRA, pickle, no VAE
    out = capsys.readouterr().out
    assert "_x10" in out and "6 files" in out and "with errors" in out

    fine = tmp_path / "fine"
    fine.mkdir()
    shutil.copy(synth_models["clean"], fine / "a.safetensors")
    shutil.copy(synth_models["position_ids_missing"], fine / "b.safetensors")  # a warning is fine
    assert main(["scan", str(fine)]) == 0
    assert "position_ids missing" in capsys.readouterr().out

    assert main(["scan", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["scan"])
    assert exit_info.value.code == 2


def test_scan_command_json_lines(mixed_folder, capsys):
    assert main(["scan", "--json", str(mixed_folder)]) == 1
    lines = capsys.readouterr().out.splitlines()
    objects = [json.loads(line) for line in lines]
    assert [o["id"] for o in objects] == ["_x01", "_x2", "_x10", "_x03", "m01", "m02"]
    assert objects[0]["components"]["vae"]["state"] == "absent"
    assert objects[2]["arch_label"] == "SDXL 1.0 (1/32 scale)"
    assert objects[3]["kind"] == "unreadable" and objects[3]["severity"] == "error"


def test_scan_command_on_an_empty_folder(tmp_path, capsys):
    assert main(["scan", str(tmp_path)]) == 0
    assert "no model files" in capsys.readouterr().out


def test_scan_subprocess_wide_and_piped(mixed_folder):
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "astolfo_tui", "scan", str(mixed_folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "this is a LoRA" in done.stdout and "never unpickles" in done.stdout
    assert "Traceback" not in done.stderr


def test_demo_and_open_print_the_scan_without_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASTOLFO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ASTOLFO_CONFIG_DIR", str(tmp_path / "config"))
    assert main(["demo"]) == 0
    folder = tmp_path / "data" / "demo"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(m.name for m in DEMO_MODELS)
    assert "_x13" in capsys.readouterr().out

    other = tmp_path / "elsewhere"
    assert main(["demo", "--dir", str(other)]) == 0
    assert (other / DEMO_MODELS[0].name).exists()
    capsys.readouterr()

    assert main([str(folder)]) == 0
    assert "_x00" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 2


def test_scan_handles_a_file_that_vanishes_midway(tmp_path):
    a = synth.write_checkpoint(tmp_path / "a.safetensors", SynthSpec(scale=64, seed=1))
    files = find_model_files([tmp_path])
    a.unlink()
    from engine.library.diagnose import inspect_file

    report = inspect_file(files[0], "m01")
    assert report.kind == UNREADABLE and report.model_id == "m01"
