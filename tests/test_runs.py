"""Run folders: unique ids, atomic writes, only complete runs offered, no way out of models/."""

import datetime
import os
import zipfile

import pytest
import yaml

from seeds_tf.core import config, files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.prediction import inference
from tests.helpers import TINY_OPTIONS, seed_photo

NOW = datetime.datetime(2026, 11, 21, 12, 0, 0)


def _complete(models, now=NOW):
    """A complete run that passes the listing's checks, with a stand-in for a Keras model file."""
    layout = runs.create_run(models, now)
    runs.write_conf(layout, {"model": {}})
    (layout.dataset_dir / "classes.txt").write_text("Aus aus\nBus bus\n")
    with zipfile.ZipFile(layout.final_model, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", b"")
    runs.mark_complete(layout, metrics={})
    return layout


def test_runs_started_in_the_same_second_get_distinct_ids(tmp_path):
    first = runs.create_run(tmp_path, NOW)
    second = runs.create_run(tmp_path, NOW)
    assert (first.run_id, second.run_id) == ("2026-11-21_120000", "2026-11-21_120001")
    for folder in ("ckpts", "conf", "stats", "logs", "dataset_files", "reports"):
        assert (first.root / folder).is_dir()


def test_only_complete_runs_are_listed_and_the_newest_is_the_default(tmp_path):
    old = _complete(tmp_path, NOW)
    runs.create_run(tmp_path, NOW + datetime.timedelta(hours=1))  # died half-way: no run.json
    (tmp_path / "notes").mkdir()
    assert runs.complete_runs(tmp_path) == [old.run_id]
    assert runs.resolve_run(tmp_path, "").run_id == old.run_id
    newer = _complete(tmp_path, NOW + datetime.timedelta(days=1))
    assert runs.resolve_run(tmp_path, "").run_id == newer.run_id
    assert runs.resolve_run(tmp_path, old.run_id).run_id == old.run_id


@pytest.mark.parametrize("name", ["..", "../models", "/etc", "2026-11-21_120000/../..", "nope", "notes"])
def test_unknown_and_path_like_run_names_are_refused_listing_the_runs(tmp_path, name):
    (tmp_path / "notes").mkdir()
    existing = _complete(tmp_path)
    with pytest.raises(InputError) as raised:
        runs.resolve_run(tmp_path, name)
    assert raised.value.field == "timestamp"
    assert existing.run_id in raised.value.problem


def test_a_link_out_of_models_is_not_a_run(tmp_path):
    models = tmp_path / "models"
    outside = _complete(tmp_path / "elsewhere")
    models.mkdir()
    os.symlink(outside.root, models / outside.run_id)
    assert runs.complete_runs(models) == []
    with pytest.raises(InputError):
        runs.resolve_run(models, outside.run_id)


def test_no_run_at_all_says_to_train_one(tmp_path):
    with pytest.raises(InputError, match="train one first"):
        runs.resolve_run(tmp_path / "models", "")


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "stats" / "stats.json"
    files.write_json(target, {"epochs": [1, 2]})
    files.write_json(target, {"epochs": [1, 2, 3]})
    assert files.read_json(target) == {"epochs": [1, 2, 3]}
    assert os.listdir(target.parent) == ["stats.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "conf.json"
    files.write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        files.write_json(target, {"bad": object()})
    assert files.read_json(target) == {"ok": True}
    assert os.listdir(tmp_path) == ["conf.json"]


def test_data_paths_stay_inside_the_data_folder(tmp_path):
    roots = Roots(data=tmp_path / "data", models=tmp_path / "models")
    (roots.data / "images").mkdir(parents=True)
    os.symlink("/etc", roots.data / "escape")
    assert roots.data_path("images", "images_directory") == roots.data / "images"
    assert roots.data_path(str(roots.data / "images"), "images_directory") == roots.data / "images"
    for bad in ("..", "../models", "/etc", "escape", "images/../../x"):
        with pytest.raises(InputError) as raised:
            roots.data_path(bad, "images_directory")
        assert raised.value.field == "images_directory"


def test_roots_come_from_the_environment(tmp_path):
    env = {"SEEDS_TF_DATA_DIR": str(tmp_path / "d"), "SEEDS_TF_MODELS_DIR": str(tmp_path / "m")}
    assert Roots.from_env(env) == Roots(data=tmp_path / "d", models=tmp_path / "m")


def test_a_write_that_fails_half_way_leaves_the_previous_file_and_no_debris(tmp_path):
    target = tmp_path / "ckpts" / "final.keras"
    files.write_text(target, "version 1")
    with pytest.raises(RuntimeError), files.atomic_path(target) as temporary:
        temporary.write_text("half of version 2")
        raise RuntimeError("killed mid-save")
    assert target.read_text() == "version 1"
    assert os.listdir(target.parent) == ["final.keras"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_an_index_is_complete_only_once_its_references_are_written(tmp_path):
    """The server's metadata judges from the files whether a run's answers use its specimens
    (it loads no TensorFlow): an index cut short before its references.json is no index."""
    layout = runs.RunLayout(tmp_path / "2026-11-30_000000")
    assert not layout.has_index
    layout.index_dir.mkdir(parents=True)
    (layout.index_dir / "embeddings.npy").write_bytes(b"written first")
    assert not layout.has_index
    files.write_json(layout.index_dir / runs.INDEX_REFERENCES, {"paths": [], "labels": []})
    assert layout.has_index


def test_a_run_whose_info_does_not_match_its_classes_is_broken(roots, tiny_run):
    """A missing line in info.txt would give every class after it the next one's description."""
    layout = runs.RunLayout(roots.models / tiny_run)
    info = layout.info_file.read_text().splitlines()
    layout.info_file.write_text("\n".join(info[1:]) + "\n")
    assert runs.list_runs(roots.models).broken == {
        tiny_run: f"dataset_files/info.txt has {len(info) - 1} lines for {len(layout.classes())} classes"
    }


def _limit_image_size(tmp_path, monkeypatch, **limits: int) -> None:
    """A deployment's SEEDS_TF_CONFIG: the shipped options, with image_size's `min` or `max` (px)
    replaced by `limits` and its default moved within them."""
    raw = yaml.safe_load(config.config_path().read_text())
    option = raw["model"]["image_size"]
    option.update(limits)
    option["value"] = min(max(option["value"], option["min"]), option["max"])
    path = tmp_path / "limited.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv(config.CONFIG_ENV, str(path))


def test_a_run_made_under_wider_limits_still_serves_when_a_configuration_tightens_them(
    roots, tiny_run, tmp_path, monkeypatch
):
    """The limits of a configuration file are for new requests: with image_size at least twice the
    tiny run's, a new training at its size is refused, and the tiny run is still listed as working
    and answers."""
    size = TINY_OPTIONS["image_size"]
    _limit_image_size(tmp_path, monkeypatch, min=2 * size)
    with pytest.raises(InputError, match=f"expected >= {2 * size}"):
        config.RunConfig.from_options(image_size=size)
    assert list(runs.list_runs(roots.models).working) == [tiny_run]
    assert runs.RunLayout(roots.models / tiny_run).config().model.image_size == size
    photo = [("a.jpg", seed_photo(roots).read_bytes())]
    answer = inference.predict(roots, inference.RunCache(), config.load(config.PredictConfig), photo)
    assert answer["run_id"] == tiny_run


@pytest.mark.parametrize(
    ("saved", "problem"),
    [
        ({"model": {"image_size": "512"}}, "holds an invalid configuration: image_size: expected a int"),
        ({"model": {"image_size": None}}, "holds an invalid configuration: image_size: expected a int"),
        ({"model": {"size": 512}}, "holds an invalid configuration: size: unknown model option"),
        ({"model": ["Xception"]}, "is not a run's conf/conf.json"),
    ],
)
def test_a_run_whose_configuration_is_malformed_stays_broken_under_any_limits(
    tmp_path, monkeypatch, saved, problem
):
    _limit_image_size(tmp_path, monkeypatch, max=256)
    layout = _complete(tmp_path / "models")
    runs.write_conf(layout, saved)
    broken = runs.list_runs(tmp_path / "models").broken
    assert list(broken) == [layout.run_id]
    assert broken[layout.run_id].startswith(f"conf/conf.json {problem}")
