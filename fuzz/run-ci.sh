#!/usr/bin/env bash
# Runs every cargo-fuzz target for a fixed time. Meant for CI and for a quick
# local check; see fuzz/README.md.
#
#   fuzz/run-ci.sh [SECONDS_PER_TARGET]      (default: $FUZZ_SECONDS or 20)
#   FUZZ_TARGETS="path_check" fuzz/run-ci.sh 60
#
# Exit codes: 0 when every target ran clean, or when cargo-fuzz / the
# toolchain support it needs is unavailable (a message says why: fuzzing is
# an extra, not a gate that a missing tool should fail); 1 when the targets
# do not compile against sidekey (that is our defect, not a missing tool),
# or when a target found a crash, a panic or a broken invariant (the input
# is saved under fuzz/artifacts/<target>/ and the command to reproduce it
# is printed).
#
# Toolchain: cargo-fuzz needs nightly-only rustc flags (-Zsanitizer,
# sanitizer coverage). With a nightly toolchain installed (`rustup toolchain
# list`), set FUZZ_TOOLCHAIN=nightly. Otherwise the script uses the stable
# toolchain with RUSTC_BOOTSTRAP=1, which unlocks those flags on stable, and
# falls back to --sanitizer none if AddressSanitizer cannot be linked.
set -uo pipefail
cd "$(dirname "$0")" || exit 1

secs=${1:-${FUZZ_SECONDS:-20}}
targets=${FUZZ_TARGETS:-"jwt_verify path_check webhook_signature h1_framing"}
started=$(date +%s)

skip() {
  echo "fuzz: skipped: $*" >&2
  exit 0
}

if ! command -v cargo >/dev/null 2>&1; then
  skip "cargo is not installed"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io (cargo install cargo-fuzz --locked)" >&2
  if ! cargo install cargo-fuzz --locked >/tmp/sidekey-cargo-fuzz-install.log 2>&1; then
    tail -5 /tmp/sidekey-cargo-fuzz-install.log >&2
    skip "cargo-fuzz could not be installed"
  fi
fi
echo "fuzz: $(cargo fuzz --version) ($(( $(date +%s) - started )) s so far)"

toolchain=()
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
  toolchain=("+${FUZZ_TOOLCHAIN}")
else
  export RUSTC_BOOTSTRAP=1
fi

# Build every target once; ASan first, no sanitizer if that cannot link.
sanitizer=address
if ! cargo "${toolchain[@]}" fuzz build --sanitizer "$sanitizer" >/tmp/sidekey-fuzz-build.log 2>&1; then
  tail -15 /tmp/sidekey-fuzz-build.log >&2
  echo "fuzz: build with AddressSanitizer failed; retrying with --sanitizer none" >&2
  sanitizer=none
  if ! cargo "${toolchain[@]}" fuzz build --sanitizer "$sanitizer" >/tmp/sidekey-fuzz-build.log 2>&1; then
    # Our own targets not compiling against sidekey is a defect, not a
    # missing tool: it fails the run (a skip once hid exactly that).
    if grep -q 'could not compile `sidekey-fuzz`' /tmp/sidekey-fuzz-build.log; then
      grep -A12 '^error' /tmp/sidekey-fuzz-build.log | head -80 >&2
      echo "fuzz: the fuzz targets do not compile against this sidekey (errors above); fix fuzz/fuzz_targets" >&2
      exit 1
    fi
    tail -15 /tmp/sidekey-fuzz-build.log >&2
    skip "the fuzz targets do not build with this toolchain (see above)"
  fi
fi
echo "fuzz: built with sanitizer=$sanitizer ($(( $(date +%s) - started )) s so far)"

failed=0
for t in $targets; do
  mkdir -p "corpus/$t" "artifacts/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  log="/tmp/sidekey-fuzz-$t.log"
  t0=$(date +%s)
  # -rss_limit_mb: the jwt target keeps one store open; 2 GiB is ample.
  cargo "${toolchain[@]}" fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  runs=$(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  cov=$(grep -E '^#[0-9]+.*(DONE|cov:)' "$log" | tail -1 | grep -o 'cov: [0-9]*')
  if [ "$rc" -eq 0 ]; then
    echo "fuzz: $t: ok, ${runs:-?} runs in $(( $(date +%s) - t0 )) s, ${cov:-cov: ?}"
  else
    failed=1
    echo "fuzz: $t: FAILED (exit $rc); last lines of $log:" >&2
    grep -E 'panicked|SUMMARY|ERROR|Test unit written|assert' "$log" | head -20 >&2
    tail -5 "$log" >&2
    art=$(grep -o 'artifacts/[^ ]*' "$log" | tail -1)
    [ -n "$art" ] && echo "fuzz: reproduce with: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t $art)" >&2
  fi
done
echo "fuzz: done in $(( $(date +%s) - started )) s"
exit "$failed"
