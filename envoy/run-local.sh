#!/usr/bin/env bash
# `make run`: the demo backend on :8000, workload-extproc on :9002 (admin :9003)
# and Envoy on :10000 (admin :9901), in the foreground. Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT INT TERM

# CAPACITY=static|metrics|adaptive (make run CAPACITY=metrics): which gate decides
# how many requests reach the demo backend, which runs 4 at once.
SHARED=()
case "${CAPACITY:-static}" in
  static) GATE=(--max-concurrency 4) ;;
  metrics) GATE=(--capacity metrics --backend-metrics-url http://127.0.0.1:8000/metrics
                 --waiting-threshold 2 --max-concurrency 16) ;;
  adaptive) GATE=(--capacity adaptive --max-concurrency 16) ;;
  *) echo "CAPACITY must be static, metrics or adaptive" >&2; exit 2 ;;
esac

CONFIG=envoy/envoy.yaml
if [ "${ENDPOINTS:-0}" = 3 ]; then
  # make run ENDPOINTS=3: workload-extproc as the pool's endpoint picker. Three demo
  # model servers of different speeds (1x, 2x, 4x) with a simulated prefix cache on
  # :8001-8003; Envoy on envoy-pool.yaml (full-duplex bodies, routed to the
  # endpoint the service picks); the service scrapes and picks among them.
  for i in 1 2 3; do
    "$BIN/extproc" demo-backend --listen "127.0.0.1:800$i" --concurrency 4 \
      --speed "$((1 << (i - 1)))" --prefix-cache-blocks 256 &
  done
  # --fallbacks 2: override-host retries a connection failure on the next endpoint named.
  GATE=(--endpoints 127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003 --policy fair-share
        --fallbacks 2)
  CONFIG=envoy/envoy-pool.yaml
elif [ "${ENDPOINTS:-0}" != 0 ]; then
  echo "ENDPOINTS must be 3 (or unset)" >&2; exit 2
else
  "$BIN/extproc" demo-backend --listen 127.0.0.1:8000 --concurrency 4 &
fi
if [ "${REPLICAS:-1}" = 2 ]; then
  # make run REPLICAS=2: two replicas share one Redis (started here on :6379) and
  # one fleet-wide limit; Envoy's ext_proc cluster gets the second as an endpoint.
  command -v redis-server >/dev/null || { echo "REPLICAS=2 needs redis-server (apt-get install redis-server)" >&2; exit 2; }
  redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --loglevel warning &
  SHARED=(--registry redis://127.0.0.1:6379/0)
  "$BIN/extproc" serve "${GATE[@]}" "${SHARED[@]}" --listen 127.0.0.1:9012 \
    --admin-listen 127.0.0.1:9013 --log-format console "$@" &
  CONFIG=$(mktemp --suffix .yaml)
  "$BIN/python" - "$CONFIG" <<'PY'
import copy, sys, yaml
config = yaml.safe_load(open("envoy/envoy.yaml"))
for cluster in config["static_resources"]["clusters"]:
    if cluster["name"] == "workload_extproc":
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        second = copy.deepcopy(endpoints[0])
        second["endpoint"]["address"]["socket_address"]["port_value"] = 9012
        endpoints.append(second)
yaml.safe_dump(config, open(sys.argv[1], "w"))
PY
fi
"$BIN/extproc" serve "${GATE[@]}" "${SHARED[@]}" --log-format console "$@" &
"$BIN/envoy" -c "$CONFIG" --disable-hot-restart --concurrency 2 --log-level warning &

"$BIN/python" - <<'PY'
import time, urllib.request
deadline = time.monotonic() + 30
for url in ("http://127.0.0.1:9901/ready", "http://127.0.0.1:9003/readyz"):
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"not ready: {url}")
            time.sleep(0.1)
PY

cat <<'MSG'

workload-extproc is running behind Envoy. Try:

  curl -N -H 'x-workload-context: {"workload_id": "team-a", "criticality": 4}' \
    -H 'content-type: application/json' http://127.0.0.1:10000/v1/chat/completions \
    -d '{"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'

  # eight at once from two workloads: four run, the rest queue and are released fairly
  for i in $(seq 8); do curl -s -o /dev/null -w "%{http_code}\n" -H "x-workload-context: {\"workload_id\": \"team-$((i % 2))\"}" -H 'content-type: application/json' -d '{"model": "demo", "prompt": "Hi"}' http://127.0.0.1:10000/v1/completions & done

  # the official openai SDK, unchanged (pip install openai):
  #   OpenAI(base_url="http://127.0.0.1:10000/v1", api_key="unused",
  #          default_headers={"x-workload-context": '{"workload_id": "team-a"}'})

  curl -s http://127.0.0.1:9003/v1/workloads      # what the registry knows
  curl -s http://127.0.0.1:9003/metrics           # Prometheus metrics
  curl -s http://127.0.0.1:9003/v1/capacity       # the capacity gate (make run CAPACITY=metrics)

With ENDPOINTS=3, see where each request went (x-served-by is the endpoint Envoy
routed to, the one the service named in x-gateway-destination-endpoint):

  # a ~700-byte shared prompt (eleven 64-byte blocks) then a question: prefix affinity
  P=$(printf 'You are a careful assistant who answers briefly. %.0s' $(seq 14))
  for i in $(seq 6); do curl -s -o /dev/null -D - -H 'content-type: application/json' \
    -d '{"model": "demo", "prompt": "'"$P"'question '$i'", "max_tokens": 8}' \
    http://127.0.0.1:10000/v1/completions | grep -i x-served-by; done
  curl -s http://127.0.0.1:9003/v1/endpoints      # picks, prefix hits, load per endpoint

Watch every workload live, in another terminal:

  .venv/bin/extproc top

Ctrl-C stops the backend, the service and Envoy.
MSG
wait
