#!/usr/bin/env bash
# Creates deploy/secrets/ with throwaway secrets and a self-signed TLS
# certificate, for trying deploy/docker-compose.yml (and
# deploy/docker-compose.postgres.yml: a database password and the URL
# sidekey connects with) locally. Not for production: ElevenLabs needs a
# publicly trusted certificate, and real OAuth client secrets come from the
# providers' consoles.
#
#   ./make-dev-secrets.sh [hostname]     (default: localhost)
set -euo pipefail
cd "$(dirname "$0")"
host=${1:-localhost}
dir=secrets
umask 077
mkdir -p "$dir"
printf '*\n' > "$dir/.gitignore"
# The PostgreSQL password and URL, when missing, so running this again after
# trying docker-compose.yml adds them. The URL is for the compose network
# only (sslmode=disable); use verify-full over any real network.
added=
if [ ! -e "$dir/postgres-password" ]; then
  added=1
  pw=$(openssl rand -hex 24)
  printf '%s\n' "$pw" > "$dir/postgres-password"
  printf 'SIDEKEY_POSTGRES_URL=postgresql://sidekey:%s@postgres:5432/sidekey?sslmode=disable\n' "$pw" > "$dir/postgres.env"
  chmod 0444 "$dir/postgres-password" "$dir/postgres.env"
  echo "PostgreSQL password and URL written to deploy/$dir/postgres-password and postgres.env"
fi
if [ -e "$dir/master.key" ]; then
  [ -n "$added" ] && exit 0   # the other secrets exist already
  echo "$dir/master.key exists; refusing to overwrite (a new master key would not open the existing store)" >&2
  exit 1
fi
openssl rand -base64 32 > "$dir/master.key"
openssl rand -base64 32 | tr -d '\n=' | tr '/+' '_-' > "$dir/admin.token"
openssl rand -base64 32 > "$dir/session.key"
openssl rand -hex 32 > "$dir/elevenlabs-webhook.secret"
openssl rand -hex 32 > "$dir/init.secret"
printf 'replace-with-the-slack-client-secret\n' > "$dir/slack-client-secret"
printf 'replace-with-the-google-client-secret\n' > "$dir/google-client-secret"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$dir/tls.key" -out "$dir/tls.crt" -days 90 \
  -subj "/CN=$host" -addext "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1" 2>/dev/null
# Compose bind-mounts each file into the container, where sidekey runs as
# uid 65532: the files are made readable there; the directory (0700) keeps
# them private on the host.
chmod 0444 "$dir"/*
chmod 0700 "$dir"
echo "secrets written to deploy/$dir/ (admin token: deploy/$dir/admin.token)"
