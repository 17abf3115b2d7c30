#!/bin/sh
# The pre-trained variant's build step: imports the published seeds model into the image's models
# folder with `seeds-tf import-legacy`, refusing a tarball whose SHA-256 is not the expected one.
#
#   install-model.sh MODEL_URL [MODEL_SHA256]
#
# MODEL_URL empty: nothing is installed (the trainable image without a model). MODEL_SHA256 empty:
# the tarball is accepted and its SHA-256 printed, with the build argument that pins it next time.
# The models folder is $SEEDS_TF_MODELS_DIR. Exit status 0, or that of seeds-tf (2: refused).
set -eu

url="${1:-}"
sha256="${2:-}"

if [ -z "$url" ]; then
    echo "install-model: no MODEL_URL given: the image holds no model"
    exit 0
fi

if [ -z "$sha256" ]; then
    echo "install-model: WARNING: MODEL_SHA256 is not set: accepting $url unverified."
    echo "install-model: pin it with --build-arg MODEL_SHA256=<the SHA-256 logged below>."
fi

seeds-tf import-legacy "$url" --sha256 "$sha256"
seeds-tf runs
