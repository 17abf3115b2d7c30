"""The package installs and works outside a checkout, and DEEPaaS finds it."""

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package built as pip builds it; the build's output (verbose: the build backend's
    warnings included) is kept beside it in build.log."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--verbose",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (out / "build.log").write_text(done.stdout + done.stderr)
    (built,) = out.glob("seeds_tf-*.whl")
    return built


def test_the_package_builds_without_warnings_of_the_build_backend(wheel):
    """Every install of the service (`make serve`, the image) builds it: a warning there is noise a
    user reads, e.g. setuptools' deprecation of license classifiers beside the SPDX `license`."""
    log = (wheel.parent / "build.log").read_text()
    assert "Successfully built seeds_tf" in log
    assert [line for line in log.splitlines() if "Warning" in line] == []


def test_the_wheel_carries_the_config_as_a_real_file(wheel):
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo("seeds_tf/core/config.yaml")
        assert archive.read(info) == (ROOT / "etc" / "config.yaml").read_bytes()
        entry_points = archive.read(next(n for n in archive.namelist() if n.endswith("entry_points.txt")))
    assert "[deepaas.v2.model]\nseeds_tf = seeds_tf.api" in entry_points.decode()
    assert "seeds-tf = seeds_tf.cli:main" in entry_points.decode()


def test_a_non_editable_install_loads_its_config_and_uses_its_own_folders(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    script = (
        "import json, seeds_tf, seeds_tf.core.config as c, seeds_tf.core.paths as p;"
        "print(json.dumps([seeds_tf.__file__, c.load(c.PredictConfig).top_k,"
        " str(p.Roots.from_env().models)]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDS_TF_")}
    env |= {"PYTHONPATH": str(target), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    module, top_k, models = json.loads(done.stdout)
    assert module.startswith(str(target))
    assert top_k == 5
    assert models == str(tmp_path / "xdg" / "seeds_tf" / "models")


def test_deepaas_finds_the_plugin_as_a_module():
    (entry,) = importlib.metadata.entry_points(group="deepaas.v2.model", name="seeds_tf")
    assert entry.value == "seeds_tf.api"
    module = entry.load()
    for name in ("get_metadata", "warm", "get_predict_args", "predict", "get_train_args", "train"):
        assert callable(getattr(module, name))


def test_importing_the_plugin_does_not_load_tensorflow():
    """The DEEPaaS server process imports the plugin for metadata and arguments only."""
    script = "import sys, seeds_tf.api; seeds_tf.api.get_predict_args(); print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


KNOWN_FIXES = {
    "keras": (
        "3.12",
        "safe-mode bypasses when loading model files (CVE-2025-1550 fixed in 3.9, CVE-2025-8747 in 3.11)",
    ),
    "pillow": (
        "11.3",
        "decoder and encoder memory errors (CVE-2024-28219 fixed in 10.3, CVE-2025-48379 in 11.3)",
    ),
    "aiohttp": (
        "3.12.14",
        "request smuggling and parser bugs (CVE-2024-52304 fixed in 3.10.11, CVE-2025-53643 in 3.12.14)",
    ),
    "requests": ("2.32.4", ".netrc credential leak to redirected hosts (CVE-2024-47081, fixed in 2.32.4)"),
    "urllib3": (
        "2.6",
        "redirect and decompression bombs (CVE-2025-50181 fixed in 2.5, CVE-2025-66471 in 2.6)",
    ),
}
"""The libraries that parse untrusted input, with the release that fixed their known advisories."""


@pytest.mark.parametrize("package", sorted(KNOWN_FIXES))
def test_untrusted_input_parsers_exclude_releases_with_known_advisories(package):
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    fixed, advisories = KNOWN_FIXES[package]
    (declared,) = [
        Requirement(line) for line in requires("seeds_tf") if Requirement(line).name.lower() == package
    ]
    lowest = min(Version(spec.version) for spec in declared.specifier if spec.operator == ">=")
    assert lowest >= Version(fixed), f"setup.cfg admits {package} {lowest}: {advisories}"
    assert Version(version(package)) >= Version(fixed), (
        f"installed {package} {version(package)}: {advisories}"
    )
