#!/usr/bin/env bash
# Makes sure a Redis server answers on 127.0.0.1:6379 (installing it if missing).
set -euo pipefail
answers() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
if command -v redis-cli >/dev/null && answers; then exit 0; fi
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
redis-server --daemonize yes --port 6379 --save "" --appendonly no >/dev/null
for _ in $(seq 50); do answers && exit 0; sleep 0.1; done
echo "redis-server did not answer on 127.0.0.1:6379" >&2
exit 1
