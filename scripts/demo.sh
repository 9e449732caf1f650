#!/usr/bin/env bash
# The README's demo: check every example spec (diagnostics + budget tables), show the GPU milora gets,
# then run one prompt for each of two tenants' MiLoRA adapters over one tiny random base, printing
# each tenant's routing (per layer: the chosen modules and their gates) and its tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
node bin/milora.js check examples/*.milora
node bin/milora.js doctor

# Made once: a tiny random checkpoint and two tenants' random adapters of examples/llama-tiny.milora.
demo=.cache/demo
node --import tsx examples/random-checkpoint.ts "$demo/tiny" --preset tiny
for tenant in alice:1 bob:2; do
  name=${tenant%%:*}
  [ -d "$demo/$name" ] || node --import tsx examples/random-adapter.ts examples/llama-tiny.milora tiny "$demo/$name" --seed "${tenant##*:}"
done
echo
echo "Two tenants over one base. The weights are random, so the text is noise: what to look at is each"
echo "tenant's routing (decided once from the prompt, reused for every token) and the tokens/s."
for name in alice bob; do
  echo
  echo "== tenant $name"
  node bin/milora.js run examples/llama-tiny.milora --base "$demo/tiny" --adapter "tiny=$demo/$name" \
    --prompt "The quick brown fox" --max-tokens 16
done
