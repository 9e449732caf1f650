#!/usr/bin/env bash
# Unpacks the Mesa that this Debian 12 machine does NOT have installed into a private directory, so the
# GPU suites can run on both drivers the setup accepts (Debian 12's own Mesa 22.3 and bookworm-backports'
# Mesa 25) without swapping a system package. Nothing is installed system-wide: the .deb files are
# fetched with `apt-get download` and unpacked with `dpkg-deb -x` under .cache/mesa-<version>/.
# Prints the path of an env file that selects that Mesa (source it); exits 2 where there is nothing to do
# (not Debian 12, not root, or no system Mesa), printing why.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'second-mesa: %s\n' "$*" >&2; }

if ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
  say "not Debian 12 (bookworm): only one Mesa is tested here"; exit 2
fi
system=$(dpkg-query -W -f '${Version}' libegl-mesa0 2>/dev/null || true)
if [ -z "$system" ]; then say "no system Mesa (libegl-mesa0) installed"; exit 2; fi

# The other driver: Mesa 25 from backports next to a system Mesa 22, or Debian's Mesa 22 next to a Mesa 25.
case "$system" in
  22.*)
    suite=bookworm-backports
    packages="libegl-mesa0 libgl1-mesa-dri mesa-libgallium libgbm1 libdrm2 libdrm-amdgpu1 libdrm-intel1"
    ;;
  *)
    suite=bookworm
    packages="libegl-mesa0 libgl1-mesa-dri libglapi-mesa libgbm1"
    ;;
esac

if [ "$suite" = bookworm-backports ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  if [ "$(id -u)" != 0 ]; then say "bookworm-backports is not an apt source and this is not root"; exit 2; fi
  # Adding a source installs nothing; it only lets `apt-get download` see backports' Mesa.
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    > /etc/apt/sources.list.d/bookworm-backports.sources
  apt-get update -qq >&2
fi

candidate() { apt-cache madison libegl-mesa0 | awk -F'|' -v suite=" $suite/main " 'index($3, suite) { gsub(/ /, "", $2); print $2; exit }'; }
version=$(candidate)
if [ -z "$version" ]; then apt-get update -qq >&2 || true; version=$(candidate); fi
if [ -z "$version" ]; then say "apt knows no libegl-mesa0 in $suite"; exit 2; fi

dir=".cache/mesa-${version%%-*}"
env_file="$dir/env.sh"
if [ ! -f "$env_file" ]; then
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/debs"
  say "unpacking Mesa $version from $suite into $dir"
  # apt warns that it downloads as root outside its sandbox; that is expected here.
  (cd "$dir.tmp/debs" && apt-get download -qq $(for p in $packages; do printf '%s/%s ' "$p" "$suite"; done) 2> >(grep -v unsandboxed >&2))
  for deb in "$dir.tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$dir.tmp/root"; done
  rm -rf "$dir.tmp/debs"
  root="$PWD/$dir/root"
  lib="$root/usr/lib/x86_64-linux-gnu"
  cat > "$dir.tmp/env.sh" <<EOF
# Selects Mesa $version (unpacked by scripts/second-mesa.sh) for GL/EGL clients of this shell.
export LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export __EGL_VENDOR_LIBRARY_FILENAMES="$root/usr/share/glvnd/egl_vendor.d/50_mesa.json"
export LIBGL_DRIVERS_PATH="$lib/dri"
export GBM_BACKENDS_PATH="$lib/gbm"
export MILORA_EXPECT_MESA="${version%%-*}"
EOF
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi
printf '%s\n' "$env_file"
