#!/usr/bin/env bash
# The deployment, run end to end on loopback: PostgreSQL and Redis (started if they are down), a fresh database,
# two shop-server instances and nginx with deploy/nginx/shop.conf in front of them. A 1,000-buyer race goes
# through nginx while one instance is killed -9 (shop-smoke checks the answers against the database); then the
# other is stopped with SIGTERM and must exit 0, and nginx must answer 503 with Retry-After. The systemd units are
# checked with systemd-analyze verify. Installs nginx when it is missing (Debian).
#
# usage: deploy/smoke.sh            (debug build; SMOKE_PROFILE=release for the release build)
#        SMOKE_STRATEGY=redis-optimistic deploy/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
profile=${SMOKE_PROFILE:-debug}
strategy=${SMOKE_STRATEGY:-conditional}
buyers=${SMOKE_BUYERS:-1000}
stock=${SMOKE_STOCK:-600}
pg_admin=${SMOKE_POSTGRES:-postgres://postgres@127.0.0.1:5432}
redis_url=${SMOKE_REDIS:-redis://127.0.0.1:6379}
say() { echo "smoke: $*"; }
die() { echo "smoke: FAILED: $*" >&2; exit 1; }

if ! command -v nginx >/dev/null; then
  say "installing nginx"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
    || die "nginx is missing and apt-get could not install it"
fi
nginx_bin=$(command -v nginx)
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  say "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
if ! redis-cli -u "$redis_url" ping 2>/dev/null | grep -q PONG; then
  say "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
for _ in $(seq 1 60); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.5; done

flag=(); [ "$profile" = release ] && flag=(--release)
cargo build -q "${flag[@]}" -p shop-server -p shop-bench --bin shop-server --bin shop-smoke
bin="$root/target/$profile"

work=$(mktemp -d /tmp/shop-smoke.XXXXXX)
db="shop_smoke_$(date +%s)_$$"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill -QUIT "$(cat "$work/nginx.pid")" 2>/dev/null || true
  psql -q "$pg_admin/postgres" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  if [ "${keep:-}" != 1 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

if command -v systemd-analyze >/dev/null; then
  # The units name the installed binary; verify them against this build's.
  mkdir -p "$work/units"
  for unit in deploy/systemd/*.service; do
    sed "s#/usr/local/bin/shop-server#$bin/shop-server#" "$unit" >"$work/units/$(basename "$unit")"
  done
  cp "$work/units/shop@.service" "$work/units/shop@8081.service"
  systemd-analyze verify "$work/units/shop@8081.service" "$work/units/shop-migrate.service" \
    || die "systemd-analyze verify"
  say "systemd units verified"
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
psql -q "$pg_admin/postgres" -c "CREATE DATABASE \"$db\"" >/dev/null
url="$pg_admin/$db?sslmode=disable"
export SHOP_DATABASE_URL=$url SHOP_REDIS_URL=$redis_url SHOP_STOCK_STRATEGY=$strategy
export SHOP_REDIS_KEY_PREFIX="smoke-$db" SHOP_ADMIN_TOKEN="smoke-admin-token"
export SHOP_AUTH_SECRET="smoke-secret-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
# Signing 1,000 buyers up is set-up, not what is checked: the cheapest hashing.
export SHOP_PASSWORD_HASH_MEMORY_KIB=8 SHOP_PASSWORD_HASH_ITERATIONS=1 SHOP_SEED_DEMO=false
export RUST_LOG=warn
"$bin/shop-server" migrate

ports=()
for i in 1 2; do
  port=$(free_port); ports+=("$port")
  SHOP_HTTP_ADDR="127.0.0.1:$port" "$bin/shop-server" serve >"$work/instance-$i.log" 2>&1 &
  pids+=($!)
done
for port in "${ports[@]}"; do
  curl -s -f -o /dev/null --retry 60 --retry-delay 1 --retry-connrefused --retry-all-errors \
    "http://127.0.0.1:$port/health/ready" || die "instance on $port never became ready"
done
say "instances ${pids[*]} ready on ports ${ports[*]}"

nginx_port=$(free_port)
mkdir -p "$work/nginx"
sed -e "s#127.0.0.1:8081#127.0.0.1:${ports[0]}#" -e "s#127.0.0.1:8082#127.0.0.1:${ports[1]}#" \
    -e "s#listen 127.0.0.1:8080#listen 127.0.0.1:$nginx_port#" \
    -e "s#/var/log/nginx/shop.access.log#$work/access.log#" deploy/nginx/shop.conf >"$work/nginx/shop.conf"
user_line=""; [ "$(id -u)" = 0 ] && user_line="user root;"
cat >"$work/nginx.conf" <<CONF
$user_line
worker_processes 2;
pid $work/nginx.pid;
error_log $work/error.log warn;
events { worker_connections 4096; }
http {
    client_body_temp_path $work/nginx/body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fastcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    include $work/nginx/shop.conf;
}
CONF
"$nginx_bin" -t -q -c "$work/nginx.conf" -p "$work" || die "nginx -t"
"$nginx_bin" -c "$work/nginx.conf" -p "$work"
base="http://127.0.0.1:$nginx_port"
curl -s -f -o /dev/null --retry 20 --retry-delay 1 --retry-connrefused "$base/health/ready" || die "nginx does not answer"
say "nginx on $nginx_port in front of them"

"$bin/shop-smoke" --base "$base" --admin-token "$SHOP_ADMIN_TOKEN" --database-url "$url" \
  --buyers "$buyers" --stock "$stock" --kill-pid "${pids[1]}" --kill-after $((buyers / 4)) || { keep=1; die "the race (logs in $work)"; }
wait "${pids[1]}" 2>/dev/null || true
retried=$(grep -c 'upstream_status=[0-9]*, ' "$work/access.log" || true)
say "nginx sent $retried requests on to the other instance after the kill"

# The surviving instance serves alone; stopped gracefully it exits 0, and nginx answers for it.
curl -s -f -o /dev/null "$base/health/ready" || die "the surviving instance is not served through nginx"
kill -TERM "${pids[0]}"
status=0; wait "${pids[0]}" || status=$?
[ "$status" = 0 ] || die "the surviving instance exited $status after SIGTERM"
pids=()
headers=$(curl -s -o "$work/down.json" -D - "$base/api/v1/products/1")
echo "$headers" | grep -q '^HTTP/1.1 503' || die "with no instance, nginx answered: $(echo "$headers" | head -1)"
echo "$headers" | grep -qi '^retry-after: ' || die "nginx's 503 has no Retry-After"
grep -q '"code":"SERVICE_UNAVAILABLE"' "$work/down.json" || die "nginx's 503 is not the problem document"
say "SIGTERM: the last instance exited 0; nginx answers 503 SERVICE_UNAVAILABLE with Retry-After"
say "passed"
