#!/usr/bin/env bash
# Figures from a lent GPU in one short run (docs/performance.md, "On a GPU"): milora doctor, the kernel
# benchmarks, `milora bench --calibrate` and `milora bench` on a random model sized for a GPU, every
# result written under $OUT. The GPU machine has no Node and no network, so it runs bundles made here.
#
#   bash scripts/gpu-bench.sh pack    # here, after npm ci: .device/ (../shared/device/pack.sh: Node, Dawn,
#                                     # the Vulkan loader) and .gpu-bench/ (milora and the kernel benches
#                                     # bundled by esbuild, xz-compressed)
#   bash scripts/gpu-bench.sh run [STEP...]   # there; carry .device, .gpu-bench, node_modules/webgpu/index.js
#                                     # and node_modules/webgpu/package.json (about 33 MiB with the tree).
#                                     # Steps: doctor, kernels, calibrate, bench, baselines, batch, dora
#                                     # (default: all, in that order, each under its own time limit: 9
#                                     # minutes at most)
#
# `run` sources .device/boot.sh when no node is on PATH (the GPU machine), else uses this machine's
# node, which checks the bundles here on llvmpipe. Settings (environment):
#   MILORA_GPU_BENCH_MODEL  the --random size (default: hidden 2048, 16 layers, 16 heads / 8 kv heads,
#                           intermediate 5632, vocab 32000: 0.9 G parameters); `tiny` for a check here
#   MILORA_GPU_BENCH_ARGS   more flags for the comparison (default: none: base, merged and unmerged LoRA,
#                           MiLoRA and the per-token router at f32, f16, q8 and q4, 1 / 8 / 16 tenants,
#                           beam 1 and 3); the per-token baselines (MOELoRA-, MixLoRA-style) run apart at
#                           f32 and f16 with MiLoRA and the base (each adds an engine of its own); DoRA
#                           runs apart, at one tenant, since each DoRA tenant's factors take seconds of
#                           CPU at load; `batch` profiles one decode step of the serve bench's small model
#                           at 1, 4, 8 and 16 rows (bench/batch-profile.ts: what batching can gain)
#   OUT                     where the results go (default .cache/gpu-bench-out)
set -uo pipefail
cd "$(dirname "$0")/.."
bundles=.gpu-bench

pack() {
  set -e
  [ -f .device/boot.sh ] || bash ../shared/device/pack.sh
  local esbuild=node_modules/.bin/esbuild
  [ -x "$esbuild" ] || { echo "no $esbuild: run npm ci first (esbuild comes with tsx)" >&2; exit 2; }
  rm -rf "$bundles" && mkdir -p "$bundles"
  grep -qx "/$bundles/" .git/info/exclude 2>/dev/null || echo "/$bundles/" >> .git/info/exclude
  # webgpu stays outside: its index.js loads Dawn from node_modules/webgpu/dist, where boot.sh puts it.
  # CommonJS dependencies (commander, ...) require node's modules: an ES module bundle needs a require.
  local flags=(--bundle --platform=node --format=esm --target=node20 --external:webgpu --log-level=warning
    '--banner:js=import { createRequire as milora_createRequire } from "node:module"; const require = milora_createRequire(import.meta.url);')
  # examples/random-*.ts run their own command line when argv[1] is their module, as the bundle is for
  # every module in it: so argv[1] is changed before any of them loads (the import is lazy).
  echo 'const argv = [...process.argv]; process.argv[1] = "milora"; const { main } = await import("./bin/cli.ts"); process.exitCode = await main(argv);' |
    "$esbuild" "${flags[@]}" --sourcefile=milora-entry.ts --loader=ts --outfile="$bundles/milora.mjs"
  for bench in kernels lora; do "$esbuild" "${flags[@]}" "bench/$bench.ts" --outfile="$bundles/$bench.mjs"; done
  # batch-profile imports examples/random-*.ts: the same change of argv[1] first
  echo 'process.argv[1] = "batch-profile"; await import("./bench/batch-profile.ts");' |
    "$esbuild" "${flags[@]}" --sourcefile=batch-profile-entry.ts --loader=ts --outfile="$bundles/batch-profile.mjs"
  xz -6 -T2 "$bundles"/*.mjs
  du -sh .device "$bundles"
}

run() {
  local out=${OUT:-.cache/gpu-bench-out}
  local model=${MILORA_GPU_BENCH_MODEL:-small,hidden=2048,layers=16,heads=16,kv-heads=8,intermediate=5632,vocab=32000}
  [ -d "$bundles" ] || { echo "no $bundles: run \`bash scripts/gpu-bench.sh pack\` first" >&2; exit 2; }
  if ! command -v node >/dev/null; then
    # shellcheck disable=SC1091
    source .device/boot.sh || exit 8
    export MILORA_BACKEND=${MILORA_BACKEND:-vulkan}
  fi
  mkdir -p "$out" && : > "$out/steps.txt"
  for f in "$bundles"/*.mjs.xz; do xz -dkc "$f" > "${f%.xz}"; done
  # Random checkpoints and the calibration go to a cache of this run's own, out of $OUT (it stays small).
  export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/milora-gpu-bench-cache}
  local status=0
  step() { # name, limit in seconds, command...: its stdout to $OUT/name, stderr to $OUT/name.log
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$out/$name" 2> >(tee "$out/$name.log" >&2)
    local rc=$?
    echo "gpu-bench: $name: exit $rc after $((SECONDS - started)) s" | tee -a "$out/steps.txt" >&2
    [ $rc -eq 0 ] || status=1
  }
  local milora=(node "$bundles/milora.mjs")
  local steps=("$@")
  [ ${#steps[@]} -gt 0 ] || steps=(doctor kernels calibrate bench baselines batch dora)
  for s in "${steps[@]}"; do
    case $s in
      doctor) step doctor.json 20 "${milora[@]}" doctor --json && head -c 600 "$out/doctor.json" >&2 && echo >&2 ;;
      kernels)
        step kernels.txt 25 node "$bundles/kernels.mjs"
        step lora.txt 25 node "$bundles/lora.mjs" --hidden 2048 ;;
      # the first step to use the model writes it (a minute for the default size)
      calibrate) step calibration.json 90 "${milora[@]}" bench --random "$model" --calibrate --json ;;
      # shellcheck disable=SC2086
      bench) step bench.json 210 "${milora[@]}" bench --random "$model" --modes base,merged,lora,milora,token --weights f32,f16,q8,q4 --json ${MILORA_GPU_BENCH_ARGS:-} ;;
      baselines) step bench-baselines.json 80 "${milora[@]}" bench --random "$model" --modes base,milora,moelora,mixlora --weights f32,f16 --tenants 1,8 --json ;;
      batch) step batch-profile.txt 40 node "$bundles/batch-profile.mjs" --json "$out/batch-profile.json" ;;
      dora) step bench-dora.json 50 "${milora[@]}" bench --random "$model" --modes base,lora,dora --tenants 1 --json ;;
      *) echo "gpu-bench: no step $s (doctor, kernels, calibrate, bench, baselines, batch, dora)" >&2; status=2 ;;
    esac
  done
  rm -f "$bundles"/*.mjs
  return $status
}

case "${1:-}" in
  pack) pack ;;
  run) shift && run "$@" ;;
  *) echo "usage: bash scripts/gpu-bench.sh pack|run" >&2; exit 2 ;;
esac
