"""A corpus of hostile and broken inputs, each sent to a live `deepaas-run` and to the `seeds-tf` CLI.

Every case must end within BOUND_S with the answer it deserves: a client error (4xx over HTTP, exit
status 2 from the CLI) whose message names what is wrong, or, for unusual but valid pictures (16-bit,
CMYK, palette with transparency, animated GIF, a broken EXIF block, a JPEG whose decoder resyncs past
a corrupt stretch), a normal answer. Never a 500, never a hang; after each case the server still
answers a good prediction and no upload is left in its temporary folder. Cases about the HTTP body
itself (size, content type) have no CLI form, and the CLI's own argument errors come from argparse.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import pytest
import requests

from seeds_tf import cli
from seeds_tf.core import config
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots
from seeds_tf.hosting import admission
from tests.deepaas_harness import MODEL_URL, deepaas_run, free_port
from tests.helpers import copy_roots, seed_photo
from tests.loopback import http_server

BOUND_S = 20
"""Every request ends within this: URL fetches give up after 2 s (SEEDS_TF_URL_TIMEOUT), a decode of
the largest accepted image takes well under a second, and nothing else waits."""

CLIENT_MAX_SIZE = 4 * 1024 * 1024
"""The upload limit the live server runs with (deepaas-run --client-max-size), as a deployment would."""

URL_SETTINGS = {
    "SEEDS_TF_URL_ALLOW": "127.0.0.1",
    "SEEDS_TF_URL_TIMEOUT": "2",
    "SEEDS_TF_URL_MAX_BYTES": "1000000",
}


@dataclass(frozen=True)
class Hostile:
    """One hostile input: what is sent, and the answer it deserves."""

    name: str
    files: tuple[tuple[str, str], ...] = ()
    """(form field, payload name) pairs uploaded as files; payloads are made by `_payloads`."""
    fields: dict[str, str] = field(default_factory=dict)
    """Form fields; "{server}" stands for the loopback test server's URL."""
    status: int = 422
    says: str = ""
    """Words the error message must contain (for the CLI too, unless `cli_says` is set)."""
    cli: bool = True
    """False for cases about the HTTP request itself, which have no CLI form."""
    cli_says: str | None = None


CORPUS = [
    # Broken or hostile image files.
    Hostile("not an image", files=(("image", "text.jpg"),), says="not an image"),
    Hostile("empty file", files=(("image", "empty.jpg"),), says="is empty"),
    Hostile("truncated JPEG", files=(("image", "truncated.jpg"),), says="truncated"),
    Hostile("truncated PNG", files=(("image", "truncated.png"),), says="truncated"),
    Hostile("PNG bomb", files=(("image", "bomb.png"),), says="more than the limit"),
    Hostile("1x1 image", files=(("image", "dot.png"),), says="at least 16"),
    Hostile("20000-px strip", files=(("image", "strip.png"),), says="at least 16"),
    Hostile("JPEG with a corrupt middle", files=(("image", "corrupt.jpg"),), says="broken"),
    Hostile("16-bit PNG", files=(("image", "deep.png"),), status=200),
    Hostile("CMYK JPEG", files=(("image", "cmyk.jpg"),), status=200),
    Hostile("palette with transparency", files=(("image", "palette.png"),), status=200),
    Hostile("animated GIF", files=(("image", "animated.gif"),), status=200),
    Hostile("hostile EXIF block", files=(("image", "exif.jpg"),), status=200),
    Hostile("EXIF orientation that does not exist", files=(("image", "orientation.jpg"),), status=200),
    # The request itself.
    Hostile(
        "upload over the size limit",
        files=(("image", "huge.jpg"),),
        status=413,
        says="Maximum request body size",
        cli_says="not an image",
    ),
    Hostile(
        "more images than allowed",
        files=(
            ("image", "seed.jpg"),
            ("image_2", "seed.jpg"),
            ("image_3", "seed.jpg"),
            ("image_4", "seed.jpg"),
        ),
        fields={"urls": " ".join(["{server}/seed.jpg"] * 5)},
        says="limit is 8",
    ),
    Hostile("image sent as text", fields={"image": "aGVsbG8="}, says="expected an uploaded file", cli=False),
    Hostile("no image at all", fields={"top_k": "3"}, says="no image", cli=False),
    # URLs and data URIs.
    Hostile(
        "URL to a closed loopback port", fields={"urls": "http://127.0.0.1:{closed}/x.jpg"}, says="connect"
    ),
    Hostile("URL to a server that stalls", fields={"urls": "{server}/stall"}, says="time"),
    Hostile("URL with an endless body", fields={"urls": "{server}/endless"}, says="1000000 bytes"),
    Hostile("URL that redirects in a loop", fields={"urls": "{server}/loop"}, says="redirects more than"),
    Hostile("URL redirected to a refused address", fields={"urls": "{server}/refused"}, says="not allowed"),
    Hostile("URL of a web page", fields={"urls": "{server}/page.html"}, says="not an image"),
    Hostile("file:// URL", fields={"urls": "file:///etc/passwd"}, says="http", cli_says="cannot read"),
    Hostile(
        "data URI that is not base64", fields={"data": "data:image/png;base64,!!!notbase64"}, says="base64"
    ),
    Hostile("data URI of text", fields={"data": "data:text/plain;base64,aGVsbG8="}, says="image"),
    # Path-like and absurd arguments.
    Hostile("run name ..", files=(("image", "seed.jpg"),), fields={"timestamp": ".."}, says="timestamp"),
    Hostile("run name /etc", files=(("image", "seed.jpg"),), fields={"timestamp": "/etc"}, says="timestamp"),
    Hostile(
        "run name linked out of models/",
        files=(("image", "seed.jpg"),),
        fields={"timestamp": "2000-01-01_000000"},
        says="unknown run",
    ),
    Hostile(
        "unknown run",
        files=(("image", "seed.jpg"),),
        fields={"timestamp": "1999-01-01_000000"},
        says="unknown run",
    ),
    Hostile(
        "unknown checkpoint",
        files=(("image", "seed.jpg"),),
        fields={"ckpt_name": "epoch_9999"},
        says="no checkpoint 'epoch_9999'",
    ),
    Hostile(
        "checkpoint name with ..",
        files=(("image", "seed.jpg"),),
        fields={"ckpt_name": "../../../etc/passwd"},
        says="ckpt_name",
    ),
    Hostile("absurd top_k", files=(("image", "seed.jpg"),), fields={"top_k": "1000000000000"}, says="top_k"),
    Hostile("negative top_k", files=(("image", "seed.jpg"),), fields={"top_k": "-3"}, says="top_k"),
    Hostile("top_k not a number", files=(("image", "seed.jpg"),), fields={"top_k": "many"}, says="top_k"),
    Hostile("unknown tta", files=(("image", "seed.jpg"),), fields={"tta": "sideways"}, says="tta"),
    Hostile(
        "merge not a boolean",
        files=(("image", "seed.jpg"),),
        fields={"merge": "perhaps"},
        says="merge",
        cli_says="unrecognized arguments: perhaps",
    ),
]


@pytest.fixture(scope="module")
def corpus_roots(tmp_path_factory, session_roots, tiny_run) -> Roots:
    """Copies of the tiny dataset and run, plus a run-named symbolic link leading out of models/."""
    base = tmp_path_factory.mktemp("hostile")
    roots = copy_roots(session_roots, base)
    outside = base / "outside"
    shutil.copytree(roots.models / tiny_run, outside)
    (roots.models / "2000-01-01_000000").symlink_to(outside, target_is_directory=True)
    return roots


@pytest.fixture(scope="module")
def payloads(corpus_roots) -> dict[str, bytes]:
    return _payloads(seed_photo(corpus_roots).read_bytes())


@pytest.fixture(scope="module")
def hostile_server(payloads):
    """Loopback only: a seed photo, an HTML page, and answers that stall, never end or redirect."""
    with http_server(_handler(payloads["seed.jpg"])) as url:
        yield url


@pytest.fixture(scope="module")
def live(corpus_roots, tmp_path_factory):
    """A real deepaas-run with an upload size limit; uploads land in a folder the tests watch."""
    base = tmp_path_factory.mktemp("live")
    uploads = base / "uploads"
    uploads.mkdir()
    env = {
        DATA_ENV: str(corpus_roots.data),
        MODELS_ENV: str(corpus_roots.models),
        "TMPDIR": str(uploads),
        **URL_SETTINGS,
    }
    with deepaas_run(env, base / "server.log", "--client-max-size", str(CLIENT_MAX_SIZE)) as url:
        yield url, uploads


def test_the_corpus_is_large_enough():
    assert len(CORPUS) + len(_train_cases()) >= 30


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_http(case, live, payloads, hostile_server):
    url, uploads = live
    before = set(os.listdir(uploads))
    files = [(name, (payload, payloads[payload], "application/octet-stream")) for name, payload in case.files]
    started = time.monotonic()
    answer = requests.post(
        f"{url}{MODEL_URL}/predict/",
        files=files or None,
        data=_filled(case.fields, hostile_server),
        timeout=BOUND_S,
    )
    assert time.monotonic() - started < BOUND_S
    assert answer.status_code == case.status, answer.text[:500]
    if case.status == 200:
        assert answer.json()["results"][0]["species"]
    else:
        assert set(answer.json()) == {"message", "field"}, answer.text[:500]
        assert case.says in answer.json()["message"]
    assert set(os.listdir(uploads)) == before, "an upload was left behind"
    _assert_still_serving(url, payloads)


@pytest.mark.parametrize("case", [case for case in CORPUS if case.cli], ids=lambda case: case.name)
def test_cli(case, corpus_roots, payloads, hostile_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(DATA_ENV, str(corpus_roots.data))
    monkeypatch.setenv(MODELS_ENV, str(corpus_roots.models))
    for name, value in URL_SETTINGS.items():
        monkeypatch.setenv(name, value)
    arguments = []
    for index, (_, payload) in enumerate(case.files):
        path = tmp_path / f"{index}-{payload}"
        path.write_bytes(payloads[payload])
        arguments.append(str(path))
    for name, value in _filled(case.fields, hostile_server).items():
        if name in ("urls", "data"):
            arguments.extend(value.split())
        else:
            arguments.extend([f"--{name}", value])

    started = time.monotonic()
    status, output, errors = _run_cli(["--quiet", "predict", *arguments], capsys)
    assert time.monotonic() - started < BOUND_S
    if case.status == 200:
        assert status == 0, errors
        assert json.loads(output)["results"][0]["species"]
    else:
        assert status == 2, output
        assert (case.cli_says or case.says) in errors


def _train_cases() -> list[tuple[str, str, str]]:
    """(option, bad value, words of the error) for every training option: a value of the wrong type
    for each, and a path that leaves the data folder for each path-like option."""
    wrong = {int: "many", float: "fast", bool: "perhaps", str: "not-a-choice"}
    cases = []
    for section in config.RUN_SECTIONS:
        for spec in config.option_specs(section).values():
            if spec.type is not str or spec.choices is not None:
                cases.append((spec.name, wrong[spec.type], spec.name))
    for name in ("images_directory", "splits_directory", "weights"):
        cases.append((name, "../../../etc", name))
        cases.append((name, "/etc/passwd", name))
    cases.append(("epochs", "-1", "epochs"))
    cases.append(("images_directory", "nowhere", "images_directory"))
    # A weights file that is missing (or a folder) was accepted with a 200, and the training failed.
    cases.append(("weights", "missing.weights.h5", "weights"))
    cases.append(("weights", "", "weights"))
    cases.append(("resume", "..", "resume"))
    cases.append(("resume", "2000-01-01_000000", "resume"))  # the symbolic link out of models/
    return cases


@pytest.mark.parametrize(("option", "value", "says"), _train_cases(), ids=str)
def test_bad_training_arguments(option, value, says, live, corpus_roots):
    """Refused by the server before any training starts (so nothing is written), and by the CLI."""
    url, _ = live
    runs_before = sorted(os.listdir(corpus_roots.models))
    answer = requests.post(f"{url}{MODEL_URL}/train/", data={option: value}, timeout=BOUND_S)
    assert answer.status_code == 422, answer.text[:500]
    assert answer.json()["field"] == says
    assert sorted(os.listdir(corpus_roots.models)) == runs_before


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["train", "--epochs", "many"], "--epochs"),
        (["train", "--use_validation", "perhaps"], "unrecognized arguments"),
        (["train", "--mode", "slow"], "--mode"),
        (["train", "--images_directory", "../../../etc", "--weights", "none"], "images_directory"),
        (["train", "--splits_directory", "/etc", "--weights", "none"], "splits_directory"),
        (["train", "--weights", "/etc/passwd"], "weights"),
        (["train", "--resume", ".."], "resume"),
        (["predict", "x.jpg", "--colour", "red"], "unrecognized arguments"),
    ],
)
def test_bad_cli_arguments(arguments, says, corpus_roots, monkeypatch, capsys):
    monkeypatch.setenv(DATA_ENV, str(corpus_roots.data))
    monkeypatch.setenv(MODELS_ENV, str(corpus_roots.models))
    # A training's lock files stay in models/ once it has asked for them, as a server's do: no run.
    locks = {admission.LOCK_FILE, admission.RESERVATION_FILE}
    runs_before = sorted(set(os.listdir(corpus_roots.models)) - locks)
    status, _, errors = _run_cli(arguments, capsys)
    assert status == 2
    assert says in errors
    assert sorted(set(os.listdir(corpus_roots.models)) - locks) == runs_before


@pytest.mark.parametrize(
    ("path", "arguments", "unknown"),
    [
        ("predict/", {"top-k": "3"}, "top-k"),
        ("predict/", {"models_dir": "/etc", "exec": "id"}, "exec"),
        ("train/", {"epoch": "5"}, "epoch"),
    ],
)
def test_unknown_http_arguments_are_refused(live, payloads, path, arguments, unknown):
    """DEEPaaS 2.6 (webargs 5) would drop them silently, and a misspelt option would be ignored."""
    url, _ = live
    photo = {"image": ("seed.jpg", payloads["seed.jpg"])} if path == "predict/" else None
    answer = requests.post(f"{url}{MODEL_URL}/{path}", files=photo, data=arguments, timeout=BOUND_S)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == unknown
    assert f"unknown argument {unknown!r}" in answer.json()["message"]
    query = requests.post(f"{url}{MODEL_URL}/{path}", files=photo, params=arguments, timeout=BOUND_S)
    assert query.status_code == 422, query.text


def _run_cli(arguments: list[str], capsys) -> tuple[int, str, str]:
    """seeds-tf in this process: (exit status, stdout, stderr). argparse errors exit with 2."""
    try:
        status = cli.main(arguments)
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_still_serving(url: str, payloads: dict[str, bytes]) -> None:
    answer = requests.post(
        f"{url}{MODEL_URL}/predict/", files={"image": ("seed.jpg", payloads["seed.jpg"])}, timeout=BOUND_S
    )
    assert answer.status_code == 200, answer.text[:500]


def _filled(fields: dict[str, str], server: str) -> dict[str, str]:
    closed = free_port()
    return {name: value.format(server=server, closed=closed) for name, value in fields.items()}


def _payloads(photo: bytes) -> dict[str, bytes]:
    """The files of the corpus, made here so the corpus needs no binary fixtures."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    picture = PIL.Image.fromarray(pixels)
    png = _encoded(picture, "PNG")

    corrupt = bytearray(_encoded(picture, "JPEG"))
    middle = len(corrupt) // 2
    corrupt[middle : middle + 256] = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()

    exif = picture.getexif()
    exif[0x0112] = 9  # an orientation that does not exist
    hostile_exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + b"\x12\x01\x03\x00\xff\xff\xff\x7f" * 8

    frames = [picture.convert("P"), picture.rotate(90).convert("P")]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], loop=0)
    return {
        "seed.jpg": photo,
        "text.jpg": b"%PDF-1.4 a document, not a picture, under an image name",
        "empty.jpg": b"",
        "truncated.jpg": photo[: len(photo) // 3],
        "truncated.png": png[: len(png) // 2],
        "bomb.png": _encoded(PIL.Image.new("1", (8000, 6000)), "PNG"),
        "dot.png": _encoded(PIL.Image.new("RGB", (1, 1), (120, 80, 40)), "PNG"),
        "strip.png": _encoded(PIL.Image.new("RGB", (20000, 1), (120, 80, 40)), "PNG"),
        "corrupt.jpg": bytes(corrupt),
        "deep.png": _encoded(PIL.Image.fromarray(pixels[..., 0].astype(np.uint16) * 257), "PNG"),
        "cmyk.jpg": _encoded(picture.convert("CMYK"), "JPEG"),
        "palette.png": _encoded(picture.convert("P"), "PNG", transparency=0),
        "animated.gif": animated.getvalue(),
        "exif.jpg": _encoded(picture, "JPEG", exif=hostile_exif),
        "orientation.jpg": _encoded(picture, "JPEG", exif=exif),
        "huge.jpg": rng.integers(0, 256, CLIENT_MAX_SIZE + 1024, dtype=np.uint8).tobytes(),
    }


def _encoded(picture: PIL.Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _handler(photo: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(ConnectionError):
                getattr(self, "_" + self.path.strip("/").replace(".", "_"), self._missing)()

        def _seed_jpg(self) -> None:
            self._answer(200, photo, "image/jpeg")

        def _page_html(self) -> None:
            self._answer(200, b"<html><body>seeds</body></html>", "text/html")

        def _stall(self) -> None:
            time.sleep(BOUND_S / 2)

        def _endless(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            while True:
                self.wfile.write(b"\xff" * 65536)

        def _loop(self) -> None:
            self._redirect("/loop")

        def _refused(self) -> None:
            # Loopback, but not the allowed 127.0.0.1: the guard must refuse it.
            self._redirect("http://127.0.0.2:9/x.jpg")

        def _missing(self) -> None:
            self._answer(404, b"no such thing", "text/plain")

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler
