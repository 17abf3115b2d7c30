"""The DEEPaaS API under a fuzzer: schemathesis generates requests for every operation of the live
server's /swagger.json (a real `deepaas-run` serving the tiny run), valid ones and invalid ones, and no
answer may be a server error (5xx) or take longer than REQUEST_BOUND_S.

Fuzzed input that would leave the test's folders or the loopback interface is tamed before it is sent:
- predict's `urls` is removed: the service fetches any public host (SEEDS_TF_URL_ALLOW can only exempt
  more hosts; no setting refuses public ones), so a generated http://example.com would be fetched;
- train's `weights=imagenet` (also its default) becomes `none`: Keras would download ImageNet weights;
- every training a request starts is waited for, and cancelled if it has not ended in
  TRAINING_GRACE_S, so no fuzzed training (up to 1000 epochs) outlives its example.
Paths (`images_directory`, `splits_directory`, `weights`) and ids (`timestamp`, `ckpt_name`, `resume`)
are fuzzed as they come: the server confines them to its data and models folders, tmp folders here.

SEEDS_TF_FUZZ_EXAMPLES sets the examples per operation: by default few and derandomized (the same
requests every run), so the suite stays fast and repeatable; when set, random, for `make fuzz`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.schemas import APIOperation

from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots
from seeds_tf.service.schemas import UPLOAD_FIELDS
from tests.deepaas_harness import MODEL_URL, deepaas_run
from tests.helpers import copy_roots, seed_photo

EXAMPLES_ENV = "SEEDS_TF_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 10
"""Examples per operation in the suite: enough to reach refusals and successes of each, in seconds."""

REQUEST_BOUND_S = 60.0
"""The longest any request may take. The slowest legitimate one is the first prediction in a worker
that replaced a cancelled training's: it imports TensorFlow and loads the run (about 10 s on 2 busy
cores), then traces the model; 60 s leaves room for a loaded machine and still catches any hang."""

TRAINING_GRACE_S = 20.0
"""How long a started training may run before it is cancelled. Fuzzed trainings end in a second or
two (the worker finds a missing dataset or a bad option); one that really trained would take minutes."""

PREDICT = f"{MODEL_URL}/predict/"
TRAIN = f"{MODEL_URL}/train/"
OPERATIONS = (
    "GET /",
    "GET /v2/",
    "GET /v2/debug/",
    "GET /v2/models/",
    f"GET {MODEL_URL}/",
    f"POST {PREDICT}",
    f"POST {TRAIN}",
    f"GET {TRAIN}",
    f"GET {TRAIN}{{uuid}}",
    f"DELETE {TRAIN}{{uuid}}",
)
"""Every operation of the schema, checked against it, so that a new endpoint cannot go unfuzzed."""


@dataclasses.dataclass(frozen=True)
class LiveServer:
    url: str
    log: Path
    uploads: Path
    run_id: str
    photo: bytes
    operations: dict[str, APIOperation]


@pytest.fixture(scope="module")
def server(tmp_path_factory, session_roots: Roots, tiny_run: str) -> Iterator[LiveServer]:
    """One `deepaas-run` for the module, over copies of the tiny dataset and run, with uploads and
    the Keras cache in folders of their own."""
    base = tmp_path_factory.mktemp("fuzz")
    roots = copy_roots(session_roots, base)
    uploads = base / "uploads"
    uploads.mkdir()
    env = {
        DATA_ENV: str(roots.data),
        MODELS_ENV: str(roots.models),
        "TMPDIR": str(uploads),  # where DEEPaaS copies uploaded files
        "KERAS_HOME": str(base / "keras"),
    }
    with deepaas_run(env, base / "server.log") as url:
        schema = schemathesis.openapi.from_url(f"{url}/swagger.json")
        operations = {result.ok().label: result.ok() for result in schema.get_all_operations()}
        photo = seed_photo(roots).read_bytes()
        yield LiveServer(url, base / "server.log", uploads, tiny_run, photo, operations)


def test_every_operation_of_the_schema_is_fuzzed(server: LiveServer):
    assert sorted(server.operations) == sorted(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzzed_requests_get_no_server_error_and_no_hang(server: LiveServer, label: str):
    _fuzz(_cases(server, label), lambda case: _check(server, label, case))
    trainings = requests.get(f"{server.url}{TRAIN}", timeout=REQUEST_BOUND_S).json()
    assert [training for training in trainings if training["status"] == "running"] == []
    assert list(server.uploads.glob("tmp*")) == [], "an upload was left behind"


@pytest.mark.parametrize("field", ["images_directory", "splits_directory", "weights"])
def test_a_path_with_a_nul_byte_is_refused(server: LiveServer, field: str):
    """Path.resolve raises ValueError on a NUL byte; out of the path check, webargs answered 500."""
    refused = requests.post(f"{server.url}{TRAIN}", params={field: "tiny\x00"}, timeout=REQUEST_BOUND_S)
    assert refused.status_code == 422
    assert refused.json()["field"] == field
    assert "embedded null byte" in refused.json()["message"]


def test_a_folder_name_too_long_for_the_file_system_is_refused(server: LiveServer):
    """is_dir raises OSError (ENAMETOOLONG) for a name over 255 bytes; uncaught, that was a 500 too."""
    refused = requests.post(
        f"{server.url}{TRAIN}", params={"images_directory": "a" * 256}, timeout=REQUEST_BOUND_S
    )
    assert refused.status_code == 422
    assert refused.json()["field"] == "images_directory"
    assert "File name too long" in refused.json()["message"]


@pytest.mark.parametrize("path", [PREDICT, TRAIN])
@pytest.mark.parametrize(
    "body",
    [
        b"no boundary at all",
        b"--b0undary\r\nContent-Disposition: form-data; name=x\r\n\r\ntruncated",
        b'--b0undary\r\nContent-Disposition: form-data; name="\x1f"\r\n\r\nx\r\n--b0undary--\r\n',
    ],
    ids=["no boundary", "truncated", "control character"],
)
def test_a_malformed_form_body_is_a_client_error(server: LiveServer, path: str, body: bytes):
    """aiohttp's request.post() raises inside webargs' form parsing; seeds_tf.api turns that into 400."""
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    params = {"weights": "none"}  # should a training start after all, it downloads nothing
    answer = requests.post(
        f"{server.url}{path}", params=params, data=body, headers=headers, timeout=REQUEST_BOUND_S
    )
    assert answer.status_code == 400
    assert answer.json()["field"] == "body"
    assert "malformed form body" in answer.json()["message"]


def _cases(server: LiveServer, label: str) -> st.SearchStrategy[Case]:
    """Valid and invalid requests for one operation, made safe to send (see the module docstring)."""
    operation = server.operations[label]
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    cases = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))
    if label == f"POST {PREDICT}":
        cases = st.tuples(cases, st.booleans()).map(lambda pair: _answerable(*pair, server))
    return cases.map(_tamed)


def _answerable(case: Case, answerable: bool, server: LiveServer) -> Case:
    """Half the predictions are made answerable, so that the options are fuzzed on the path that runs
    the model, not only on refusals: every file becomes a real seed photo, a run or checkpoint named
    becomes one that exists, and generated data URIs (never valid) are dropped."""
    if not answerable:
        return case
    if isinstance(case.body, dict):
        for name in UPLOAD_FIELDS:
            if name in case.body:
                case.body[name] = server.photo
    if isinstance(case.query, dict):
        case.query.pop("data", None)
        for name, valid in (("timestamp", server.run_id), ("ckpt_name", "final")):
            if name in case.query:
                case.query[name] = valid
    return case


def _tamed(case: Case) -> Case:
    places = [place for place in (case.query, case.body) if isinstance(place, dict)]
    if case.path == PREDICT:
        for place in places:
            place.pop("urls", None)
    if case.path == TRAIN:
        if not isinstance(case.query, dict):
            case.query = {}
            places.append(case.query)
        case.query.setdefault("weights", "none")  # the default is imagenet
        for place in places:
            weights = place.get("weights")
            if weights == "imagenet" or (isinstance(weights, list) and "imagenet" in weights):
                place["weights"] = "none"
    return case


def _fuzz(cases: st.SearchStrategy[Case], check: Callable[[Case], None]) -> None:
    @settings(
        max_examples=int(os.environ.get(EXAMPLES_ENV, DEFAULT_EXAMPLES)),
        derandomize=EXAMPLES_ENV not in os.environ,
        database=None,  # nothing written into the checkout
        deadline=None,  # a request's time is checked against REQUEST_BOUND_S instead
        # Drawing 36 train options takes a while on 2 busy cores; the time to generate is not under test.
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=cases)
    def run(case: Case) -> None:
        check(case)

    run()


def _check(server: LiveServer, label: str, case: Case) -> None:
    assert not (case.path == PREDICT and _sends(case, "urls")), "a generated URL would be fetched"
    begin = time.monotonic()
    try:
        response = case.call(base_url=server.url, timeout=REQUEST_BOUND_S)
    except requests.Timeout:
        pytest.fail(f"{label}: no answer in {REQUEST_BOUND_S:g} s to\n{case.as_curl_command()}")
    elapsed = time.monotonic() - begin
    request = f"{label} -> {response.status_code} in {elapsed:.1f} s\n{case.as_curl_command()}"
    assert elapsed < REQUEST_BOUND_S, request
    assert response.status_code < 500, f"{request}\n{response.text[:2000]}"
    if response.status_code == 422:
        assert isinstance(response.json(), dict), request  # a message a client can read
    if response.status_code == 200 and case.path == PREDICT:
        if response.headers.get("content-type", [""])[0].startswith("image/png"):  # lower-case keys
            assert response.content.startswith(b"\x89PNG\r\n\x1a\n"), request
        else:
            assert response.json()["run_id"] == server.run_id, request
    if response.status_code == 200 and case.path == TRAIN and case.method == "POST":
        _end_training(server.url, response.json()["uuid"])


def _sends(case: Case, name: str) -> bool:
    return any(isinstance(place, dict) and name in place for place in (case.query, case.body))


def _end_training(url: str, uuid: str) -> None:
    """Waits for a started training to end by itself; cancels it at TRAINING_GRACE_S.

    A training that ends must say `done`, or `error` with a message. DELETE answers 500 in DEEPaaS 2.6
    whenever it cancels a running training (its CancellablePool swallows the CancelledError, the task
    ends with the result None, and the answer reads None["finish_date"]); the worker is killed and the
    training forgotten all the same, which is what is checked instead of that status.
    """
    deadline = time.monotonic() + TRAINING_GRACE_S
    while time.monotonic() < deadline:
        status = requests.get(f"{url}{TRAIN}{uuid}", timeout=REQUEST_BOUND_S).json()
        if status["status"] != "running":
            assert status["status"] == "done" or (status["status"] == "error" and status["message"]), status
            return
        time.sleep(0.5)
    cancelled = requests.delete(f"{url}{TRAIN}{uuid}", timeout=REQUEST_BOUND_S)
    assert cancelled.status_code in (200, 500), cancelled.text
    assert requests.get(f"{url}{TRAIN}{uuid}", timeout=REQUEST_BOUND_S).status_code == 404
