#!/usr/bin/env bash
# GPU readiness check (tools/gpu_check.py --help): run from the repo root with the python on PATH.
cd "$(dirname "$0")/.." && exec python tools/gpu_check.py "$@"
