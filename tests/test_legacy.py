"""Importing a run of the original service: a Keras 2 .h5 made with tf-keras, in a tarball served
from loopback, becomes a seeds_tf run that predicts exactly as the original model did."""

import functools
import http.server
import io
import json
import tarfile

import numpy as np
import pytest

from seeds_tf import images, inference, legacy, runs
from seeds_tf.errors import InputError
from tests.loopback import http_server

CLASSES = ["Lens culinaris", "Lens nigricans", "Phaseolus vulgaris"]


@pytest.fixture(scope="module")
def legacy_model():
    """The original architecture in Keras 2 (tf-keras): Xception, pooling, Dense(1024), softmax."""
    import tf_keras

    tf_keras.utils.set_random_seed(3)
    base = tf_keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3))
    x = tf_keras.layers.GlobalAveragePooling2D()(base.output)
    x = tf_keras.layers.Dense(1024, activation="relu")(x)
    outputs = tf_keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    return tf_keras.Model(base.input, outputs)


def _tarball(tmp_path, model, extra_member=None):
    run = tmp_path / "legacy" / "2019-06-01_120000"
    (run / "ckpts").mkdir(parents=True)
    (run / "conf").mkdir()
    (run / "dataset_files").mkdir()
    with pytest.warns(UserWarning, match="legacy"):  # the Keras 2 format is the point here
        model.save(run / "ckpts" / "final_model.h5")
    conf = {"model": {"modelname": "Xception", "image_size": 71, "num_classes": 3, "preprocess_mode": "tf"}}
    (run / "conf" / "conf.json").write_text(json.dumps(conf))
    (run / "dataset_files" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (run / "dataset_files" / "info.txt").write_text("lentil\nblack lentil\ncommon bean\n")
    archive = tmp_path / "seeds.tar.xz"
    with tarfile.open(archive, "w:xz", preset=0) as tar:
        tar.add(run, arcname=run.name)
        if extra_member is not None:
            info = tarfile.TarInfo(extra_member)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return archive


@pytest.fixture
def tarball_server(tmp_path):
    """Serves files of tmp_path over loopback HTTP."""
    with http_server(functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))) as url:
        yield url


def test_a_legacy_run_imports_and_predicts_as_the_original(
    empty_roots, tmp_path, legacy_model, tarball_server
):
    import tf_keras

    _tarball(tmp_path, legacy_model)
    run_id = legacy.import_legacy(f"{tarball_server}/seeds.tar.xz", empty_roots)
    layout = runs.RunLayout(empty_roots.models / run_id)
    assert layout.is_complete()
    assert runs.read_json(layout.summary_file)["imported_from"].endswith("seeds.tar.xz")

    pixels = np.random.default_rng(0).integers(0, 256, (4, 90, 110, 3), dtype=np.uint8)
    batch = np.stack([images.resize(p, 71).numpy() for p in pixels])
    before = legacy_model.predict(tf_keras.applications.xception.preprocess_input(batch.copy()), verbose=0)
    run = inference.load_run(layout)
    after = run.model.predict_on_batch(batch)
    np.testing.assert_allclose(after, before, atol=1e-5)
    assert run.classes == tuple(CLASSES)
    assert run.info == ("lentil", "black lentil", "common bean")


def test_a_tarball_that_escapes_its_folder_is_refused(empty_roots, tmp_path, legacy_model):
    archive = _tarball(tmp_path, legacy_model, extra_member="../../escaped.txt")
    with pytest.raises(InputError, match="not a readable tar archive"):
        legacy.import_legacy(str(archive), empty_roots)
    assert not (tmp_path.parent / "escaped.txt").exists()
    assert runs.complete_runs(empty_roots.models) == []


@pytest.mark.parametrize(
    ("source", "problem"),
    [("/nonexistent/seeds.tar.xz", "is not a file"), ("http://127.0.0.1:9/x.tar", "cannot download")],
)
def test_unreadable_sources_are_named(empty_roots, source, problem):
    with pytest.raises(InputError, match=problem):
        legacy.import_legacy(source, empty_roots)
