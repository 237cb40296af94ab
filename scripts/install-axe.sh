#!/usr/bin/env bash
# axe-core, the accessibility checker that tests/connect_browser.rs runs in
# headless Chromium on every state of the connect page. Installed with npm
# into a cache directory outside the work tree (kept between runs), only
# when the pinned version is not there yet; prints the path of axe.min.js.
#
#   scripts/install-axe.sh            # install if missing, print the path
#
# The test looks in the same place (or at SIDEKEY_AXE_JS, a path to
# axe.min.js); SIDEKEY_AXE_DIR moves the cache directory for both.
set -euo pipefail
version=4.14.1
dir="${SIDEKEY_AXE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sidekey/axe}"
js="$dir/node_modules/axe-core/axe.min.js"
if [ -f "$js" ] && grep -q "\"version\": \"$version\"" "$dir/node_modules/axe-core/package.json"; then
  echo "$js"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo)
  if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "install-axe.sh: npm is missing; install it (apt-get install npm) and run again" >&2
    exit 1
  fi
  echo "install-axe.sh: installing npm" >&2
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
mkdir -p "$dir"
echo "install-axe.sh: installing axe-core@$version into $dir" >&2
npm install --prefix "$dir" --no-save --no-audit --no-fund --loglevel=error "axe-core@$version" >&2
[ -f "$js" ] || { echo "install-axe.sh: $js is missing after npm install" >&2; exit 1; }
echo "$js"
