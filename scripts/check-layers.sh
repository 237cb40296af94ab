#!/usr/bin/env bash
# Fails when a sidekey crate depends on a crate of a higher layer (normal,
# dev or build dependency). The layers, from the ground up:
#   sidekey-base → sidekey-vault → sidekey-creds → sidekey-edge → sidekey
#   (the binary), with the test kit and the load tool above them all.
# ARCHITECTURE.md explains the rule; Cargo keeps import circles out, this
# keeps the direction.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --no-deps --locked | python3 -c '
import json, sys
rank = {"sidekey-base": 0, "sidekey-vault": 1, "sidekey-creds": 2,
        "sidekey-edge": 3, "sidekey": 4, "sidekey-testkit": 5, "sidekey-bench": 6}
# The binary crate tests itself through the test kit (a dev-dependency
# only: the test kit drives the binary, it is not part of it).
allowed_up = {("sidekey", "sidekey-testkit")}
meta = json.load(sys.stdin)
bad = []
for p in meta["packages"]:
    name = p["name"]
    if name not in rank:
        bad.append(name + ": a workspace crate with no layer (add it to scripts/check-layers.sh)")
        continue
    for d in p["dependencies"]:
        dep, kind = d["name"], d["kind"] or "normal"
        if dep in rank and rank[dep] >= rank[name] and (name, dep) not in allowed_up:
            bad.append(f"{name} depends on {dep} ({kind}): a lower layer must not depend on a higher one")
for b in bad:
    print("check-layers:", b, file=sys.stderr)
if bad:
    sys.exit(1)
print("check-layers: every crate depends only on the layers below it")
'
