"""seeds-tf identify on one machine: inputs, both output formats, failures as rows, resuming, and a
job killed (SIGKILL) in the middle, on a collection of real images answered by the tiny run."""

from __future__ import annotations

import csv
import dataclasses
import functools
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import PIL.Image
import pytest

from seeds_tf import cli
from seeds_tf.core import config
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import MODELS_ENV
from seeds_tf.data import images, sources
from seeds_tf.prediction import batch, inference
from tests.loopback import http_server

COPIES = 3
"""Copies of the tiny dataset's images in the collection: 192 images, enough chunks to kill a job
in the middle of."""


@pytest.fixture(scope="module")
def collection(tmp_path_factory, session_roots) -> Path:
    """A folder of the tiny dataset's images (COPIES times, in sub-folders), one broken file,
    hidden files that are no inputs, and links to folders."""
    folder = tmp_path_factory.mktemp("collection")
    for copy in range(COPIES):
        shutil.copytree(session_roots.data / "tiny" / "images", folder / f"box{copy}")
    (folder / "box0" / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image suffix: not an input\n")
    # Hidden, not inputs: a Mac's metadata beside a photo, and a photo in a USB disk's bin.
    (folder / "box1" / "._0000.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (folder / ".Trash-1000").mkdir()
    shutil.copy(sorted((folder / "box2").rglob("*.jpg"))[0], folder / ".Trash-1000" / "0000.jpg")
    # Linked folders are followed: one elsewhere (its photo an input), and one back up (no loop).
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(folder / ".Trash-1000" / "0000.jpg", elsewhere / "0000.jpg")
    (folder / "box0" / "linked").symlink_to(elsewhere)
    (folder / "box0" / "up").symlink_to(folder)
    return folder


@pytest.fixture(scope="module")
def answered(tmp_path_factory, session_roots, tiny_run, collection) -> tuple[batch.Summary, list[dict]]:
    """The collection identified once, into JSON Lines: the reference the other tests compare to."""
    output = tmp_path_factory.mktemp("answers") / "answers.jsonl"
    options = batch.IdentifyOptions(timestamp=tiny_run, top_k=3, batch_size=16, chunk_size=40)
    summary = batch.identify(session_roots, collection, output, options)
    return summary, [json.loads(line) for line in output.read_text().splitlines()]


def _images(collection: Path) -> list[Path]:
    hidden = {collection / "box1" / "._0000.jpg", collection / ".Trash-1000" / "0000.jpg"}
    linked = collection / "box0" / "linked" / "0000.jpg"  # rglob follows no link
    return sorted([linked, *(path for path in collection.rglob("*.jpg") if path not in hidden)])


def test_a_folder_is_answered_as_the_api_answers_each_image(
    session_roots, tiny_run, collection, answered, caplog
):
    summary, rows = answered
    images = _images(collection)
    with caplog.at_level("WARNING", logger="seeds_tf.prediction.batch"):
        assert len(batch.list_inputs(collection)) == len(images)
    assert "Left out 1 files of" in caplog.text and "no images by their suffix (.txt: 1)" in caplog.text
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (
        len(images),
        len(images) - 1,
        1,
        0,
    )
    assert [row["input"] for row in rows] == [path.relative_to(collection).as_posix() for path in images]
    broken = rows[[row["input"] for row in rows].index("box0/broken.jpg")]
    assert "not an image" in broken["error"] and broken["species"] == [] and broken["decision"] is None
    assert not (collection.parent / "answers.jsonl.parts").exists()

    sample = [row for row in rows if not row["error"]][::50]
    uploads = [(row["input"], (collection / row["input"]).read_bytes()) for row in sample]
    options = config.load(config.PredictConfig, timestamp=tiny_run, top_k=3)
    expected = inference.predict(session_roots, inference.RunCache(), options, uploads)["results"]
    for row, result in zip(sample, expected, strict=True):
        assert (row["run_id"], row["engine"]) == (tiny_run, "keras")
        assert [s["label"] for s in row["species"]] == [s["label"] for s in result["species"]]
        assert [s["probability"] for s in row["species"]] == pytest.approx(
            [s["probability"] for s in result["species"]], abs=1e-5
        )
        assert [g["genus"] for g in row["genera"]] == [g["genus"] for g in result["genera"]]
        # The same trust, the reference specimens' evidence included (the tiny run has them).
        assert row["neighbours_agree"] is not None
        for field in ("decision", "out_of_distribution", "neighbours_agree"):
            assert row[field] == result[field], field
        for field in ("ood_score", "specimen_distance"):
            assert row[field] == pytest.approx(result[field], abs=1e-5), field


def test_a_manifest_of_paths_and_urls_gives_csv_rows_with_their_errors(
    session_roots, tiny_run, collection, answered, tmp_path, monkeypatch, caplog
):
    _, rows = answered
    by_input = {row["input"]: row for row in rows}
    chosen = [row["input"] for row in rows if not row["error"]][:4]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(collection))
    monkeypatch.setenv(sources.ALLOW_ENV, "127.0.0.1")
    with http_server(handler) as base:
        manifest = tmp_path / "manifest.csv"
        with open(manifest, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["Path", " URL", "collector"])  # a spreadsheet's headers
            writer.writerow([str(collection / chosen[0]), "", "A"])
            writer.writerow(["", f"{base}/{chosen[1]}", "B"])
            writer.writerow(["", f"{base}/missing.jpg", "C"])
            writer.writerow(["missing.jpg", "", "D"])  # relative to the manifest's folder
        output = tmp_path / "answers.csv"
        with caplog.at_level("INFO", logger="seeds_tf.prediction.batch"):
            summary = batch.identify(
                session_roots, manifest, output, batch.IdentifyOptions(timestamp=tiny_run, top_k=3)
            )
    assert (summary.done, summary.failed) == (2, 2)
    assert "identify: 4/4 images (100%)" in caplog.text
    with open(output, newline="") as stream:
        reader = csv.DictReader(stream)
        table = list(reader)
    assert reader.fieldnames[:7] == [
        "input", "species_1", "species_1_probability", "species_2", "species_2_probability",
        "species_3", "species_3_probability",
    ]  # fmt: skip
    assert "404" in table[2]["error"]
    assert (
        table[3]["error"]
        == f"cannot read 'missing.jpg' ({tmp_path / 'missing.jpg'}): No such file or directory"
    )
    for line, name in zip(table[:2], chosen[:2], strict=True):
        reference = by_input[name]
        assert line["species_1"] == reference["species"][0]["label"]
        assert float(line["species_1_probability"]) == pytest.approx(reference["species"][0]["probability"])
        assert line["genus_1"] == reference["genera"][0]["genus"] and line["error"] == ""


def test_a_rerun_skips_what_is_answered_and_refuses_an_output_of_another_run(
    session_roots, tiny_run, collection, tmp_path
):
    images = _images(collection)
    list_file = tmp_path / "images.txt"
    listed = [images[0], collection / "box0" / "broken.jpg", *images[1:5], images[0]]  # one twice
    # A comment and a blank line are no entries; a photo named #1.jpg is listed as ./#1.jpg.
    shutil.copy(images[5], tmp_path / "#1.jpg")
    list_file.write_text("# seeds of 2024\n\n" + "".join(f"{path}\n" for path in listed))
    # A name with a glob's brackets: the temporaries a kill left of this output are removed, and
    # those of answers1.jsonl, which the unescaped name matched, are another job's to keep, as is
    # the swap file of an editor that has the output open.
    output = tmp_path / "answers[1].jsonl"
    stale, others = tmp_path / ".answers[1].jsonl.k2j4x9qa.jsonl", tmp_path / ".answers1.jsonl.k2j4x9qa.jsonl"
    swap = tmp_path / ".answers[1].jsonl.swp"
    for path in (stale, others, swap):
        path.touch()
    options = batch.IdentifyOptions(timestamp=tiny_run, top_k=3, chunk_size=4)
    first = batch.identify(session_roots, list_file, output, options)
    assert not stale.exists() and others.exists() and swap.exists()
    list_file.write_text(list_file.read_text() + "./#1.jpg\n")
    second = batch.identify(session_roots, list_file, output, options)
    assert (first.total, first.done, first.failed) == (6, 5, 1)  # a photo listed twice is one row
    assert (second.skipped, second.done, second.failed) == (5, 1, 1)  # the failure is retried
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(row["input"] for row in rows) == sorted({*map(str, listed), "./#1.jpg"})

    other = tmp_path / "other.jsonl"
    other.write_text(
        json.dumps({"input": "a.jpg", "run_id": "2020-01-01_000000", "engine": "keras", "error": ""}) + "\n"
    )
    with pytest.raises(InputError, match=r"output: .* holds answers of run 2020-01-01_000000"):
        batch.identify(session_roots, list_file, other, options)
    with pytest.raises(InputError, match=r"output: .* has answers of 3 species, not 2 \(another top_k\?\)"):
        batch.identify(session_roots, list_file, output, dataclasses.replace(options, top_k=2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="input: no image in"):
        batch.identify(session_roots, tmp_path / "empty", output, options)
    # Outputs that cannot be written are refused before any image is answered, not after.
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(InputError, match=r"output: .*folder.csv' is a folder: name a file in it"):
        batch.identify(session_roots, list_file, tmp_path / "folder.csv", options)
    with pytest.raises(InputError, match=r"output: cannot write .*images.txt/answers.csv': Not a directory"):
        batch.identify(session_roots, list_file, list_file / "answers.csv", options)


def test_an_input_or_output_of_no_job_is_refused_saying_so(session_roots, tiny_run, collection, tmp_path):
    """A photo given as the input, a binary file taken for a list, and an output file that holds
    other JSON Lines: a clear refusal each, before any image is answered."""
    photo = _images(collection)[0]
    options = batch.IdentifyOptions(timestamp=tiny_run, top_k=3)
    output = tmp_path / "answers.jsonl"
    with pytest.raises(InputError, match=r"input: .*0000.jpg' is an image: give its folder, or a list"):
        batch.identify(session_roots, photo, output, options)
    for name in ("photos.txt", "photos.xlsx"):
        shutil.copy(photo, tmp_path / name)
        with pytest.raises(InputError, match=f"input: .*{name}' holds binary data"):
            batch.identify(session_roots, tmp_path / name, output, options)
    assert not output.exists()
    for line in ('{"input": "a.jpg"}', "[1, 2]", "not JSON"):
        output.write_text(f"\n{line}\n")
        with pytest.raises(InputError, match=r"output: .*answers.jsonl' line 2 is not an answer of seeds-tf"):
            batch.identify(session_roots, collection, output, options)
        assert output.read_text() == f"\n{line}\n"  # left as it was


def test_a_job_of_which_every_image_failed_exits_1_after_its_summary(
    session_roots, tiny_run, collection, tmp_path, capsys
):
    """Paths relative to the wrong folder fail every row: a script must not take that for done."""
    list_file = tmp_path / "images.txt"
    list_file.write_text("box0/broken.jpg\nbox1/0000.jpg\n")  # relative to the collection, not here
    output = tmp_path / "answers.csv"
    argv = ["--models-dir", str(session_roots.models), "identify", str(list_file), "--output", str(output)]
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--run", tiny_run])
    assert exited.value.code == 1
    printed, errors = capsys.readouterr()
    assert (json.loads(printed)["done"], json.loads(printed)["failed"]) == (0, 2)
    assert f"every one of the 2 images failed: see the error column of {str(output)!r}" in errors
    with open(output, newline="") as stream:
        assert all("No such file or directory" in row["error"] for row in csv.DictReader(stream))

    list_file.write_text(f"box0/broken.jpg\n{_images(collection)[0]}\n")
    assert cli.main([*argv, "--run", tiny_run]) == 0  # answers in the output: a job done, failures as rows
    summary = json.loads(capsys.readouterr()[0])
    assert (summary["done"], summary["failed"]) == (1, 1)


def test_names_that_are_not_utf8_are_answered_kept_and_resumed(session_roots, tiny_run, collection, tmp_path):
    """A photo named in Latin-1 (old archives and cameras do that) is answered like any other: the
    CSV keeps its name's bytes, JSON Lines escapes them, a list file finds it, and a rerun skips it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    latin = os.fsdecode(b"caf\xe9.jpg")
    for name in (latin, "plain.jpg"):
        shutil.copy(_images(collection)[0], folder / name)
    options = batch.IdentifyOptions(timestamp=tiny_run, top_k=3, chunk_size=1)
    output = tmp_path / "answers.csv"
    first = batch.identify(session_roots, folder, output, options)
    assert (first.done, first.failed) == (2, 0)
    assert b"caf\xe9.jpg," in output.read_bytes()
    # Parts retired by a merge and left by a kill before they were deleted are no rows of the job.
    retired = tmp_path / ".answers.csv.merged"
    retired.mkdir()
    shutil.copy(output, retired / "chunk-000000.csv")
    (retired / "chunk-000001.csv").write_text("input,error\nplain.jpg,an older failure\n")
    again = batch.identify(session_roots, folder, output, options)
    assert (again.skipped, again.done) == (2, 0)
    assert not retired.exists()
    with open(output, newline="", errors="surrogateescape") as stream:
        table = [(row["input"], row["error"]) for row in csv.DictReader(stream)]
    assert table == [(latin, ""), ("plain.jpg", "")]
    # Another folder whose photos are named alike (cameras number them IMG_0001 in every folder):
    # its answers are not the output's, which is refused rather than passed off as theirs.
    (tmp_path / "other").mkdir()
    shutil.copy(_images(collection)[1], tmp_path / "other" / "plain.jpg")
    with pytest.raises(
        InputError, match=r"output: .* answers 'plain.jpg' from .*photos/plain.jpg', not .*other/"
    ):
        batch.identify(session_roots, tmp_path / "other", output, options)

    listed = tmp_path / "photos.txt"
    listed.write_bytes(b"".join(os.fsencode(folder / name) + b"\n" for name in (latin, "plain.jpg")))
    rows = tmp_path / "listed.jsonl"
    assert batch.identify(session_roots, listed, rows, options).done == 2
    assert [json.loads(line)["input"] for line in rows.read_text().splitlines()] == [
        str(folder / latin),
        str(folder / "plain.jpg"),
    ]
    assert "caf\\udce9.jpg" in rows.read_text()


def test_a_job_killed_in_the_middle_loses_at_most_its_chunk_and_resumes(
    session_roots, tiny_run, collection, answered, tmp_path
):
    """A real `seeds-tf identify` process killed with SIGKILL as soon as it has written a part:
    what is on disk is whole, and the rerun completes the same answers."""
    output = tmp_path / "answers.csv"
    parts = tmp_path / "answers.csv.parts"
    command = [
        sys.executable, "-m", "seeds_tf.cli", "--quiet", "identify", str(collection), "--output", str(output),
        "--run", tiny_run, "--top-k", "3", "--batch-size", "8", "--chunk-size", "16",
    ]  # fmt: skip
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            command, env={**os.environ, MODELS_ENV: str(session_roots.models)}, stderr=stderr
        )
    try:
        deadline = time.monotonic() + 120
        while not list(parts.glob("chunk-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    written = sorted(parts.glob("chunk-*"))
    assert process.returncode == -signal.SIGKILL, log.read_text()
    assert written and not output.exists(), "the job should be killed in the middle"
    images = _images(collection)
    assert len(written) < len(images) / 16
    kept = []
    for part in written:
        with open(part, newline="") as stream:
            rows = list(csv.DictReader(stream))
        assert len(rows) == 16
        kept += rows

    summary = batch.identify(
        session_roots, collection, output, batch.IdentifyOptions(timestamp=tiny_run, top_k=3, chunk_size=16)
    )
    assert summary.skipped == sum(1 for row in kept if not row["error"])  # failures are retried
    assert summary.skipped + summary.done + summary.failed == len(images)
    with open(output, newline="") as stream:
        table = list(csv.DictReader(stream))
    _, reference = answered
    assert [line["input"] for line in table] == [row["input"] for row in reference]
    for line, row in zip(table, reference, strict=True):
        assert line["species_1"] == (row["species"][0]["label"] if row["species"] else "")
        assert bool(line["error"]) == bool(row["error"])


def test_large_scans_are_read_ahead_and_chunked_within_a_budget_of_bytes(tmp_path, monkeypatch):
    """Scans of hundreds of megabytes (here 1 MB files against a 4 MB budget): the reads ahead and
    the chunks crossing into tf.data hold the budget and one file more, not 2 * threads files and a
    batch of them (100 scans of 105 MB took 18.5 GB of memory before, 2.3 GB now)."""
    megabyte = 2**20
    monkeypatch.setattr(batch, "_BUDGET_BYTES", 4 * megabyte)
    items = []
    for index in range(40):
        path = tmp_path / f"scan{index:02d}.tif"
        path.write_bytes(os.urandom(megabyte))
        items.append(batch.Item(path.name, str(path)))
    policy = sources.FetchPolicy.from_env()
    tracemalloc.start()
    try:
        reads = batch.read_all(items, policy, threads=16)
        chunks = []
        while chunk := batch._take(reads, 64, batch._BUDGET_BYTES):
            chunks.append([name for name, _, _ in chunk])
            assert sum(len(data) for _, data, _ in chunk) <= 5 * megabyte
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [name for chunk in chunks for name in chunk] == [item.input for item in items]
    assert peak < 12 * megabyte, f"{peak / megabyte:.1f} MB held at once"


def test_a_camera_photo_over_the_apis_limit_is_answered_reduced():
    """50-megapixel camera photos (digitising a collection) are answered, their JPEG decoded at half
    size: not a row of errors per photo. The API still refuses them."""
    photo = io.BytesIO()
    PIL.Image.new("RGB", (8000, 5200), (120, 90, 60)).save(photo, "JPEG")
    pixels, error = batch.decode("camera.jpg", photo.getvalue(), "")
    assert error == "" and pixels.shape == (2600, 4000, 3)
    assert pixels[0, 0].tolist() == pytest.approx([120, 90, 60], abs=2)
    with pytest.raises(InputError, match="8000x5200 pixels, more than the limit of 40000000"):
        images.decode_image(photo.getvalue(), "image", "camera.jpg")
