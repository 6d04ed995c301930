#!/bin/sh
# Story Studio image entry point: one image, two modes.
#
#   runpod  RunPod serverless worker (python -u handler.py), the default
#   http    self-hosted HTTP service (storystudio serve), e.g. under docker compose
#
# The mode is the first argument (`docker run IMAGE http --port 9000`; the rest is
# passed on), else $STORYSTUDIO_MODE, else runpod. Any other command runs as given,
# e.g. `docker run IMAGE storystudio-download --models-dir /models`.
set -eu

if [ "$#" -gt 0 ]; then
    mode="$1"
    case "$mode" in
        runpod|http) shift ;;
        *) exec "$@" ;;
    esac
else
    mode="${STORYSTUDIO_MODE:-runpod}"
fi

case "$mode" in
    runpod) exec python -u handler.py "$@" ;;
    http) exec python -u -m storystudio.serve "$@" ;;
    *) echo "storystudio-entrypoint: STORYSTUDIO_MODE must be runpod or http, not '$mode'" >&2; exit 2 ;;
esac
