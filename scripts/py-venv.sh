#!/usr/bin/env bash
# The Python the suites use (tests/python/requirements.txt in a venv under
# target/), created or completed when missing; prints its interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SIDEKEY_TEST_VENV:-target/py-venv}"
req=tests/python/requirements.txt
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
if ! cmp -s "$req" "$stamp" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
  cp "$req" "$stamp"
fi
echo "$(cd "$venv" && pwd)/bin/python"
