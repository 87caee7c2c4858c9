#!/bin/sh
# One-shot: make what brokerd needs for TLS and users, once, into DIR (default /etc/brokerd):
#
#   DIR/tls/ca.pem, ca.key      a private CA (ca.key never leaves this volume; keep a copy
#                               elsewhere only if you want to sign more certificates)
#   DIR/tls/server.pem, .key    brokerd's certificate, for the names in BROKERD_TLS_NAMES
#   DIR/users.toml              users "worker", "webapp" and "admin" (token hashes only)
#   DIR/worker.env, webapp.env, admin.env
#                               BROKERD_URL=brokerds://USER:TOKEN@brokerd:7700?ca=DIR/tls/ca.pem
#
# compose.yaml runs it as the "init" service before brokerd; by hand:
#   sh deploy/docker/init-secrets.sh ./brokerd-secrets
# Needs openssl and brokerd-ctl.  Runs again as a no-op once users.toml exists (delete DIR to
# start over: every client then needs the new tokens).
set -eu

DIR=${1:-/etc/brokerd}
# Host names and addresses clients use to reach brokerd: its compose service name, and
# localhost for the host's published ports and the image's health check.
NAMES=${BROKERD_TLS_NAMES:-DNS:brokerd,DNS:localhost,IP:127.0.0.1,IP:::1}
# Where clients reach brokerd (the host part of BROKERD_URL; a name from NAMES).
ADDRESS=${BROKERD_ADDRESS:-brokerd:7700}
# Where clients will find the CA file (?ca=): DIR/tls/ca.pem unless they mount it elsewhere.
CA_PATH=${BROKERD_CA_PATH:-$DIR/tls/ca.pem}
# Certificate lifetimes in days: the CA outlives the server certificate it signs.
CA_DAYS=3650
SERVER_DAYS=825

if [ -s "$DIR/users.toml" ]; then
    echo "init-secrets: $DIR/users.toml exists; keeping the certificates and users there" >&2
    exit 0
fi
mkdir -p "$DIR/tls"
umask 077  # keys, the users file and the env files (which hold tokens): owner only
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$CA_DAYS" \
    -subj "/CN=brokerd private CA" -keyout "$DIR/tls/ca.key" -out "$DIR/tls/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=brokerd" \
    -keyout "$DIR/tls/server.key" -out "$tmp/server.csr" 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$NAMES" > "$tmp/ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$DIR/tls/ca.pem" -CAkey "$DIR/tls/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -days "$SERVER_DAYS" -extfile "$tmp/ext" -out "$DIR/tls/server.pem" 2>/dev/null
# Public: clients (and Prometheus, as another user) read them.
chmod 0644 "$DIR/tls/ca.pem" "$DIR/tls/server.pem"
chmod 0755 "$DIR" "$DIR/tls"

# user NAME GRANT...: add NAME to users.toml and write NAME.env with its URL.
user() {
    name=$1; shift
    grants=""
    for g in "$@"; do grants="$grants --grant $g"; done
    # shellcheck disable=SC2086  # one word per grant
    token=$(brokerd-ctl user add "$name" --users-file "$DIR/users.toml" $grants 2>/dev/null)
    printf 'BROKERD_URL=brokerds://%s:%s@%s?ca=%s\n' "$name" "$token" "$ADDRESS" "$CA_PATH" > "$DIR/$name.env"
}
# The example's workers consume and publish (chains, retries) and write results; the web app
# publishes and reads results; admin is for brokerd-ctl (queues, purge, workers ...).
user worker "consume=*" "publish=*" "results-write=*" "results-read=*"
user webapp "publish=*" "results-read=*"
user admin "admin=*" "manage=*" "control=*" "results-read=*" "results-write=*" "schedules=*" "publish=*" "consume=*"
echo "init-secrets: made $DIR/tls (CA, server certificate for $NAMES), $DIR/users.toml and worker.env, webapp.env, admin.env" >&2
