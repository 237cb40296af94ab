#!/usr/bin/env bash
# Checks the deployment files against each other and against sidekey itself.
# Nothing here needs Docker or a cluster.
#
#   deploy/check.sh [path/to/sidekey]     (default: target/release/sidekey, then target/debug/sidekey)
#
# 1. the Kubernetes ConfigMap holds exactly deploy/config.production.toml;
# 2. every secret file the config names is provided by the Compose file;
# 3. `sidekey check-config` accepts the production config, with throwaway
#    secrets in a temp dir standing in for /etc/sidekey/secrets;
# 4. `systemd-analyze verify` accepts the unit (when systemd-analyze exists).
# Optional tools used when present: python3 (3.11+) with PyYAML (1, 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
if [ -z "$bin" ]; then
  for b in target/release/sidekey target/debug/sidekey; do
    [ -x "$b" ] && bin=$b && break
  done
fi
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if python3 -c 'import yaml' 2>/dev/null; then
  python3 - <<'PY' || fail=1
import sys, tomllib, yaml
cfg = open('deploy/config.production.toml').read()
docs = list(yaml.safe_load_all(open('deploy/kubernetes/sidekey-sidecar.yaml')))
cm = [d for d in docs if d and d.get('kind') == 'ConfigMap'][0]
if cm['data']['config.toml'] != cfg:
    sys.exit('kubernetes ConfigMap differs from deploy/config.production.toml')
def strings(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from strings(x)
    elif isinstance(v, str):
        yield v
prefix = '/etc/sidekey/secrets/'
names = {v[len(prefix):] for v in strings(tomllib.loads(cfg)) if v.startswith(prefix)}
compose = yaml.safe_load(open('deploy/docker-compose.yml'))
targets = {s['target'].rsplit('/', 1)[1] for s in compose['services']['sidekey']['secrets']
           if isinstance(s, dict)}
missing = names - targets
if missing:
    sys.exit(f'docker-compose.yml does not provide {sorted(missing)}')
print(f'ok: ConfigMap matches; Compose provides all {len(names)} secret files')
PY
else
  echo "skip: python3 with PyYAML not available (ConfigMap and Compose checks)"
fi

if [ -n "$bin" ]; then
  s="$tmp/secrets"
  mkdir -p "$s"
  openssl rand -base64 32 >"$s/master.key"
  openssl rand -hex 32 >"$s/admin.token"
  openssl rand -base64 32 >"$s/session.key"
  for f in elevenlabs-webhook.secret init.secret slack-client-secret google-client-secret; do
    echo "test-$f" >"$s/$f"
  done
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -keyout "$s/tls.key" -out "$s/tls.crt" -subj /CN=sidekey.example.com 2>/dev/null
  sed -e "s#/etc/sidekey/secrets#$s#g" -e "s#/var/lib/sidekey#$tmp/state#g" \
    deploy/config.production.toml >"$tmp/config.toml"
  if SLACK_CLIENT_ID=x GOOGLE_CLIENT_ID=y "$bin" check-config --config "$tmp/config.toml"; then
    echo "ok: check-config accepts deploy/config.production.toml"
  else
    fail=1
  fi
else
  echo "skip: no sidekey binary (cargo build --release), check-config not run"
fi

if command -v systemd-analyze >/dev/null 2>&1; then
  # verify wants ExecStart's program to exist: point it at one that does.
  exe=/bin/true
  [ -n "$bin" ] && exe=$(realpath "$bin")
  sed "s#/usr/local/bin/sidekey#$exe#g" deploy/systemd/sidekey.service >"$tmp/sidekey.service"
  if systemd-analyze verify "$tmp/sidekey.service"; then
    echo "ok: systemd-analyze verify"
  else
    fail=1
  fi
else
  echo "skip: systemd-analyze not available"
fi
exit "$fail"
