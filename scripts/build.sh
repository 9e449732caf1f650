#!/usr/bin/env bash
# `npm run build`: the runtime, the milora command and milora/pictures as JavaScript with declarations
# (tsconfig.build.json) plus the serving page's static files, in dist/. It builds into a fresh folder
# and swaps that in whole, so a process reading dist/ meanwhile (the tests run in parallel, and several
# of them rebuild dist/ while others compile packages from it) never sees it missing or half written.
# Like `tsc`, it writes the JavaScript even when some file has type errors, and then exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."

out="dist.$$.tmp"
rm -rf "$out"
node_modules/.bin/tsc -p tsconfig.build.json --outDir "$out"
status=$?
if [ "$status" = 0 ]; then node scripts/copy-build-assets.mjs "$out" || status=$?; fi
if [ -d "$out" ]; then
  # Move the old dist/ aside and the new one in; retried in case another build swaps at the same moment.
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    [ -e dist ] && mv -T dist "dist.$$.$attempt.old.tmp" 2>/dev/null
    mv -T "$out" dist 2>/dev/null && break
  done
  rm -rf dist.$$.*.old.tmp "$out"
fi
exit "$status"
