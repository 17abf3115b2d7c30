"""The command lines: deepaas-cli against the installed plugin, and seeds-tf itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image

from seeds_tf import cli
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV
from tests.helpers import SMALL_OPTIONS, seed_photo

BIN = Path(sys.executable).parent


def _run(command: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )


def _env(roots) -> dict[str, str]:
    return {DATA_ENV: str(roots.data), MODELS_ENV: str(roots.models), "DEEPAAS_V2_MODEL": "seeds_tf"}


def test_deepaas_cli_predict(roots, tiny_run, tmp_path):
    output = tmp_path / "prediction.json"
    done = _run(
        [
            str(BIN / "deepaas-cli"),
            "--deepaas_method_output",
            str(output),
            "predict",
            "--image",
            str(seed_photo(roots)),
            "--top_k",
            "3",
        ],
        _env(roots),
    )
    assert done.returncode == 0, done.stderr
    prediction = json.loads(output.read_text())
    assert prediction["run_id"] == tiny_run
    assert len(prediction["results"][0]["species"]) == 3


def test_deepaas_cli_train(roots, tiny_run, tmp_path):
    output = tmp_path / "training.json"
    flags = [f"--{name}={value}" for name, value in SMALL_OPTIONS.items()]
    done = _run(
        [str(BIN / "deepaas-cli"), "--deepaas_method_output", str(output), "train", *flags],
        _env(roots),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())["result"]["output"]
    assert result["run_id"] != tiny_run
    assert (roots.models / result["run_id"] / "run.json").is_file()


def test_seeds_tf_predict_and_runs(roots, tiny_run):
    done = _run(
        [str(BIN / "seeds-tf"), "--quiet", "predict", str(seed_photo(roots)), str(seed_photo(roots, 1))],
        _env(roots),
    )
    assert done.returncode == 0, done.stderr
    prediction = json.loads(done.stdout)
    assert [r["image"] for r in prediction["results"]] == [str(seed_photo(roots)), str(seed_photo(roots, 1))]
    assert len(prediction["results"][0]["species"]) == 5
    listing = _run([str(BIN / "seeds-tf"), "--quiet", "runs"], _env(roots))
    assert [run["run_id"] for run in json.loads(listing.stdout)["runs"]] == [tiny_run]
    assert json.loads(listing.stdout)["broken"] == []


def test_seeds_tf_reports_mistakes_with_exit_status_2(roots, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    # The process's exit status and stderr; tests/test_hostile_inputs.py tries many more mistakes.
    cases = [
        (["predict", str(junk)], "image: "),
        (["train", "--images_directory", "nowhere", "--weights", "none"], "images_directory"),
        (["train", "--epochs", "many"], "--epochs: invalid int value: 'many'"),
    ]
    for arguments, message in cases:
        # Python's own record of each import it makes, on stderr.
        done = _run(
            [str(BIN / "seeds-tf"), "--quiet", *arguments], {**_env(roots), "PYTHONPROFILEIMPORTTIME": "1"}
        )
        assert done.returncode == 2, (arguments, done.stderr)
        assert message in done.stderr, (arguments, done.stderr)
        assert "Traceback" not in done.stderr
        # A training's mistakes are told before TensorFlow loads: they took ten seconds to come.
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert ("tensorflow" in imported) == (arguments[0] == "predict"), arguments


def test_seeds_tf_predict_writes_the_heatmap_into_a_new_folder_or_says_why_it_cannot(roots, tmp_path, capsys):
    """A missing folder ended in a Python traceback: it is made, as identify makes its output's."""
    heatmap = tmp_path / "new" / "folder" / "seed.png"
    assert cli.main(["--quiet", "predict", str(seed_photo(roots)), "--heatmap", str(heatmap)]) == 0
    with PIL.Image.open(heatmap) as png:
        assert png.format == "PNG"
    capsys.readouterr()
    under_a_file = heatmap / "seed.png"
    assert cli.main(["--quiet", "predict", str(seed_photo(roots)), "--heatmap", str(under_a_file)]) == 2
    assert f"seeds-tf: error: heatmap: cannot write {str(under_a_file)!r}: " in capsys.readouterr().err
