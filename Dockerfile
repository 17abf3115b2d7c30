# seeds_tf: the AI4OS (DEEP) module image, pre-trained and trainable.
#
#   docker build -t seeds_tf:cpu .                                          # CPU (the default base tag)
#   docker build --build-arg tag=2.21.0-gpu -t seeds_tf:gpu .               # GPU, as the platform's CI does
#   docker build --build-arg MODEL_SHA256=<sha256> -t seeds_tf:cpu .        # pin the published model
#   docker build --build-arg MODEL_URL= -t seeds_tf:trainable .             # no model baked in
#
# The platform runs `deep-start --deepaas` (the CMD here does the same): it starts `deepaas-run` with
# only the listen address and port, and DEEPaaS reads everything else from /etc/deepaas/deepaas.conf.
# README.md, "Deploy on AI4OS", has the details.

ARG tag=2.21.0
FROM tensorflow/tensorflow:${tag}

LABEL org.opencontainers.image.title="seeds_tf" \
      org.opencontainers.image.description="Seed identification with a Keras classifier, served by DEEPaaS" \
      org.opencontainers.image.source="https://github.com/seeds-tf/seeds_tf" \
      org.opencontainers.image.licenses="Apache-2.0"

# deep-start, pinned to a commit of ai4os/deep-start (its VERSION 2.2.0). The published seeds model
# (Xception, 743 species) is imported at build time unless MODEL_URL is empty; MODEL_SHA256 makes the
# build refuse any other tarball. `user` runs the service: deep-start --deepaas needs no root, but
# its IDE modes (--jupyter, --vscode) install software at start: build those with user=root.
ARG deep_start_ref=e0c13017530d2fbccd0c69d9f02ad8faef92b223
ARG MODEL_URL=https://api.cloud.ifca.es:8080/swift/v1/seeds-tf/seeds.tar.xz
ARG MODEL_SHA256=""
ARG user=10001
# The DEEPaaS settings: etc/deepaas-serve-only.conf turns the train endpoint off for public images.
ARG deepaas_conf=etc/deepaas.conf

ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SEEDS_TF_DATA_DIR=/srv/seeds_tf/data \
    SEEDS_TF_MODELS_DIR=/srv/seeds_tf/models \
    SEEDS_TF_MONITOR=on \
    SEEDS_TF_MONITOR_HOST=0.0.0.0 \
    RCLONE_CONFIG=/srv/.rclone/rclone.conf

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# git fetches deep-start; rclone copies runs to the user's storage (the platform injects the
# `rshare` remote as RCLONE_CONFIG_RSHARE_* variables). The base image's release fixes the versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git rclone \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /srv/.rclone \
    && touch /srv/.rclone/rclone.conf

RUN git clone --quiet https://github.com/ai4os/deep-start /srv/.deep-start \
    && git -C /srv/.deep-start checkout --quiet "${deep_start_ref}" \
    && ln -s /srv/.deep-start/deep-start.sh /usr/local/bin/deep-start

# Fixed UID/GID 10001: above the range base images use for their own users, and fixed so host
# folders can be chown'ed to it for training.
RUN groupadd --gid 10001 seeds \
    && useradd --no-log-init --create-home --uid 10001 --gid seeds seeds \
    && mkdir -p "${SEEDS_TF_DATA_DIR}" "${SEEDS_TF_MODELS_DIR}"

# The base image ships TensorFlow, so the package is installed without its cpu/gpu extra (a second
# copy); the mlflow extra is the client the platform's MLflow needs. seeds_tf/core/config.yaml is a
# symlink to ../../etc/config.yaml, so etc/ comes too.
WORKDIR /opt/seeds_tf
COPY pyproject.toml setup.cfg setup.py README.md LICENSE ./
COPY etc/ etc/
COPY seeds_tf/ seeds_tf/
# The package itself, with its extra: its dependencies are pinned by setup.cfg's ranges.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[mlflow]"

COPY ${deepaas_conf} /etc/deepaas/deepaas.conf
COPY docker/install-model.sh /usr/local/bin/seeds-tf-install-model
RUN seeds-tf-install-model "${MODEL_URL}" "${MODEL_SHA256}" \
    && chown -R 10001:10001 "${SEEDS_TF_DATA_DIR}" "${SEEDS_TF_MODELS_DIR}" /srv/.rclone

WORKDIR /srv
USER ${user}

# 5000: the DEEPaaS API; 6006: TensorBoard (the platform's monitor port); 8888: the IDE.
EXPOSE 5000 6006 8888
# A real prediction, so that hung workers fail it (a listing route is answered by the server alone).
HEALTHCHECK --interval=60s --timeout=45s --start-period=300s --retries=3 \
    CMD ["seeds-tf", "--quiet", "healthcheck", "--timeout", "40"]
CMD ["deep-start", "--deepaas"]
