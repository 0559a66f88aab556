#!/usr/bin/env bash
# Set up keytrace on a fresh machine and run the demo on librdkafka's embedded mock cluster.
# Usage: bash scripts/demo.sh [--port 8501]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/keytrace demo "$@"
