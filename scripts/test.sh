#!/usr/bin/env bash
# Every test of the workspace, on both stores: the one command the README
# gives. Installs what the suites need when it is missing (Debian packages),
# then runs the unit, integration and walkthrough tests on sled (the
# default store) and the integration suites again on PostgreSQL.
#
#   scripts/test.sh                  # everything
#   scripts/test.sh --install-only   # just install the missing packages
set -euo pipefail
cd "$(dirname "$0")/.."

# Real components and tools the tests start themselves, from Debian's
# packages, installed only when missing:
# - PostgreSQL: throwaway clusters on unix sockets (crates/testkit/src/pg.rs);
# - Chromium + ChromeDriver: the connect page (tests/connect_browser.rs);
# - curl, jq: the README walkthrough run as written (tests/walkthrough.rs);
# - prometheus, for promtool (tests/deploy_monitoring.rs).
# Their services are not started (policy-rc.d): the tests start their own.
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ -x /usr/bin/chromedriver ] || need+=(chromium chromium-driver)
for t in curl jq; do command -v "$t" >/dev/null 2>&1 || need+=("$t"); done
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# - python3 with venv: the MCP Python SDK and the Vapi/Retell SDKs
#   (tests/python/requirements.txt, in target/py-venv via scripts/py-venv.sh).
command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' 2>/dev/null \
  || need+=(python3 python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "test.sh: missing ${need[*]}; install them (apt-get install ${need[*]}) and run again" >&2
    exit 1
  fi
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo)
  echo "test.sh: installing ${need[*]}" >&2
  no_start=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${as_root[@]}" chmod +x /usr/sbin/policy-rc.d
    no_start=1
  fi
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ "$no_start" = 1 ]; then "${as_root[@]}" rm -f /usr/sbin/policy-rc.d; fi
fi
scripts/py-venv.sh >/dev/null
scripts/install-axe.sh >/dev/null
[ "${1:-}" = "--install-only" ] && exit 0

locked=()
[ "${CI:-}" = true ] && locked=(--locked)

# cargo-nextest, when installed, runs the same tests with a per-test time
# limit (.config/nextest.toml, profile ci: a hung test is killed after 3
# minutes instead of stalling CI); a failing test fails either way.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-targets "${locked[@]}" --profile ci
else
  cargo test --workspace --all-targets "${locked[@]}"
fi
# cargo test here, not nextest: one process per test binary shares one
# PostgreSQL cluster (nextest's process per test would start one each).
SIDEKEY_TEST_BACKEND=postgres cargo test --workspace --tests "${locked[@]}"
