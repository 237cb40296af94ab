#!/usr/bin/env bash
# Builds target/pgo/sidekey: the release binary, optimised with a profile
# of sidekey serving the bench's traffic (profile-guided optimisation).
#
#   scripts/pgo-build.sh            # then run target/pgo/sidekey serve ...
#
# Why: with the profile, LLVM lays out the hot request path together and
# predicts its branches from what sidekey really does. On the bench VM that
# took sidekey from a median 0.91x to 0.97x nginx's throughput at 64
# connections, and its CPU per request from 1.12x to 1.02x nginx's
# (docs/performance.md, round 7). The source is the same; only code layout
# and inlining change, so the binary behaves exactly as the plain release
# build.
#
# Steps (about 10 minutes on 2 cores: two fat-LTO builds and a short run):
#   1. an instrumented release build (target/pgo/gen);
#   2. sidekey-bench drives it with the usual load (sled store, audit on,
#      1 and 64 connections, TLS, pooled upstream) and stops it cleanly,
#      which writes the profile;
#   3. llvm-profdata merges the profile;
#   4. the release build again with the profile (target/pgo/use), copied to
#      target/pgo/sidekey.
#
# Needs llvm-profdata of the same LLVM major version as rustc (rustc -vV):
# `rustup component add llvm-tools`, or Debian's llvm-<major> package, or
# LLVM_PROFDATA=/path/to/llvm-profdata.
# PGO_TRAIN_SECS (default 4) sets how long each load case runs.
set -euo pipefail
cd "$(dirname "$0")/.."

major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata=${LLVM_PROFDATA:-}
if [ -z "$profdata" ]; then
  for c in "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata \
    "/usr/lib/llvm-$major/bin/llvm-profdata" \
    "$(command -v "llvm-profdata-$major" || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then
      profdata=$c
      break
    fi
  done
fi
if [ -z "$profdata" ]; then
  echo "pgo-build: no llvm-profdata for LLVM $major (rustc's); install one of:" >&2
  echo "  rustup component add llvm-tools" >&2
  echo "  apt-get install llvm-$major" >&2
  echo "or set LLVM_PROFDATA=/path/to/llvm-profdata" >&2
  exit 2
fi
have=$("$profdata" --version | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -1)
if [ -n "$have" ] && [ "$have" != "$major" ]; then
  echo "pgo-build: $profdata is LLVM $have; rustc uses LLVM $major (profiles would not match)" >&2
  exit 2
fi

# Absolute: the bench starts sidekey from its own temp dir.
out=$PWD/target/pgo
data=$out/data
rm -rf "$data" "$out/sidekey.profdata"
mkdir -p "$data"

echo "pgo-build: 1/4 instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$data" \
  cargo build --release --locked --bin sidekey --target-dir "$out/gen"

echo "pgo-build: 2/4 training run (sidekey-bench)" >&2
cargo build --release --locked -p sidekey-bench
target/release/sidekey-bench --sidekey "$out/gen/release/sidekey" \
  --levels 1,64 --duration "${PGO_TRAIN_SECS:-4}" >"$out/training.txt"
if ! ls "$data"/*.profraw >/dev/null 2>&1; then
  echo "pgo-build: the training run wrote no profile (see $out/training.txt)" >&2
  exit 1
fi

echo "pgo-build: 3/4 merge with $profdata" >&2
"$profdata" merge -o "$out/sidekey.profdata" "$data"

echo "pgo-build: 4/4 optimised build" >&2
RUSTFLAGS="-Cprofile-use=$out/sidekey.profdata" \
  cargo build --release --locked --bin sidekey --target-dir "$out/use"
cp "$out/use/release/sidekey" "$out/sidekey"
"$out/sidekey" --version >&2
echo "pgo-build: built $out/sidekey" >&2
