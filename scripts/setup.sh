#!/usr/bin/env bash
# Makes this checkout ready to run: npm dependencies, then a WebGPU adapter.
# Idempotent and quiet when everything is already there. Where no adapter is found it installs Mesa's
# software GPU (llvmpipe behind Dawn's OpenGL ES backend) when it can (root on Debian/Ubuntu; on Debian
# 12 from bookworm-backports unless MILORA_MESA=system), and otherwise prints the command to run.
# Where it finds Debian 12's own Mesa 22 it keeps it (both are tested, docs/drivers.md) and says that
# Mesa 25 is faster; MILORA_MESA=backports installs that one.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*" >&2; }

# 1. npm dependencies: install when missing or older than the lock file.
if [ ! -d node_modules ] || [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing npm dependencies"
  npm ci --no-audit --no-fund --loglevel=error >&2
fi

# 2. A WebGPU adapter. The probe prints the adapter's backend, or exits 1 when there is none.
probe() {
  node --import tsx --input-type=module -e '
    import { acquireDevice } from "./runtime/gpu/device.ts";
    try { const c = await acquireDevice(); console.log(c.report.backend); c.destroy(); }
    catch (e) { console.error(e.message); process.exit(1); }
  ' 2>/dev/null
}

MESA_PACKAGES="libegl1 libegl-mesa0 libgles2 libgl1-mesa-dri"

# Debian 12's Mesa 22 works; Mesa 25 from bookworm-backports runs the same kernels about twice as
# fast, so a fresh install on bookworm takes its GL/EGL parts from there (MILORA_MESA=system keeps
# Debian's own).
BACKPORTS_COMMAND="MILORA_MESA=backports bash scripts/setup.sh"
install_mesa() {
  export DEBIAN_FRONTEND=noninteractive
  local target=()
  if [ "${MILORA_MESA:-backports}" = backports ] && grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        > /etc/apt/sources.list.d/bookworm-backports.sources
    fi
    target=(-t bookworm-backports)
  fi
  apt-get update -qq >&2
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends "${target[@]}" $MESA_PACKAGES >&2
}

if ! probe >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "no WebGPU adapter found; installing Mesa's software GPU ($MESA_PACKAGES)"
    install_mesa
    if ! probe >/dev/null; then
      say "still no WebGPU adapter after installing Mesa; run 'node bin/milora.js doctor' to see why"
      exit 1
    fi
  else
    say "no WebGPU adapter found. Install Mesa's software GPU and run this again:"
    say "  sudo apt-get install -y $MESA_PACKAGES"
    exit 1
  fi
fi

# 3. An adapter works. On Debian 12 with its own Mesa 22, say what Mesa 25 would bring, or install it.
mesa=$(dpkg-query -W -f '${Version}' libegl-mesa0 2>/dev/null || true)
if [[ "$mesa" == 22.* ]] && grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
  if [ "${MILORA_MESA:-}" = backports ] && [ "$(id -u)" = 0 ]; then
    say "replacing Mesa $mesa with bookworm-backports' Mesa 25"
    install_mesa
    probe >/dev/null || { say "no WebGPU adapter after installing Mesa 25; run 'node bin/milora.js doctor' to see why"; exit 1; }
  elif [ "${MILORA_MESA:-}" != system ]; then
    say "using Debian's Mesa $mesa; bookworm-backports' Mesa 25 runs milora about twice as fast: $BACKPORTS_COMMAND (as root)"
  fi
fi

# 4. Chromium for the serving page's browser test (test/runtime/serving/ui/page.test.ts): Debian's own
# package through apt, never a browser downloaded by a tool. Without it that test skips and says so.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    candidate() { apt-cache policy chromium 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
    c=$(candidate)
    if [ -z "$c" ] || [ "$c" = "(none)" ]; then apt-get update -qq >&2 || true; c=$(candidate); fi
    if [ -n "$c" ] && [ "$c" != "(none)" ]; then
      say "installing Debian's chromium $c (for the serving page's browser test)"
      apt-get install -y -qq --no-install-recommends chromium >&2 || say "could not install chromium; the page's browser test will skip"
    else
      say "apt has no chromium package here; the page's browser test will skip"
    fi
  else
    say "no /usr/bin/chromium: the page's browser test will skip. To run it: sudo apt-get install -y chromium"
  fi
fi
