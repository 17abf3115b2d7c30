"""The HTTP surface, through the real DEEPaaS app serving seeds_tf (aiohttp test client)."""

import base64
import contextlib
import http.server
import io
import json
import pickle
import time

import numpy as np
import PIL.Image
import pytest
from deepaas import config as deepaas_config
from oslo_config import cfg

from seeds_tf import api
from seeds_tf.core import files, runs
from tests.deepaas_harness import MODEL_URL
from tests.helpers import SMALL_OPTIONS, TINY_OPTIONS, encode, in_process_service, interrupted_run, seed_photo
from tests.loopback import http_server


@pytest.fixture(scope="module")
def service(tmp_path_factory, session_roots, tiny_run):
    """One DEEPaaS app for the module, over copies of the tiny dataset and run. Uploads land in a
    temporary folder of their own, so the tests can check that none is left behind."""
    # Photos served by the test from loopback; every other loopback address stays refused.
    with in_process_service(
        tmp_path_factory.mktemp("api"), session_roots, SEEDS_TF_URL_ALLOW="127.0.0.1"
    ) as made:
        yield made


@pytest.fixture
def app(service):
    app, _, uploads = service
    yield app
    assert list(uploads.iterdir()) == [], "an upload was left behind"


@pytest.fixture
def photo(service) -> bytes:
    return seed_photo(service[1]).read_bytes()


def test_the_model_is_listed_with_its_metadata(app, tiny_run):
    listing = app.request("GET", "/v2/models/")
    assert listing.status == 200
    (model,) = listing.json()["models"]
    assert model["name"] == "seeds_tf"
    assert model["version"]
    assert model["license"] == "Apache-2.0"
    assert model["summary"] and model["description"] and model["authors"]
    assert model["model"]["run_id"] == tiny_run
    assert model["model"]["modelname"] == TINY_OPTIONS["modelname"]
    assert model["model"]["image_size"] == TINY_OPTIONS["image_size"]
    assert model["model"]["num_classes"] == 16
    assert "test_accuracy" in model["model"]["metrics"]
    assert app.request("GET", f"{MODEL_URL}/").json()["runs"] == [tiny_run]


def test_the_self_link_is_under_the_base_path_deepaas_run_serves_at(empty_roots):
    """It was `/v2/models/seeds_tf` whatever `deepaas-run --base-path /seeds` was given: a 404."""
    conf = deepaas_config.CONF
    with contextlib.suppress(cfg.DuplicateOptError):
        conf.register_opt(cfg.StrOpt("base-path", default=""))  # as deepaas-run registers it
    conf.set_override("base_path", "/seeds")
    try:
        links = {link["rel"]: link["href"] for link in api.get_metadata()["links"]}
    finally:
        conf.clear_override("base_path")
    assert links["self"] == f"/seeds{MODEL_URL}"


def test_swagger_documents_the_arguments(app):
    spec = app.request("GET", "/swagger.json").json()
    parameters = {p["name"]: p for p in spec["paths"][f"{MODEL_URL}/predict/"]["post"]["parameters"]}
    assert {"image", "top_k", "timestamp"} <= set(parameters)
    assert parameters["top_k"]["default"] == 5
    assert parameters["top_k"]["maximum"] == 1000
    train = {p["name"]: p for p in spec["paths"][f"{MODEL_URL}/train/"]["post"]["parameters"]}
    assert train["epochs"]["type"] == "integer"
    assert train["use_validation"]["type"] == "boolean"
    assert train["mode"]["enum"] == ["normal", "fast"]
    assert "Xception" in train["modelname"]["enum"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_predict_names_the_top_species(app, service, tiny_run, fmt):
    image = np.asarray(PIL.Image.open(seed_photo(service[1])))
    response = app.predict({"image": (f"seed.{fmt.lower()}", encode(image, fmt))}, top_k=3)
    assert response.status == 200, response.body
    body = response.json()
    assert body["run_id"] == tiny_run
    (result,) = body["results"]
    assert result["image"] == f"seed.{fmt.lower()}"
    species = result["species"]
    assert len(species) == 3
    probabilities = [s["probability"] for s in species]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    classes = (service[1].data / "tiny" / "dataset_files" / "classes.txt").read_text().splitlines()
    assert all(classes[s["label_id"]] == s["label"] for s in species)
    assert len(result["genera"]) == 3
    assert body["checkpoint"] == "final"


def test_accept_png_returns_the_photo_with_its_heatmap(app, photo):
    response = app.predict({"image": ("a.jpg", photo)}, headers={"Accept": "image/png"})
    assert response.status == 200, response.body
    assert response.headers["Content-Type"] == "image/png"
    assert PIL.Image.open(io.BytesIO(response.body)).format == "PNG"


def test_the_same_image_always_gets_the_same_answer(app, photo):
    first = app.predict({"image": ("a.jpg", photo)}).json()
    second = app.predict({"image": ("a.jpg", photo)}).json()
    assert first == second
    assert len(first["results"][0]["species"]) == 5


def test_top_k_beyond_the_classes_returns_them_all(app, photo):
    response = app.predict({"image": ("a.jpg", photo)}, top_k=500)
    assert len(response.json()["results"][0]["species"]) == 16


def test_a_missing_image_is_a_client_error(app):
    response = app.request("POST", f"{MODEL_URL}/predict/", data={"top_k": "3"})
    assert response.status == 422
    assert response.json()["field"] == "image"


def test_train_through_the_api_then_predict_with_the_new_run(app, service, photo, tiny_run):
    options = {**SMALL_OPTIONS, "epochs": 1, "use_validation": "false"}
    started = app.train(**options)
    assert started.status == 200, started.body
    assert started.json()["status"] == "running"
    assert started.json()["args"]["use_validation"] is False
    uuid = started.json()["uuid"]

    status = app.wait_for_training(uuid)
    assert status["status"] == "done", status
    output = status["result"]["output"]
    assert output["run_id"] != tiny_run
    assert {"test_loss", "test_accuracy", "test_top5_accuracy"} <= set(output["metrics"])
    assert any(t["uuid"] == uuid for t in app.request("GET", f"{MODEL_URL}/train/").json())

    # The new run serves without a restart, by name. Trained through the API, it is a candidate:
    # requests naming no run keep the operator's run until the new one is promoted.
    by_name = app.predict({"image": ("a.jpg", photo)}, timestamp=output["run_id"])
    assert by_name.status == 200, by_name.body
    assert by_name.json()["run_id"] == output["run_id"]
    assert app.predict({"image": ("a.jpg", photo)}).json()["run_id"] == tiny_run
    runs.promote(service[1].models, output["run_id"])
    assert app.predict({"image": ("a.jpg", photo)}).json()["run_id"] == output["run_id"]
    older = app.predict({"image": ("a.jpg", photo)}, timestamp=tiny_run)
    assert older.json()["run_id"] == tiny_run


def test_a_dataset_problem_ends_the_training_with_a_clear_message(app, service):
    # Neither split files nor one folder per class: nothing to train on.
    options = {**TINY_OPTIONS, "splits_directory": "tiny/images", "images_directory": "tiny/dataset_files"}
    uuid = app.train(**options).json()["uuid"]
    status = app.wait_for_training(uuid)
    assert status["status"] == "error"
    assert "splits_directory" in status["message"]
    assert "no classes.txt" in status["message"]


def test_a_cancelled_training_is_never_offered(app, service, photo):
    """DEEPaaS kills the worker of a cancelled training and answers its DELETE with the status
    "cancelled"; the half-made run is never offered and the replacement worker loads a model lazily."""
    roots = service[1]
    before = set(runs.complete_runs(roots.models))
    interrupted_before = set(runs.incomplete_runs(roots.models))
    options = {**SMALL_OPTIONS, "epochs": 2}
    uuid = app.train(**options).json()["uuid"]
    deadline = time.monotonic() + 300
    started = None
    while started is None and time.monotonic() < deadline:
        started = next(iter(set(runs.incomplete_runs(roots.models)) - interrupted_before), None)
        time.sleep(0.1)
    assert started is not None, app.request("GET", f"{MODEL_URL}/train/{uuid}").body
    cancelled = app.request("DELETE", f"{MODEL_URL}/train/{uuid}")
    assert cancelled.status == 200, cancelled.body
    assert (cancelled.json()["status"], cancelled.json()["uuid"]) == ("cancelled", uuid)
    # Its status and the list of trainings still say so (DEEPaaS forgot it: a 404 and no entry).
    assert app.request("GET", f"{MODEL_URL}/train/{uuid}").json()["status"] == "cancelled"
    listed = {
        training["uuid"]: training["status"] for training in app.request("GET", f"{MODEL_URL}/train/").json()
    }
    assert listed[uuid] == "cancelled"
    assert set(runs.complete_runs(roots.models)) == before
    assert started in runs.incomplete_runs(roots.models)
    listing = app.request("GET", f"{MODEL_URL}/").json()
    assert started not in listing["runs"]
    answer = app.predict({"image": ("a.jpg", photo)})
    assert answer.status == 200, answer.body
    assert answer.json()["run_id"] != started
    # The cancelled training no longer holds the models folder: the next one is accepted.
    failing = {**TINY_OPTIONS, "splits_directory": "tiny/images", "images_directory": "tiny/dataset_files"}
    after = app.train(**failing)
    assert after.status == 200, after.body
    assert app.wait_for_training(after.json()["uuid"])["status"] == "error"


@pytest.fixture
def interrupted(service) -> runs.RunLayout:
    """A run of 2 epochs of the small backbone at 32 px, killed once its first epoch is backed up."""
    models = service[1].models
    return runs.RunLayout(models / interrupted_run(models, {**SMALL_OPTIONS, "epochs": 2}))


def test_resume_finishes_an_interrupted_run_with_its_own_config(app, interrupted, photo):
    """`resume=<run id>` finishes the run from its last backed-up epoch, with the configuration it
    started with, not the defaults of the resume request; the run then serves by name."""
    layout = interrupted
    conf = layout.conf_file.read_bytes()
    backed_up = files.read_json(layout.backup_state)["epoch"]
    done_before = files.read_json(layout.stats_file)["epochs"][:backed_up]
    # An option it would ignore is refused (it trained 2 epochs, and the status echoed `epochs: 5`);
    # one at its default (the Swagger UI sends them all) or at the run's own value is not.
    ignored = app.train(resume=layout.run_id, epochs=5)
    assert ignored.status == 422, ignored.body
    assert ignored.json()["field"] == "epochs"
    assert "its own epochs, 2: 5 would be ignored" in ignored.json()["message"]
    resumed = app.train(resume=layout.run_id, epochs=2, modelname="Xception")
    assert resumed.status == 200, resumed.body
    status = app.wait_for_training(resumed.json()["uuid"])
    assert status["status"] == "done", status
    assert status["result"]["output"]["run_id"] == layout.run_id
    assert layout.conf_file.read_bytes() == conf
    model = layout.config().model
    assert (model.modelname, model.image_size) == (SMALL_OPTIONS["modelname"], SMALL_OPTIONS["image_size"])
    epochs = files.read_json(layout.stats_file)["epochs"]
    assert [epoch["epoch"] for epoch in epochs] == [1, 2]
    assert epochs[:backed_up] == done_before, "backed-up epochs were trained again instead of restored"
    assert not layout.backup_dir.exists()
    by_name = app.predict({"image": ("a.jpg", photo)}, timestamp=layout.run_id)
    assert by_name.status == 200, by_name.body


@pytest.fixture(scope="module")
def photo_server(service):
    """A loopback HTTP server with one seed photo at /seed.jpg."""
    photo = seed_photo(service[1]).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(photo)))
            self.end_headers()
            self.wfile.write(photo)

        def log_message(self, *args):
            pass

    with http_server(Handler) as url:
        yield url


def test_several_images_from_uploads_urls_and_data_uris(app, photo, photo_server):
    data_uri = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    response = app.predict(
        {"image": ("a.jpg", photo), "image_2": ("b.jpg", photo)},
        urls=f"{photo_server}/seed.jpg",
        data=data_uri,
    )
    assert response.status == 200, response.body
    names = [result["image"] for result in response.json()["results"]]
    assert names == ["a.jpg", "b.jpg", f"{photo_server}/seed.jpg", "data URI 1"]
    species = [result["species"] for result in response.json()["results"]]
    assert species[0] == species[1] == species[2] == species[3], "the same photo, the same answer"


def test_merge_answers_once_for_one_specimen(app, photo):
    response = app.predict({"image": ("a.jpg", photo), "image_2": ("b.jpg", photo)}, merge="true")
    body = response.json()
    assert body["merged"] is True
    (result,) = body["results"]
    assert result["image"] == "a.jpg + b.jpg"


def test_a_refusal_made_in_a_worker_keeps_its_field_and_problem():
    """DEEPaaS pickles a worker's refusal back to the server, and deepaas-cli (the platform's
    serverless path) prints it: both keep the field and the problem."""
    refusal = pickle.loads(pickle.dumps(api.ClientError("top_k", "must be at least 1")))  # noqa: S301 (our own bytes)
    assert (refusal.status, refusal.field, refusal.problem) == (422, "top_k", "must be at least 1")
    assert json.loads(refusal.text) == {"message": "top_k: must be at least 1", "field": "top_k"}
    assert str(refusal) == "top_k: must be at least 1"
