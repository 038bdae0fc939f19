#!/usr/bin/env bash
# Starts N shop-server instances (release build) on ports 8081.. against one database; Ctrl-C stops them all.
# usage: deploy/run-instances.sh N DATABASE_URL [extra SHOP_* settings are taken from the environment]
set -euo pipefail
n=${1:?usage: run-instances.sh N DATABASE_URL}
url=${2:?usage: run-instances.sh N DATABASE_URL}
bin="$(dirname "$0")/../target/release/shop-server"
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
SHOP_DATABASE_URL=$url "$bin" migrate
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
for i in $(seq 1 "$n"); do
  SHOP_DATABASE_URL=$url SHOP_HTTP_ADDR=127.0.0.1:$((8080 + i)) "$bin" &
  pids+=($!)
done
wait
