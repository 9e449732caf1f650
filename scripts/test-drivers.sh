#!/usr/bin/env bash
# Runs the suites again on the second Mesa (scripts/second-mesa.sh): Debian 12's Mesa 22.3 and
# bookworm-backports' Mesa 25 are both drivers the setup accepts, and a kernel right on one only is wrong.
# Where no second Mesa applies (not Debian 12, not root) it says so and succeeds. The suites run through
# scripts/test.mjs as in `npm test`, but at llvmpipe's own vector width (--driver-width: 256 bits on an
# AVX2 host) where `npm test` runs at 128, so CI covers both widths (docs/drivers.md).
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
env_file=$(bash scripts/second-mesa.sh) || status=$?
if [ "$status" = 2 ]; then echo "test-drivers: no second Mesa here; the suites ran on the system driver only"; exit 0; fi
[ "$status" = 0 ] || exit "$status"
# shellcheck disable=SC1090
source "$env_file"

# The suites must really run on that Mesa, not fall back to the system one.
adapter=$(node bin/milora.js doctor --json 2>/dev/null | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).adapter?.description ?? ""))')
case "$adapter" in
  *"Mesa $MILORA_EXPECT_MESA"*) echo "test-drivers: second driver: $adapter" ;;
  *) echo "test-drivers: expected Mesa $MILORA_EXPECT_MESA from $env_file, got '$adapter'" >&2; exit 1 ;;
esac
node scripts/test.mjs --driver-width
