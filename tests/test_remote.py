"""Runs copied to the user's storage with real rclone, against a real WebDAV server on loopback
(`rclone serve webdav`, standing in for the platform's Nextcloud), configured as the platform
configures its `rshare` remote: through RCLONE_CONFIG_RSHARE_* variables."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from seeds_tf.core import config, runs
from seeds_tf.core.errors import InputError
from seeds_tf.hosting import admission, remote
from seeds_tf.learning import training
from tests.deepaas_harness import free_port
from tests.helpers import SMALL_OPTIONS, unstarted_run

USER, PASSWORD = "botanist", "s3cret-seeds"
RCLONE = shutil.which("rclone") or "rclone"  # make test installs Debian's rclone


@contextlib.contextmanager
def webdav_server(folder: Path) -> Iterator[str]:
    """`rclone serve webdav` of `folder` with basic auth on a free loopback port; yields its URL and
    stops it by its process id."""
    port = free_port()
    server = [
        "serve",
        "webdav",
        str(folder),
        "--addr",
        f"127.0.0.1:{port}",
        "--user",
        USER,
        "--pass",
        PASSWORD,
    ]
    process = subprocess.Popen(
        [RCLONE, *server],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("rclone serve webdav did not start")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def configure_rshare(monkeypatch, tmp_path: Path, url: str, password: str) -> None:
    """The platform's remote: RCLONE_CONFIG_RSHARE_* variables, with an empty config file."""
    obscured = subprocess.run(
        [RCLONE, "obscure", password], capture_output=True, text=True, check=True
    ).stdout.strip()
    (tmp_path / "rclone.conf").touch()
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "rclone.conf"))
    monkeypatch.setenv("RCLONE_CONFIG_RSHARE_TYPE", "webdav")
    monkeypatch.setenv("RCLONE_CONFIG_RSHARE_URL", url)
    monkeypatch.setenv("RCLONE_CONFIG_RSHARE_VENDOR", "other")
    monkeypatch.setenv("RCLONE_CONFIG_RSHARE_USER", USER)
    monkeypatch.setenv("RCLONE_CONFIG_RSHARE_PASS", obscured)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_finished_run_arrives_whole_on_the_remote(data_roots, tmp_path, monkeypatch):
    """The copy, which may take hours, is made once the training slot is free again."""
    storage = tmp_path / "nextcloud"
    storage.mkdir()
    copy = remote.upload_run

    def copy_once_the_slot_is_free(folder, destination):
        admission.check_no_training(data_roots.models)  # raises while a training holds the slot
        return copy(folder, destination)

    monkeypatch.setattr(remote, "upload_run", copy_once_the_slot_is_free)
    with webdav_server(storage) as url:
        configure_rshare(monkeypatch, tmp_path, url, PASSWORD)
        options = {**SMALL_OPTIONS, "upload_to": "rshare:/models"}
        result = training.train(config.RunConfig.from_options(**options), data_roots)

    layout = runs.RunLayout(data_roots.models / result.run_id)
    assert layout.is_complete()
    destination = f"rshare:/models/{result.run_id}"
    assert result.upload == {"destination": destination, "status": "copied", "error": ""}
    assert tree(storage / "models" / result.run_id) == tree(layout.root)


def test_a_bare_remote_receives_the_run_in_its_starting_folder(tmp_path, monkeypatch):
    """`upload_to=remote:` copied to `remote:/<run id>`, the root of an SFTP or local remote, where
    the user may not write. A local remote starts in the working folder."""
    run = tmp_path / "models" / "2026-01-01_000000"
    run.mkdir(parents=True)
    (run / "conf.json").write_text("{}")
    (tmp_path / "rclone.conf").touch()
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "rclone.conf"))
    monkeypatch.setenv("RCLONE_CONFIG_DISK_TYPE", "local")
    storage = tmp_path / "storage"
    storage.mkdir()
    monkeypatch.chdir(storage)
    result = remote.upload_run(run, "disk:")
    assert (result.destination, result.status) == ("disk:2026-01-01_000000", "copied")
    assert tree(storage / run.name) == tree(run)
    assert remote.upload_run(run, f"disk:{tmp_path / 'rooted'}/").status == "copied"  # a path: below it
    assert tree(tmp_path / "rooted" / run.name) == tree(run)


def test_a_refused_copy_is_reported_and_the_local_run_kept(roots, tiny_run, tmp_path, monkeypatch):
    """The copy a training makes once its run is complete (the test above), refused by the remote:
    the failure is reported with rclone's reason, nothing arrives, the local run is untouched. The
    tiny run stands in for a just-finished one."""
    storage = tmp_path / "nextcloud"
    storage.mkdir()
    layout = runs.RunLayout(roots.models / tiny_run)
    before = tree(layout.root)
    with webdav_server(storage) as url:
        configure_rshare(monkeypatch, tmp_path, url, "wrong-password")
        upload = remote.upload_run(layout.root, "rshare:/models").to_dict()

    assert upload["destination"] == f"rshare:/models/{tiny_run}"
    assert upload["status"] == "failed"
    assert "401" in upload["error"] or "Unauthorized" in upload["error"]
    assert not (storage / "models" / tiny_run).exists()
    assert layout.is_complete()
    assert tree(layout.root) == before


def test_a_timed_out_rclone_is_reported_in_its_own_words():
    """A timed-out process's output is bytes, even from a run in text mode: the report of an upload
    past its 6 h, or of a `listremotes` stuck on a password prompt, was a TypeError instead."""
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:  # an rclone that logs and runs on
        remote._rclone("rcd", "--rc-addr", f"127.0.0.1:{free_port()}", "--rc-no-auth", "-v", timeout=3)
    assert isinstance(timed_out.value.stderr, bytes)
    assert "Serving remote control on http://127.0.0.1:" in remote._reason(timed_out.value)


@pytest.mark.parametrize("destination", ["no-colon-here", ":leading", "rshare\x00:/x"])
def test_a_malformed_destination_is_refused_before_training(destination):
    with pytest.raises(InputError, match="expected an rclone destination") as raised:
        remote.check_destination(destination)
    assert raised.value.field == "upload_to"


def test_a_training_with_a_bad_destination_writes_no_run(data_roots):
    before = runs.complete_runs(data_roots.models)
    with pytest.raises(InputError, match="upload_to"):
        training.train(config.RunConfig.from_options(**SMALL_OPTIONS, upload_to="nowhere"), data_roots)
    assert runs.complete_runs(data_roots.models) == before
    assert runs.incomplete_runs(data_roots.models) == []


def test_a_resumed_run_whose_own_destination_is_bad_is_refused_before_training(data_roots):
    layout = unstarted_run(data_roots, {**SMALL_OPTIONS, "upload_to": "nowhere"})
    before = sorted(layout.root.rglob("*"))
    with pytest.raises(InputError, match="upload_to"):
        training.train(config.RunConfig.from_options(**SMALL_OPTIONS, resume=layout.run_id), data_roots)
    assert sorted(layout.root.rglob("*")) == before
    assert runs.incomplete_runs(data_roots.models) == [layout.run_id]


def test_a_destination_on_a_remote_rclone_does_not_know_is_refused_before_training(
    data_roots, tmp_path, monkeypatch
):
    """A misspelt remote showed only when the finished run was copied, hours later. The check asks
    rclone which remotes it has configured; it contacts none (the URL here serves nothing)."""
    configure_rshare(monkeypatch, tmp_path, "http://127.0.0.1:9", PASSWORD)
    remote.check_destination("rshare:/models")
    before = runs.complete_runs(data_roots.models)
    with pytest.raises(InputError) as raised:
        training.train(config.RunConfig.from_options(**SMALL_OPTIONS, upload_to="rshar:/models"), data_roots)
    assert raised.value.field == "upload_to"
    assert "no rclone remote named 'rshar' is configured (configured: rshare)" in raised.value.problem
    assert runs.complete_runs(data_roots.models) == before
    assert runs.incomplete_runs(data_roots.models) == []


def test_the_platform_s_rshare_without_a_storage_url_is_refused_before_training(tmp_path, monkeypatch):
    """AI4OS defines rshare in every deployment, with an empty URL when the user configured no
    storage: rclone lists it, and the copy failed only after the training ("unsupported protocol
    scheme"). It is refused when the training is asked for."""
    configure_rshare(monkeypatch, tmp_path, "", "")
    with pytest.raises(InputError) as raised:
        remote.check_destination("rshare:/models")
    assert raised.value.field == "upload_to"
    assert "RCLONE_CONFIG_RSHARE_URL is empty" in raised.value.problem
