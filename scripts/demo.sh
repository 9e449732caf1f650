#!/usr/bin/env bash
# The README's demo: check every example spec (diagnostics + budget tables), then show the GPU milora gets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
node bin/milora.js check examples/*.milora
node bin/milora.js doctor
