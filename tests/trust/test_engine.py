"""Issue 11 (trust in daily use), engine side: the user's recipe is never rewritten, outputs
carry no local paths, outputs are not inputs, ids never drift."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from merge_support import make_models

from engine.checkpoint.format import read_header
from engine.hashes.catalog import Catalog
from engine.jobs import store
from engine.jobs.launch import FINISHED, load_job_recipe, start_job, wait_for_job
from engine.library.ids import IdStore
from engine.library.outputs import busy_outputs, default_output_dir, is_astolfo_output
from engine.library.scan import scan
from engine.merge.run import execute
from engine.plan.planner import build_plan
from engine.recipe.model import ModelEntry
from engine.recipe.toml_file import load_recipe, parse_recipe, save_recipe

USER_RECIPE = """\
# my mix: keep this comment
name = "trust-mix"   # the name
dtype = "fp16"

[models]   # relative to this file
a = "models/m0.safetensors"  # the first
b = "models/m1.safetensors"

[select]
all = ["a", "b"]  # both

[[output]]
path = "out/mix.safetensors"  # written here
unet = "all"
te0 = "all"
te1 = "all"
vae = "all"
"""


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "user"
    make_models(folder / "models", count=2)
    (folder / "r.toml").write_text(USER_RECIPE, "utf-8")
    return folder


# --------------------------------------------------------------------------- the user's recipe


def test_a_detached_job_never_writes_the_recipe_and_keeps_a_pinned_frozen_copy(tmp_path):
    folder = _user_folder(tmp_path)
    with Catalog() as catalog:  # hashed once: the frozen copy pins what the catalog knows
        shas = {m: catalog.hash_file(folder / f"models/{m}.safetensors").sha256 for m in ("m0", "m1")}
    before = (folder / "r.toml").stat().st_mtime_ns
    job = wait_for_job(start_job(folder / "r.toml").id, timeout_s=180)
    assert job.status == FINISHED, job.exit_reason
    assert (folder / "r.toml").read_text("utf-8") == USER_RECIPE
    assert (folder / "r.toml").stat().st_mtime_ns == before
    frozen = load_job_recipe(job)
    assert frozen.models["a"].path == folder / "models/m0.safetensors"  # absolute in the job folder
    assert frozen.models["a"].sha256 == shas["m0"] and frozen.models["b"].sha256 == shas["m1"]
    assert (folder / "out/mix.safetensors").exists()


def test_a_job_started_from_a_recipe_object_writes_no_recipe_file(tmp_path):
    folder = _user_folder(tmp_path)
    (folder / "r.toml").unlink()
    recipe = parse_recipe(USER_RECIPE, folder)
    job = wait_for_job(start_job(recipe, pins={"a": "0" * 64}).id, timeout_s=180)
    assert sorted(p.name for p in folder.iterdir()) == ["models"]  # no recipe, and the pin refused it
    said = (job.exit_reason or "") + (job.dir / "job.log").read_text()
    assert job.status != FINISHED and "replaced or renamed" in said
    assert load_job_recipe(job).models["a"].sha256 == "0" * 64


def test_saving_over_the_users_file_keeps_comments_layout_and_relative_paths(tmp_path):
    folder = _user_folder(tmp_path)
    recipe = load_recipe(folder / "r.toml")
    assert recipe.models["a"].path == Path("models/m0.safetensors")
    # what the app holds: absolute paths from the scan, a pin from hashing, one more model
    recipe.models = {m: ModelEntry(m, folder / e.path, e.sha256) for m, e in recipe.models.items()}
    recipe.models["c"] = ModelEntry("c", folder / "models/m2.safetensors", "abcdef1234")
    recipe.select["all"] = ["a", "c"]
    del recipe.models["b"]  # the app lists only the models a selection uses
    recipe.name = "trust-mix-2"
    save_recipe(recipe, folder / "r.toml", original=USER_RECIPE)
    text = (folder / "r.toml").read_text("utf-8")
    for kept in ("# my mix: keep this comment", 'name = "trust-mix-2"   # the name',
                 "[models]   # relative to this file",
                 'a = "models/m0.safetensors"  # the first', 'all = ["a", "c"]  # both',
                 'path = "out/mix.safetensors"  # written here'):
        assert kept in text, kept
    assert str(folder) not in text and "b =" not in text
    again = load_recipe(folder / "r.toml")
    assert again.model_path("c") == folder / "models/m2.safetensors" and again.models["c"].sha256 == "abcdef1234"


def test_a_new_recipe_file_gets_relative_paths(tmp_path):
    folder = _user_folder(tmp_path)
    recipe = parse_recipe(USER_RECIPE, folder)
    recipe.models = {m: ModelEntry(m, folder / e.path) for m, e in recipe.models.items()}
    recipe.outputs[0].path = tmp_path / "mixes/mix.safetensors"
    save_recipe(recipe, folder / "new.toml")
    text = (folder / "new.toml").read_text("utf-8")
    assert str(tmp_path) not in text and '"../mixes/mix.safetensors"' in text
    assert load_recipe(folder / "new.toml").output_path(recipe.outputs[0]) == tmp_path / "mixes/mix.safetensors"


# --------------------------------------------------------------------------- output metadata


def test_the_same_recipe_in_two_folders_writes_the_same_bytes_and_no_paths(tmp_path):
    first = _user_folder(tmp_path / "alice")
    second = tmp_path / "home" / "bob" / "elsewhere"
    shutil.copytree(first, second)
    outputs = []
    for folder, device in ((first, "auto"), (second, "cpu")):
        recipe = load_recipe(folder / "r.toml")
        recipe.device = device  # how it is run is not what it is
        execute(build_plan(recipe), on_event=lambda e: None)
        outputs.append(folder / "out/mix.safetensors")
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    meta = read_header(outputs[0]).metadata
    text = json.dumps(meta)
    assert str(tmp_path) not in text and "device" not in meta["astolfo.recipe"]
    stored = parse_recipe(meta["astolfo.recipe"], tmp_path)
    assert stored.models["a"].path == Path("m0.safetensors") and len(stored.models["a"].sha256) == 64


# --------------------------------------------------------------------------- outputs are not inputs


def test_outputs_are_recognised_and_default_outside_every_scanned_folder(tmp_path):
    folder = _user_folder(tmp_path)
    out = default_output_dir([folder / "models"])
    assert out == folder / "mixes"
    assert not str(out).startswith(str(folder / "models") + os.sep)
    assert default_output_dir([folder / "models", folder]) != folder / "mixes"  # inside an opened folder
    assert default_output_dir([folder], configured=tmp_path / "x") == tmp_path / "x"
    recipe = load_recipe(folder / "r.toml")
    execute(build_plan(recipe), on_event=lambda e: None)
    reports = {r.path.name: r for r in scan([folder])}
    assert reports["mix.safetensors"].is_astolfo_output
    assert not reports["m0.safetensors"].is_astolfo_output
    assert not is_astolfo_output({"modelspec.title": "x"})


def test_files_a_live_job_writes_are_never_scanned(tmp_path):
    folder = _user_folder(tmp_path)
    target = folder / "models" / "busy.safetensors"
    shutil.copy(folder / "models/m0.safetensors", target)
    (folder / "models" / "other.safetensors.partial").write_bytes(b"half")
    job_id, job_dir = store.create_job_dir()
    fds = store.acquire_locks(job_id, job_dir, [target])  # what a live job's runner holds
    try:
        assert os.path.realpath(target) in busy_outputs()
        names = [r.path.name for r in scan([folder / "models"])]
        assert names == ["m0.safetensors", "m1.safetensors"]
    finally:
        store.release_locks(fds)
    assert os.path.realpath(target) not in busy_outputs()


# --------------------------------------------------------------------------- ids


def _ids(folder: Path) -> dict[str, str]:
    return {r.path.name: r.model_id for r in scan([folder])}


def test_adding_a_file_does_not_move_ids(tmp_path, synth_models):
    folder = tmp_path / "lib"
    folder.mkdir()
    for name in ("animagine", "pony"):
        shutil.copy(synth_models["clean"], folder / f"{name}.safetensors")
    first = _ids(folder)
    assert first == {"animagine.safetensors": "m01", "pony.safetensors": "m02"}
    shutil.copy(synth_models["clean2"], folder / "kohaku.safetensors")  # sorts between them
    again = _ids(folder)
    assert again["pony.safetensors"] == "m02" and again["animagine.safetensors"] == "m01"
    assert again["kohaku.safetensors"] == "m03"


def test_an_id_follows_a_rename_and_a_hashed_move(tmp_path, synth_models):
    folder = tmp_path / "lib"
    folder.mkdir()
    shutil.copy(synth_models["clean"], folder / "a.safetensors")
    shutil.copy(synth_models["clean2"], folder / "b.safetensors")
    assert _ids(folder) == {"a.safetensors": "m01", "b.safetensors": "m02"}
    os.rename(folder / "b.safetensors", folder / "0-b-renamed.safetensors")  # same inode
    assert _ids(folder) == {"0-b-renamed.safetensors": "m02", "a.safetensors": "m01"}
    with Catalog() as catalog:
        catalog.hash_file(folder / "a.safetensors")
    shutil.copyfile(folder / "a.safetensors", folder / "z.safetensors")  # a copy elsewhere: new inode
    (folder / "a.safetensors").unlink()
    assert _ids(folder)["z.safetensors"] == "m03"  # first sight, before hashing
    with Catalog() as catalog:
        catalog.hash_file(folder / "z.safetensors")  # same SHA256 as the gone a.safetensors
    assert _ids(folder) == {"0-b-renamed.safetensors": "m02", "z.safetensors": "m01"}
    shutil.copy(synth_models["base"], folder / "c.safetensors")
    assert _ids(folder)["c.safetensors"] == "m04"  # m03 was given once: never again


def test_ids_fall_back_to_positions_without_a_store(tmp_path):
    from engine.library.scan import assign_ids

    assert assign_ids([tmp_path / "b.safetensors", tmp_path / "_x01-a.safetensors"]) == ["m01", "_x01"]
    with IdStore(tmp_path / "ids.sqlite3") as ids:
        assert assign_ids([tmp_path / "q.safetensors"], ids) == ["m01"]
        assert assign_ids([tmp_path / "p.safetensors", tmp_path / "q.safetensors"], ids) == ["m02", "m01"]


def test_the_demo_writes_outputs_beside_its_folder_and_upgrades_its_old_recipe(tmp_path):
    from engine.synth.demo import RECIPE, make_demo_folder

    folder = tmp_path / "demo"
    make_demo_folder(folder)
    recipe = load_recipe(folder / RECIPE)
    assert all(recipe.output_path(o).resolve().parent == tmp_path / "mixes" for o in recipe.outputs)
    old = (folder / RECIPE).read_text("utf-8").replace('path = "../mixes/', 'path = "out/')
    (folder / RECIPE).write_text(old, "utf-8")  # what an earlier astolfo wrote, untouched
    make_demo_folder(folder)
    assert '"../mixes/' in (folder / RECIPE).read_text("utf-8")
    (folder / RECIPE).write_text("# mine\n" + old, "utf-8")  # edited by the user: kept
    make_demo_folder(folder)
    assert (folder / RECIPE).read_text("utf-8").startswith("# mine\n")


def test_the_notation_export_carries_a_legend_that_reads_back():
    from engine.recipe.notation import format_legend, format_notation, parse_notation

    ids = ["_x01", "m02", "_x03"]
    text = format_notation(ids, {"unet": ["_x01", "m02"]}) + format_legend(
        [("_x01", "_x01-Animagine.safetensors", "5bd3b4a4c7"), ("m02", "pony.safetensors", None)])
    assert "# 01   _x01-Animagine.safetensors  AutoV2 5bd3b4a4c7" in text  # ids padded to one width
    assert "# m02  pony.safetensors  (not hashed yet)" in text
    assert parse_notation(text, ids) == {"unet": ["_x01", "m02"]}
