"""seeds_tf.service.request_parsing through the real DEEPaaS app: what DEEPaaS 2.6 and webargs 5 get
wrong, put right in the server process (one shape for every client error, an empty form, unknown
and repeated arguments, the order of a training's status)."""

import base64
import io
import shutil

import aiohttp
import pytest
from deepaas import config as deepaas_config

from seeds_tf.core import runs
from seeds_tf.core.paths import MODELS_ENV
from seeds_tf.service import request_parsing
from tests.deepaas_harness import MODEL_URL
from tests.helpers import SMALL_OPTIONS, in_process_service, seed_photo, unstarted_run

PREDICT = f"{MODEL_URL}/predict/"
TRAIN = f"{MODEL_URL}/train/"

CLIENT_MAX_SIZE = 1024 * 1024
"""The in-process app's cap on a request body, as a deployment sets one (etc/deepaas.conf)."""


@pytest.fixture(scope="module")
def service(tmp_path_factory, session_roots, tiny_run):
    deepaas_config.CONF.set_override("client_max_size", CLIENT_MAX_SIZE)
    try:
        with in_process_service(tmp_path_factory.mktemp("parsing"), session_roots) as (app, roots, _):
            (roots.data / "no_images").mkdir()
            yield app, roots
    finally:
        deepaas_config.CONF.clear_override("client_max_size")


@pytest.fixture
def app(service):
    return service[0]


@pytest.fixture
def photo(service) -> bytes:
    return seed_photo(service[1]).read_bytes()


def assert_client_error(response, status: int, field: str, *words: str) -> dict:
    """The one shape of every client error: `{"message": "<field>: <problem>", "field": "<field>"}`."""
    assert response.status == status, response.body
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"message", "field"}, body
    assert body["field"] == field, body
    assert body["message"].startswith(f"{field}: "), body
    for word in words:
        assert word in body["message"], body
    return body


def test_an_empty_multipart_body_gets_the_no_image_answer(app):
    """What the Swagger UI sends for predict with no file chosen: multipart, no boundary, no body."""
    answer = app.request(
        "POST", PREDICT, params={"top_k": "3"}, headers={"Content-Type": "multipart/form-data"}, data=b""
    )
    assert_client_error(answer, 422, "image", "no image: upload one (image), or give urls or data")


def test_an_empty_form_body_leaves_the_arguments_to_the_query_string(app):
    """An empty body is an empty form, not a malformed one, for any form content type."""
    answer = app.request(
        "POST",
        PREDICT,
        params={"data": "data:text/plain;base64,aGVsbG8="},
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        data=b"",
    )
    assert_client_error(answer, 422, "data", "image")


def test_an_empty_value_is_the_argument_left_out(app, photo):
    """The Swagger UI's "Send empty value" sends `top_k=`: it got a 422 "Not a valid integer"."""
    in_the_form = app.predict({"image": ("seed.jpg", photo)}, top_k="", tta="", engine="", timestamp="")
    in_the_query = app.request(
        "POST", PREDICT, params={"top_k": "", "tta": ""}, data={"data": "", "urls": ""}
    )
    assert in_the_form.status == 200, in_the_form.body
    assert (len(in_the_form.json()["results"][0]["species"]), in_the_form.json()["tta"]) == (5, "none")
    assert_client_error(in_the_query, 422, "image", "no image: upload one (image), or give urls or data")


def test_urls_and_data_uris_are_still_read_from_a_json_body_or_the_query_string(app, photo):
    """They are documented in the form body; clients that send them elsewhere, as before, still can."""
    uri = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    for sent in ({"json": {"data": uri, "top_k": 2}}, {"params": {"data": uri, "top_k": "2"}}):
        answer = app.request("POST", PREDICT, **sent)
        assert answer.status == 200, answer.body
        assert [result["image"] for result in answer.json()["results"]] == ["data URI 1"]


def test_an_invalid_argument_is_refused_in_the_one_shape(app, photo):
    answer = app.predict({"image": ("seed.jpg", photo)}, top_k=0)
    assert_client_error(answer, 422, "top_k", "greater than or equal to 1")


def test_several_invalid_arguments_name_the_first_and_tell_every_problem(app):
    answer = app.request("POST", TRAIN, params={"epochs": "0", "mode": "slow", "weights": "none"})
    # mode comes before epochs in config.yaml, so in the arguments.
    assert_client_error(answer, 422, "mode", "mode: Must be one of: normal, fast", "; epochs: Must be")


@pytest.mark.parametrize(("path", "name"), [(TRAIN, "epochs"), (TRAIN, "batch_size"), (PREDICT, "top_k")])
def test_a_number_with_a_fraction_for_an_integer_is_refused_in_a_json_body(app, path, name):
    """marshmallow's Int truncated it: `"epochs": 1.5` trained one epoch."""
    answer = app.request("POST", path, json={name: 1.5, "weights": "none"} if path == TRAIN else {name: 1.5})
    assert_client_error(answer, 422, name, "Not a valid integer")


def test_a_check_against_the_disk_is_refused_in_the_one_shape(app, photo):
    answer = app.predict({"image": ("seed.jpg", photo)}, timestamp="1999-01-01_000000")
    assert_client_error(answer, 422, "timestamp", "1999-01-01_000000")


@pytest.mark.parametrize(
    ("destination", "problem"),
    [
        ("nowhere", "expected an rclone destination such as rshare:/models"),
        ("rshare:/models", "no rclone remote named 'rshare' is configured (configured: none)"),
    ],
)
def test_a_bad_upload_destination_is_refused_when_the_training_is_asked(
    app, tmp_path, monkeypatch, destination, problem
):
    """Checked only by the worker, it answered 200 and the training's status then said why; a remote
    rclone does not know (here an empty rclone configuration) was found only after the training."""
    (tmp_path / "rclone.conf").touch()
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "rclone.conf"))
    answer = app.request("POST", TRAIN, params={"upload_to": destination, "weights": "none"})
    assert_client_error(answer, 422, "upload_to", problem)


def test_a_problem_found_by_the_worker_has_the_same_shape(app):
    answer = app.predict({"image": ("notes.txt", b"not a photo at all")})
    assert_client_error(answer, 422, "image", "notes.txt")


def test_a_bad_image_is_refused_under_the_argument_it_was_sent_in(app, photo):
    """Every image a worker refused was reported under `image`, wherever it was sent."""
    second = app.predict({"image": ("seed.jpg", photo), "image_2": ("notes.txt", b"not a photo")})
    assert_client_error(second, 422, "image_2", "'notes.txt' is not an image")
    text = app.predict({"image": ("seed.jpg", photo)}, image_3="a plain string")
    assert_client_error(text, 422, "image_3", "expected an uploaded file (multipart form field 'image_3')")
    not_an_image = "data:image/png;base64," + base64.b64encode(b"not a photo").decode()
    inlined = app.predict({}, data=not_an_image)
    assert_client_error(inlined, 422, "data", "'data URI 1' is not an image")


@pytest.mark.parametrize(
    ("path", "arguments", "unknown"),
    [(PREDICT, {"top-k": "3"}, "top-k"), (TRAIN, {"epoch": "5", "weights": "none"}, "epoch")],
)
def test_an_unknown_argument_is_refused_and_named(app, photo, path, arguments, unknown):
    files = {"image": ("seed.jpg", photo)} if path == PREDICT else {}
    form = aiohttp.FormData()
    for name, (filename, data) in files.items():
        form.add_field(name, data, filename=filename)
    for name, value in arguments.items():
        form.add_field(name, value)
    answer = app.request("POST", path, data=form)
    assert_client_error(answer, 422, unknown, f"unknown argument {unknown!r}", "the arguments are")


def test_an_argument_sent_twice_is_refused_and_named(app, photo):
    """webargs 5 would read one of the two and drop the other silently: a second photo under the
    same name (what `<input type=file multiple>` sends), a query value beside a form value."""
    form = aiohttp.FormData()
    for name in ("image", "image"):
        form.add_field(name, photo, filename="seed.jpg")
    form.add_field("merge", "true")
    answer = app.request("POST", PREDICT, data=form)
    assert_client_error(
        answer, 422, "image", "sent 2 times; give it once: one photo in each of image, image_2,"
    )
    form = aiohttp.FormData()
    form.add_field("image", photo, filename="seed.jpg")
    form.add_field("top_k", "abc")
    answer = app.request("POST", PREDICT, params={"top_k": "2"}, data=form)
    assert_client_error(answer, 422, "top_k", "sent 2 times; give it once")


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("application/json, text/plain, */*", "application/json"),  # the Swagger UI, axios
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "application/json"),  # a browser
        ("*/*", "application/json"),
        ("*; q=.2", "application/json"),  # Java's HttpURLConnection
        ("image/*", "image/png"),
        ("IMAGE/PNG", "image/png"),
        ("image/webp, image/*;q=0.8, */*;q=0.5", "image/png"),
        ("text/html, image/png;q=0.9, application/json;q=0.8", "image/png"),
        ("image/png;q=0, */*", "application/json"),  # the most specific range decides
        ("application/json;q=0, */*;q=0.1", "image/png"),
        ("application/json;charset=utf-8", "application/json"),
        ("text/html", None),
        ("*/*;q=0", None),
        ("application/json;q=high, image/png;q=2", None),  # ranges that cannot be read match nothing
    ],
)
def test_the_accept_header_is_negotiated(accept, chosen):
    assert request_parsing.negotiate(accept, ["application/json", "image/png"]) == chosen


def test_a_browser_accept_header_is_answered_and_one_allowing_nothing_is_a_406(app, photo):
    """DEEPaaS took `accept` as one exact value, and refused what browsers and the Swagger UI send."""
    browser = {"Accept": "application/json, text/plain, */*"}
    listed = app.predict({"image": ("seed.jpg", photo)}, headers=browser)
    assert listed.status == 200, listed.body
    assert listed.headers["Content-Type"].startswith("application/json")
    assert listed.json()["results"][0]["image"] == "seed.jpg"
    heatmap = app.predict({"image": ("seed.jpg", photo)}, headers={"Accept": "text/html, image/*;q=0.8"})
    assert heatmap.status == 200, heatmap.body
    assert heatmap.headers["Content-Type"] == "image/png"
    refused = app.predict({"image": ("seed.jpg", photo)}, headers={"Accept": "text/html"})
    assert_client_error(refused, 406, "accept", "'text/html' allows none of the answer types")


def test_accept_sent_as_an_argument_is_refused_and_named(app, photo):
    """It is read from the header alone: sent in the form or the query string, it was ignored and
    the answer was JSON whatever it asked for."""
    in_form = app.predict({"image": ("seed.jpg", photo)}, accept="image/png")
    assert_client_error(in_form, 422, "accept", "an HTTP header: send it as 'Accept: <value>'")
    form = aiohttp.FormData()
    form.add_field("image", photo, filename="seed.jpg")
    in_query = app.request("POST", PREDICT, params={"accept": "image/png"}, data=form)
    assert_client_error(in_query, 422, "accept", "an HTTP header")


@pytest.mark.parametrize(
    ("part", "problem"),
    [
        (b"Content-Disposition: form-data; name=x\r\n\r\ntruncated", "malformed form body"),
        # aiohttp's RuntimeError for it was a bare 500. (In a file's part, aiohttp also leaves its
        # temporary file to the garbage collector, a ResourceWarning in the next test.)
        (
            b'Content-Disposition: form-data; name="top_k"\r\n'
            b"Content-Transfer-Encoding: x-gzip\r\n\r\n3\r\n--b0undary--\r\n",
            "malformed form body: unknown content transfer encoding: x-gzip",
        ),
    ],
)
def test_a_malformed_multipart_body_is_a_400_naming_the_body(app, part, problem):
    answer = app.request(
        "POST",
        PREDICT,
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        data=b"--b0undary\r\n" + part,
    )
    assert_client_error(answer, 400, "body", problem)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "invalid JSON"),
        # webargs read no argument from these: the first started a default training, a 200.
        (b'[{"epochs": 1, "weights": "none"}]', 'not an array [{"epochs": 1, "weights": "none"}]'),
        (b'"epochs=1"', "expected a JSON object of arguments, not a string"),
    ],
)
def test_a_json_body_that_is_not_an_object_of_arguments_is_a_400_naming_the_body(app, body, problem):
    answer = app.request("POST", TRAIN, headers={"Content-Type": "application/json"}, data=body)
    assert_client_error(answer, 400, "body", problem)


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", None])
def test_a_body_neither_a_form_nor_json_is_a_415_naming_the_body(app, content_type):
    """webargs read nothing from it: JSON sent as text/plain, or with no type (as
    `requests.post(url, data=json.dumps(...))` sends it), started a default training."""
    headers = {"Content-Type": content_type or ""}
    answer = app.request("POST", TRAIN, headers=headers, data=b'{"epochs": 1, "weights": "none"}')
    assert_client_error(answer, 415, "body", "is not read", "application/json")


def test_a_body_over_the_size_limit_is_a_413_naming_the_body(app):
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(b"x" * (CLIENT_MAX_SIZE + 1)), filename="big.jpg")
    answer = app.request("POST", PREDICT, data=form)
    assert_client_error(answer, 413, "body", f"Maximum request body size {CLIENT_MAX_SIZE} exceeded")


def test_an_unknown_training_is_a_404_naming_the_uuid(app):
    assert_client_error(app.request("GET", f"{TRAIN}0123abcd"), 404, "uuid", "Not Found")


def test_an_unknown_route_and_a_wrong_method_have_the_shape_too(app):
    assert_client_error(app.request("GET", "/v2/models/seeds_tf/nothing/"), 404, "path")
    wrong = app.request("PUT", PREDICT)
    assert_client_error(wrong, 405, "method", "Method Not Allowed")
    assert wrong.headers["Allow"] == "POST"


def test_a_valid_request_is_untouched(app, photo):
    answer = app.predict({"image": ("seed.jpg", photo)}, top_k=2, tta="flip")
    assert answer.status == 200, answer.body
    assert answer.json()["tta"] == "flip"
    assert len(answer.json()["results"][0]["species"]) == 2


def test_a_training_status_starts_with_its_status(app):
    """DEEPaaS 2.6 builds it as date, args (every option echoed), uuid, then status: the status and
    its message or result come first instead, the echo last."""
    started = app.request("POST", TRAIN, params={"images_directory": "no_images", "weights": "none"})
    assert started.status == 200, started.body
    assert list(started.json()) == ["status", "uuid", "date", "args"]
    ended = app.wait_for_training(started.json()["uuid"])
    assert list(ended) == ["status", "message", "uuid", "date", "args"]
    assert ended["status"] == "error"
    listed = app.request("GET", TRAIN).json()
    assert listed and all(next(iter(training)) == "status" for training in listed)


def test_two_trainings_asked_at_once_get_one_200_and_one_409_until_the_first_ends(app):
    """Both requests found the training lock free, since a worker takes it only when its training
    starts: both were queued and the second failed. The request reserves the models folder instead,
    and the training's end releases it (tests/test_api.py: a cancelled one's too)."""
    failing = {"images_directory": "no_images", "weights": "none"}
    answers = app.at_once(2, "POST", TRAIN, params=failing)
    assert sorted(answer.status for answer in answers) == [200, 409], [answer.body for answer in answers]
    (refused,) = (answer for answer in answers if answer.status == 409)
    assert_client_error(refused, 409, "training", "another training is running")
    (accepted,) = (answer for answer in answers if answer.status == 200)
    assert app.wait_for_training(accepted.json()["uuid"])["status"] == "error"
    after_failure = app.request("POST", TRAIN, params=failing)
    assert after_failure.status == 200, after_failure.body
    assert app.wait_for_training(after_failure.json()["uuid"])["status"] == "error"


def test_a_resume_whose_run_cannot_be_copied_where_it_asks_is_refused_at_once(service):
    """A resumed run trains with its own options, its upload destination too: a remote this
    deployment does not have was found only when the copy failed, after the whole training (the
    request's own `upload_to`, empty, was the one checked). `seeds-tf train` refused it at once."""
    app, roots = service
    layout = unstarted_run(roots, {**SMALL_OPTIONS, "upload_to": "nosuchremote:/models"})
    before = sorted(layout.root.rglob("*"))
    try:
        refused = app.request("POST", TRAIN, params={"resume": layout.run_id})
        assert_client_error(refused, 422, "upload_to", "nosuchremote")
        assert runs.incomplete_runs(roots.models) == [layout.run_id]
        assert sorted(layout.root.rglob("*")) == before
    finally:
        shutil.rmtree(layout.root)


def test_a_training_the_server_cannot_store_is_a_507_naming_the_models_folder(app, monkeypatch):
    """A models folder the server cannot write (read-only, full, no permission) failed the request
    with a 500 and a traceback when the reservation's lock file was made. Nothing may create a folder
    in /sys (the kernel's, EPERM or EACCES): the server is pointed there for the request."""
    unwritable = "/sys/seeds_tf_models"
    monkeypatch.setenv(MODELS_ENV, unwritable)
    refused = app.request("POST", TRAIN, params={"images_directory": "no_images", "weights": "none"})
    assert_client_error(refused, 507, "models_dir", f"cannot write into the models folder {unwritable}")
