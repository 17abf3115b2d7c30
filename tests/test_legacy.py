"""Importing a run of the original service: a Keras 2 .h5 (tests.helpers.save_keras2_h5), in a
tarball served from loopback, becomes a seeds_tf run that predicts exactly as the original model did."""

import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import keras
import ml_dtypes
import numpy as np
import pytest

from seeds_tf.core import files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV
from seeds_tf.data import pipeline
from seeds_tf.learning import legacy
from seeds_tf.prediction import inference
from tests.helpers import encode, save_keras2_h5
from tests.loopback import http_server

ROOT = Path(__file__).resolve().parents[1]
SH = shutil.which("sh")

CLASSES = ["Lens culinaris", "Lens nigricans", "Phaseolus vulgaris"]


@pytest.fixture(scope="module")
def legacy_model():
    """The original architecture: Xception, pooling, Dense(1024), softmax, on raw [-1, 1] input.
    Its float32 weights are rounded to bfloat16's 8 bits of mantissa: random float32 weights barely
    compress, and xz then takes twice as long to pack and unpack the published tarball."""
    keras.utils.set_random_seed(3)
    base = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3))
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    x = keras.layers.Dense(1024, activation="relu")(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    model = keras.Model(base.input, outputs)
    rounded = [weight.astype(ml_dtypes.bfloat16).astype(np.float32) for weight in model.get_weights()]
    model.set_weights(rounded)
    return model


def _tarball(folder, model, *, extra_member=None, test_images=False, mode="w:xz", files_=None):
    """The original run layout as a tarball in `folder`, compressed as published (xz) unless `mode`
    says otherwise; with `test_images`, a labelled test split whose images come in the tarball's
    images/ folder (the published tarball lists its split without them); without a `model`, an
    empty weights file (for archives refused before their weights are read); `files_` replaces
    files of the run ({relative path: bytes})."""
    run = folder / "legacy" / "2019-06-01_120000"
    (run / "ckpts").mkdir(parents=True)
    (run / "conf").mkdir()
    (run / "dataset_files").mkdir()
    if model is not None:
        save_keras2_h5(model, run / "ckpts" / "final_model.h5")
    else:
        (run / "ckpts" / "final_model.h5").write_bytes(b"")
    conf = {"model": {"modelname": "Xception", "image_size": 71, "num_classes": 3, "preprocess_mode": "tf"}}
    (run / "conf" / "conf.json").write_text(json.dumps(conf))
    (run / "dataset_files" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (run / "dataset_files" / "info.txt").write_text("lentil\nblack lentil\ncommon bean\n")
    rng = np.random.default_rng(1)
    lines = [f"seeds/{index}.png {index % len(CLASSES)}" for index in range(6)]
    (run / "dataset_files" / "test.txt").write_text("\n".join(lines) + "\n")
    if test_images:
        (run / "images" / "seeds").mkdir(parents=True)
        for index in range(6):
            pixels = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
            (run / "images" / "seeds" / f"{index}.png").write_bytes(encode(pixels, "PNG"))
    for name, content in (files_ or {}).items():
        (run / name).write_bytes(content)
    archive = folder / ("seeds.tar.xz" if mode == "w:xz" else "seeds.tar")
    options = {"preset": 0} if mode == "w:xz" else {}
    with tarfile.open(archive, mode, **options) as tar:
        tar.add(run, arcname=run.name)
        if extra_member is not None:
            info = tarfile.TarInfo(extra_member)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return archive


@pytest.fixture(scope="module")
def published(tmp_path_factory, legacy_model):
    """The published tarball's layout (xz, 84 MB of Keras 2 weights: made once),
    served over loopback HTTP; yields (its file, its URL)."""
    folder = tmp_path_factory.mktemp("published")
    archive = _tarball(folder, legacy_model)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    with http_server(handler) as url:
        yield archive, f"{url}/{archive.name}"


def test_a_legacy_run_imports_and_predicts_as_the_original(empty_roots, legacy_model, published, caplog):
    archive, url = published
    # A signed URL with credentials: neither the log nor run.json (shown by the metadata) repeats them.
    secret_url = url.replace("http://", "http://alice:S3cret@") + "?temp_url_sig=T0ken&temp_url_expires=1"
    run_id = legacy.import_legacy(secret_url, empty_roots)
    layout = runs.RunLayout(empty_roots.models / run_id)
    assert layout.is_complete()
    summary = files.read_json(layout.summary_file)
    assert summary["imported_from"] == url
    assert "S3cret" not in caplog.text and "T0ken" not in caplog.text
    assert summary["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    # The published tarball lists its test split without the images: the run says so.
    assert summary["metrics"] == {}
    assert summary["held_out"].startswith("not evaluated: the test split's images are in neither place")

    pixels = np.random.default_rng(0).integers(0, 256, (4, 90, 110, 3), dtype=np.uint8)
    batch = np.stack([pipeline.resize(p, 71).numpy() for p in pixels])
    before = legacy_model.predict(keras.applications.xception.preprocess_input(batch.copy()), verbose=0)
    run = inference.load_run(layout)
    after = run.model.predict_on_batch(batch)
    np.testing.assert_allclose(after, before, atol=1e-5)
    assert run.classes == tuple(CLASSES)
    assert run.info == ("lentil", "black lentil", "common bean")


def test_a_tarball_that_escapes_its_folder_is_refused(empty_roots, tmp_path):
    archive = _tarball(tmp_path, None, extra_member="../../escaped.txt")
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


def test_the_held_out_accuracy_is_recorded_when_the_test_images_come_along(
    empty_roots, tmp_path, legacy_model
):
    """An uncompressed tarball, too: the importer reads any tar archive; a class without a
    description has a blank line in info.txt, and keeps its place."""
    described = {"dataset_files/info.txt": b"lentil\n\ncommon bean\n"}
    archive = _tarball(tmp_path, legacy_model, test_images=True, mode="w", files_=described)
    run_id = legacy.import_legacy(str(archive), empty_roots, sha256=legacy.file_sha256(archive))
    layout = runs.RunLayout(empty_roots.models / run_id)
    assert layout.info() == ("lentil", "", "common bean")
    assert list(runs.list_runs(empty_roots.models).working) == [run_id]
    summary = files.read_json(layout.summary_file)
    assert summary["held_out"].startswith("evaluated on 6 test images")
    assert 0.0 <= summary["metrics"]["test_accuracy"] <= 1.0
    assert set(summary["metrics"]) == {"test_accuracy", "test_top5_accuracy", "test_loss", "test_macro_f1"}
    assert (layout.reports_dir / "test_evaluation.json").is_file()


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("conf/conf.json", b"{not json", "conf/conf.json is not the original's"),
        ("conf/conf.json", b'{"model": {"image_size": null}}', "conf/conf.json is not the original's"),
        ("conf/conf.json", b'{"model": ["Xception"]}', "conf/conf.json is not the original's"),
        ("dataset_files/classes.txt", "Lens\nPhaséolus\n".encode("latin-1"), "unreadable"),
        ("dataset_files/classes.txt", b"Lens culinaris\n", "fewer than 2 classes"),
        # A blank first line then the second description: the descriptions would shift by one.
        ("dataset_files/info.txt", b"\nblack lentil\n", "info.txt has 2 lines for 3 classes"),
    ],
)
def test_a_run_the_original_did_not_write_is_refused_and_nothing_is_written(
    empty_roots, tmp_path, name, content, problem
):
    archive = _tarball(tmp_path, None, mode="w", files_={name: content})
    with pytest.raises(InputError, match=problem) as raised:
        legacy.import_legacy(str(archive), empty_roots)
    assert raised.value.field == "source"
    assert list(empty_roots.models.iterdir()) == []


def test_a_url_is_shown_without_credentials_or_query():
    assert (
        legacy.public_url("https://u:p@[::1]:8080/a/seeds.tar.xz?sig=x#f")
        == "https://[::1]:8080/a/seeds.tar.xz"
    )
    assert legacy.public_url("http://host/seeds.tar.xz") == "http://host/seeds.tar.xz"


@pytest.mark.parametrize(
    ("sha256", "problem"),
    [("0" * 64, "not the expected 0000"), ("not-hex", "expected 64 hexadecimal digits")],
)
def test_a_tarball_with_another_checksum_is_refused_and_nothing_is_written(
    empty_roots, tmp_path, sha256, problem
):
    """The digest is checked before the archive is opened: any file will do."""
    archive = tmp_path / "seeds.tar.xz"
    archive.write_bytes(b"not the published model")
    with pytest.raises(InputError, match=problem) as raised:
        legacy.import_legacy(str(archive), empty_roots, sha256=sha256)
    assert raised.value.field == "sha256"
    assert list(empty_roots.models.iterdir()) == []


def test_the_image_build_step_installs_the_published_model_and_deepaas_cli_serves_it(tmp_path, published):
    """docker/install-model.sh, as the pre-trained image's build runs it, against a tarball on
    loopback: the wrong checksum stops it with a clear error and writes nothing; the right one
    installs a run that the serverless path (OSCAR's `deepaas-cli predict`, JSON output) answers with."""
    archive, url = published
    models = tmp_path / "image" / "models"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        MODELS_ENV: str(models),
        DATA_ENV: str(tmp_path / "image" / "data"),
        "DEEPAAS_V2_MODEL": "seeds_tf",
    }
    script = str(ROOT / "docker" / "install-model.sh")
    refused = subprocess.run(
        [SH, script, url, "f" * 64],
        check=False,
        env={**env, "PYTHONPROFILEIMPORTTIME": "1"},  # Python's record of each import, on stderr
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert f"sha256: {url} has SHA-256 {legacy.file_sha256(archive)}, not the expected" in refused.stderr
    assert not models.exists() or list(models.iterdir()) == []
    # Refused before TensorFlow loads: a wrong pin stopped the build only after its import.
    imported = {line.rsplit("|", 1)[-1].strip() for line in refused.stderr.splitlines() if "|" in line}
    assert "seeds_tf.learning.legacy" in imported
    assert "tensorflow" not in imported

    installed = subprocess.run(
        [SH, script, url, legacy.file_sha256(archive)], check=False, env=env, capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr
    (run_id,) = runs.complete_runs(models)

    photo = tmp_path / "seed.png"
    photo.write_bytes(encode(np.full((90, 90, 3), 120, dtype=np.uint8), "PNG"))
    output = tmp_path / "prediction.json"
    predicted = subprocess.run(
        [
            str(Path(sys.executable).with_name("deepaas-cli")),
            "--deepaas_method_output",
            str(output),
            "predict",
            "--image",
            str(photo),
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr
    answer = json.loads(output.read_text())
    assert answer["run_id"] == run_id
    assert sorted(answer["labels"]) == sorted(CLASSES)
    assert sum(answer["probabilities"]) == pytest.approx(1.0, abs=1e-4)
