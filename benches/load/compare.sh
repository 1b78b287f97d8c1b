#!/usr/bin/env bash
# "Prove it is fast": graph-session-proxy against nginx and Varnish (both as caching
# reverse proxies in front of the same simulated Graph) and against a "ceiling" (a bare
# hyper server answering the same bytes), on one machine over loopback; then a cold
# stampede round and a memory round for the proxy alone; last, the tier-2 round
# (benches/load/tier2.sh: two proxies sharing one Redis, tier-2 hits against tier-1 hits).
#
#   DURATION=20 ROUNDS=3 bash benches/load/compare.sh [--record]
#   bash benches/load/tier2.sh             (the tier-2 round alone)
#
# The proxy runs in three configurations side by side: `proxy` (callers.mode = "none",
# log level warn), `proxy_keys` (API-key callers, info: an access line per request, to a
# file; as deployed) and `proxy_jwt` (JWT callers, one RS256 token repeated, warn).
#
# Environment: DURATION (s per wrk run, 20), ROUNDS (3), CONNS (wrk connections, 64),
# THREADS (wrk threads, 2), WARMUP (s, 3), COLD (stampede size, 1000), STAMPEDE_GRAPH_MS
# (Graph latency injected for the second stampede pair, 100; 0: none), MEM_SESSIONS
# (100000), MEM_CONNS (200), QUIET_WAIT (s to wait for an idle machine, 1800), RETRIES
# (tries of a run disturbed by other processes, 3), PROFILE (auto: a perf profile of the
# proxy under load, in proxy-profile.txt beside the results, when it misses a throughput
# target; 1: always; 0: never), KEEP_WORK (1: keep the temp dir), TIER2 (0: skip the
# tier-2 round; its own settings are in tier2.sh's header).
# Markdown on stdout, progress on stderr, JSON and the SVG plots (latency.svg: percentile
# curves; throughput.svg: req/s and CPU µs per request) in target/bench-results/ (and
# tier2.json); with --record (or RECORD=1) in benches/results/ instead (the tracked
# results the README shows).
# Needs root for apt-get when nginx, varnish or wrk are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
for arg in "$@"; do
    case "$arg" in
        --record) export RECORD=1 ;;
        *) echo "usage: compare.sh [--record]" >&2; exit 2 ;;
    esac
done

DURATION=${DURATION:-20}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
WARMUP=${WARMUP:-3}
COLD=${COLD:-1000}
MEM_SESSIONS=${MEM_SESSIONS:-100000}
MEM_CONNS=${MEM_CONNS:-200}

TENANT=5466a424-aadf-425c-9b24-034ca28d4bdd
CLIENT_ID=00000000-0000-0000-0000-00000000c11e
CLIENT_SECRET=sim-client-secret
EVENT="f8ce2a5f-0e6a-4186-aa90-1f64bc023566@$TENANT"
EVENT_ENC="f8ce2a5f-0e6a-4186-aa90-1f64bc023566%40$TENANT"
SESSION=gen-bench-1
API_KEY=bench-key
CLIENT_PATH="/sessions/webinars/$EVENT/$SESSION"   # the path every server is asked for
GRAPH_PATH="/v1.0/solutions/virtualEvents/webinars/$EVENT_ENC/sessions/$SESSION"

LOG_TAG=compare
WORK_PREFIX=gsp-compare
# shellcheck source=benches/load/common.sh
source "$ROOT/benches/load/common.sh"

# ---------------------------------------------------------------- 1. tools
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v varnishd >/dev/null || need+=(varnish)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2; }
    # Packages may start system services on default ports: not ours, stop them.
    service nginx stop >/dev/null 2>&1 || true
    service varnish stop >/dev/null 2>&1 || true
    service varnishncsa stop >/dev/null 2>&1 || true
fi
for tool in curl python3 cargo nginx varnishd wrk sha256sum openssl; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
# The plots (benches/load/plot.py) are drawn with matplotlib: pip for this python3, else
# the distribution's package (PEP 668 systems); without it the run goes on, unplotted.
python3 -c 'import matplotlib' 2>/dev/null || {
    log "installing matplotlib"
    python3 -m pip install --quiet matplotlib >&2 2>/dev/null \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-matplotlib >&2 \
        || true
    python3 -c 'import matplotlib' 2>/dev/null || log "warning: no matplotlib: the run will not draw its plots"
}
# 1000 concurrent connections on each side of the stampede need descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

tree_pids() { # PID and all its descendants
    local p=$1 c
    echo "$p"
    for c in $(pgrep -P "$p" 2>/dev/null); do tree_pids "$c"; done
}
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime (ticks) summed over the process tree of PID
    local t=0 p v
    for p in $(tree_pids "$1"); do
        v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || continue
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
status_kb() { # FIELD PID: /proc/*/status FIELD (kB) summed over the process tree
    local t=0 p v
    for p in $(tree_pids "$2"); do
        v=$(awk -v f="$1:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null) || continue
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
sim_graph_requests() {
    curl -sf "http://127.0.0.1:$SIM/_sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["graph_requests"])'
}

# ---------------------------------------------------------------- 2. build
log "building (release, ceiling bench)"
cargo build --release --quiet >&2
bench_bin() { # NAME: the executable of bench target NAME
    cargo bench --bench "$1" --no-run --quiet >&2
    cargo bench --bench "$1" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}
CEILING_BIN=$(bench_bin ceiling)
[[ -x "$CEILING_BIN" ]] || die "ceiling binary not found"
PROXY_BIN=$ROOT/target/release/graph-session-proxy

read -r SIM PROXY ADMIN NGINX VARNISH CEIL PROXY2 ADMIN2 KEYS KEYS_ADMIN JWT JWT_ADMIN JWKS MEM MEM_ADMIN <<<"$(free_ports 15)"
log "ports: sim $SIM proxy $PROXY/$ADMIN (none $PROXY2, keys $KEYS, jwt $JWT) nginx $NGINX varnish $VARNISH ceiling $CEIL"

# ---------------------------------------------------------------- 3. simulator
"$PROXY_BIN" sim --listen "127.0.0.1:$SIM" >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
PIDS+=("$SIM_PID")
wait_http "http://127.0.0.1:$SIM/_sim/stats"
TOKEN=$(curl -sf -X POST "http://127.0.0.1:$SIM/$TENANT/oauth2/v2.0/token" \
    --data-urlencode grant_type=client_credentials --data-urlencode "client_id=$CLIENT_ID" \
    --data-urlencode "client_secret=$CLIENT_SECRET" \
    --data-urlencode scope=https://graph.microsoft.com/.default |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
[[ -n "$TOKEN" ]] || die "no token from the simulator"
curl -sf -H "Authorization: Bearer $TOKEN" -o "$WORK/body.json" "http://127.0.0.1:$SIM$GRAPH_PATH" \
    || die "simulator does not serve $GRAPH_PATH"
BODY_BYTES=$(stat -c %s "$WORK/body.json")
log "session body: $BODY_BYTES bytes"
((BODY_BYTES > 1000 && BODY_BYTES < 2000)) || die "unexpected body size $BODY_BYTES"

# ---------------------------------------------------------------- 4. the servers
KEY_SHA=$(printf %s "$API_KEY" | sha256sum | cut -d' ' -f1)
write_proxy_config() { # FILE LISTEN_PORT ADMIN_PORT [CALLERS_TOML [LEVEL]]
    local callers=${4:-"mode = \"api_key\"

[[callers.api_keys]]
name = \"bench\"
sha256 = \"$KEY_SHA\""}
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"

[graph]
base_url = "http://127.0.0.1:$SIM"

[auth]
tenant_id = "$TENANT"
client_id = "$CLIENT_ID"
client_secret = "$CLIENT_SECRET"
token_url = "http://127.0.0.1:$SIM/{tenant}/oauth2/v2.0/token"

[cache]
ttl = "1h"
max_bytes = "${CACHE_MAX_BYTES:-256MiB}"

[callers]
$callers

[log]
level = "${5:-warn}"
EOF
}
start_proxy() { # CONFIG LOG -> PROXY_PID
    env -u RUST_LOG "$PROXY_BIN" serve --config "$1" >"$2" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
}
# The stampede's proxy (API keys, warn); the three measured configurations beside it.
write_proxy_config "$WORK/proxy.toml" "$PROXY" "$ADMIN"
start_proxy "$WORK/proxy.toml" "$WORK/proxy.log"
MAIN_PROXY_PID=$PROXY_PID
wait_http "http://127.0.0.1:$ADMIN/healthz"
# proxy: no caller authentication, warn.
write_proxy_config "$WORK/proxy-none.toml" "$PROXY2" "$ADMIN2" 'mode = "none"'
start_proxy "$WORK/proxy-none.toml" "$WORK/proxy-none.log"
NONE_PID=$PROXY_PID
# proxy_keys: API keys and an access line per request, to a file.
write_proxy_config "$WORK/proxy-keys.toml" "$KEYS" "$KEYS_ADMIN" "" info
start_proxy "$WORK/proxy-keys.toml" "$WORK/proxy-keys.log"
KEYS_PID=$PROXY_PID
# proxy_jwt: Entra-style app tokens (RS256) verified against a key set served here.
mkdir -p "$WORK/jwks"
cp "$ROOT/tests/fixtures/jwks.json" "$WORK/jwks/keys.json"
(cd "$WORK/jwks" && exec python3 -m http.server --bind 127.0.0.1 "$JWKS" >"$WORK/jwks.log" 2>&1) &
PIDS+=("$!")
JWT_ISSUER="https://login.microsoftonline.com/$TENANT/v2.0"
JWT_AUDIENCE="api://graph-session-proxy"
write_proxy_config "$WORK/proxy-jwt.toml" "$JWT" "$JWT_ADMIN" "mode = \"jwt\"

[callers.jwt]
issuer = \"$JWT_ISSUER\"
audience = \"$JWT_AUDIENCE\"
jwks_url = \"http://127.0.0.1:$JWKS/keys.json\"
required_roles = [\"Sessions.Read\"]"
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
JWT_HEAD=$(printf '{"alg":"RS256","typ":"JWT","kid":"test-rsa"}' | b64url)
NOW_S=$(date +%s)
JWT_BODY=$(printf '{"iss":"%s","aud":"%s","azp":"bench-app","sub":"bench-app","roles":["Sessions.Read"],"iat":%d,"nbf":%d,"exp":%d}' \
    "$JWT_ISSUER" "$JWT_AUDIENCE" "$NOW_S" "$((NOW_S - 60))" "$((NOW_S + 7200))" | b64url)
JWT_SIG=$(printf '%s.%s' "$JWT_HEAD" "$JWT_BODY" | openssl dgst -sha256 -sign "$ROOT/tests/fixtures/jwt-rsa.pem" -binary | b64url)
BENCH_JWT="$JWT_HEAD.$JWT_BODY.$JWT_SIG"
wait_http "http://127.0.0.1:$JWKS/keys.json"
start_proxy "$WORK/proxy-jwt.toml" "$WORK/proxy-jwt.log"
JWT_PID=$PROXY_PID
PROXY_PID=$MAIN_PROXY_PID
for port in "$ADMIN2" "$KEYS_ADMIN" "$JWT_ADMIN"; do wait_http "http://127.0.0.1:$port/healthz"; done

mkdir -p "$WORK/nginx/cache" "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
user $(id -un) $(id -gn);
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=sessions:10m max_size=1g inactive=2h use_temp_path=off;
    upstream graph {
        server 127.0.0.1:$SIM;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$NGINX;
        location /sessions/webinars/$EVENT/ {
            proxy_pass http://graph/v1.0/solutions/virtualEvents/webinars/$EVENT_ENC/sessions/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer $TOKEN";
            proxy_cache sessions;
            proxy_cache_lock on;
            proxy_cache_valid 200 1h;
            add_header X-Cache-Status \$upstream_cache_status;
        }
    }
}
EOF
nginx -t -q -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" -e "$WORK/nginx/error.log" >&2
nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" -e "$WORK/nginx/error.log" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")

mkdir -p "$WORK/varnish"
cat >"$WORK/varnish/default.vcl" <<EOF
vcl 4.1;
backend graph {
    .host = "127.0.0.1";
    .port = "$SIM";
}
sub vcl_recv {
    if (req.url !~ "^/sessions/(webinars|townhalls)/[^/?]+/[^/?]+\$") {
        return (synth(404));
    }
    set req.url = regsuball(req.url, "@", "%40");
    set req.url = regsub(req.url, "^/sessions/([a-z]+)/([^/]+)/([^/]+)\$",
        "/v1.0/solutions/virtualEvents/\1/\2/sessions/\3");
    unset req.http.Authorization;
    unset req.http.Cookie;
    return (hash);
}
sub vcl_backend_fetch {
    set bereq.http.Authorization = "Bearer $TOKEN";
}
sub vcl_backend_response {
    set beresp.ttl = 1h;
}
sub vcl_deliver {
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
}
EOF
# -j none: stay root instead of switching to the varnish users (our work dir is 0700).
varnishd -F -j none -a "127.0.0.1:$VARNISH" -T none -f "$WORK/varnish/default.vcl" \
    -s malloc,256m -n "$WORK/varnish/work" >"$WORK/varnish/varnishd.log" 2>&1 &
VARNISH_PID=$!
PIDS+=("$VARNISH_PID")

"$CEILING_BIN" --port "$CEIL" --body "$WORK/body.json" >"$WORK/ceiling.log" 2>&1 &
CEIL_PID=$!
PIDS+=("$CEIL_PID")

SERVERS=(proxy proxy_keys proxy_jwt nginx varnish ceiling)
declare -A URL PID AUTH
URL[proxy]="http://127.0.0.1:$PROXY2$CLIENT_PATH"
URL[proxy_keys]="http://127.0.0.1:$KEYS$CLIENT_PATH"
URL[proxy_jwt]="http://127.0.0.1:$JWT$CLIENT_PATH"
URL[nginx]="http://127.0.0.1:$NGINX$CLIENT_PATH"
URL[varnish]="http://127.0.0.1:$VARNISH$CLIENT_PATH"
URL[ceiling]="http://127.0.0.1:$CEIL$CLIENT_PATH"
PID[proxy]=$NONE_PID PID[proxy_keys]=$KEYS_PID PID[proxy_jwt]=$JWT_PID
PID[nginx]=$NGINX_PID PID[varnish]=$VARNISH_PID PID[ceiling]=$CEIL_PID
AUTH[proxy]="" AUTH[proxy_keys]="Bearer $API_KEY" AUTH[proxy_jwt]="Bearer $BENCH_JWT"
AUTH[nginx]="" AUTH[varnish]="" AUTH[ceiling]=""

for s in "${SERVERS[@]}"; do
    wait_http "${URL[$s]}"
    args=(-s -D "$WORK/$s.headers" -o "$WORK/$s.body" -w '%{http_code}')
    [[ -n "${AUTH[$s]}" ]] && args+=(-H "Authorization: ${AUTH[$s]}")
    code=$(curl "${args[@]}" "${URL[$s]}")   # first: a miss for the caches
    code=$(curl "${args[@]}" "${URL[$s]}")   # second: must be a hit
    if [[ "$code" != 200 ]]; then
        tail -5 "$WORK/nginx/error.log" "$WORK/varnish/varnishd.log" "$WORK/proxy.log" >&2 || true
        die "$s answered $code: $(head -c 300 "$WORK/$s.body")"
    fi
    cmp -s "$WORK/$s.body" "$WORK/body.json" || die "$s body differs from Graph's"
    hit=$(grep -iE '^(cache-status|x-cache-status|x-cache):' "$WORK/$s.headers" | tr -d '\r' || true)
    log "$s: 200, same $BODY_BYTES bytes as Graph${hit:+ ($hit)}"
done

# ---------------------------------------------------------------- 6. load
cat >"$WORK/bench.lua" <<'EOF'
local auth = os.getenv("WRK_AUTH")
if auth ~= nil and auth ~= "" then
    wrk.headers["Authorization"] = auth
end
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "RESULT rps=%.1f p50=%d p99=%d p999=%d requests=%d errors=%d\n",
        summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
        summary.requests, e.connect + e.read + e.write + e.status + e.timeout))
    -- The percentile curve (for latency.svg): percentile=microseconds pairs.
    local points = {}
    for _, p in ipairs({1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 98, 99, 99.5, 99.9, 99.95, 99.99}) do
        table.insert(points, string.format("%s=%d", p, latency:percentile(p)))
    end
    io.write("CURVE " .. table.concat(points, ",") .. "\n")
end
EOF
run_wrk() { # SERVER SECONDS -> the RESULT line; wrk's own CPU seconds in $WORK/wrk.cpu
    local TIMEFORMAT='%U %S'
    { time WRK_AUTH="${AUTH[$1]}" wrk -t"$THREADS" -c"$CONNS" -d"${2}s" --latency -s "$WORK/bench.lua" \
        "${URL[$1]}" >"$WORK/wrk-$1.out" 2>&1; } 2>"$WORK/wrk.time" \
        || die "wrk against $1 failed: $(cat "$WORK/wrk-$1.out")"
    awk '{printf "%.2f", $1 + $2}' "$WORK/wrk.time" >"$WORK/wrk.cpu"
    grep '^CURVE ' "$WORK/wrk-$1.out" | cut -d' ' -f2 >"$WORK/curve-$1.last" || true
    grep '^RESULT ' "$WORK/wrk-$1.out" || die "no result from wrk against $1"
}
busy_ticks() { # all CPUs' non-idle time since boot (USER_HZ ticks)
    awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}
idle_percent() { # over SECONDS
    local a b
    a=$(awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat)
    sleep "$1"
    b=$(awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat)
    echo "$a $b" | awk '{busy = $3 - $1; idle = $4 - $2; print int(100 * idle / (busy + idle + 0.001))}'
}
# The numbers mean something only on an otherwise idle machine: wait (up to QUIET_WAIT
# seconds) until no fuzzer runs and the CPUs are at least 90% idle.
QUIET_WAIT=${QUIET_WAIT:-1800}
wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) idle announced=0
    while :; do
        if ! pgrep -f cargo-fuzz >/dev/null; then
            idle=$(idle_percent 3)
            ((idle >= 90)) && return 0
        else
            idle="fuzzer running"
        fi
        if ((SECONDS >= deadline)); then
            log "warning: machine still busy ($idle% idle) after ${QUIET_WAIT}s; measuring anyway"
            return 0
        fi
        ((announced)) || log "waiting for an idle machine (now: $idle% idle)"
        announced=1
        sleep 10
    done
}

wait_quiet
log "warming up (${WARMUP}s each)"
for s in "${SERVERS[@]}"; do run_wrk "$s" "$WARMUP" >/dev/null; done
GRAPH_BEFORE=$(sim_graph_requests)

: >"$WORK/wrk.tsv"
RETRIES=${RETRIES:-3}
for ((r = 1; r <= ROUNDS; r++)); do
    # Rotate the order every round, so no server is always first or last.
    n=${#SERVERS[@]}
    order=("${SERVERS[@]:$(((r - 1) % n))}" "${SERVERS[@]:0:$(((r - 1) % n))}")
    for s in "${order[@]}"; do
        for ((try = 1; ; try++)); do
            b0=$(busy_ticks)
            t0=$(cpu_ticks "${PID[$s]}")
            line=$(run_wrk "$s" "$DURATION")
            t1=$(cpu_ticks "${PID[$s]}")
            b1=$(busy_ticks)
            # CPU time used by anything but this server and wrk: another process competing.
            read -r cpu other < <(awk -v a="$t0" -v b="$t1" -v x="$b0" -v y="$b1" -v w="$(cat "$WORK/wrk.cpu")" \
                -v hz="$CLK_TCK" 'BEGIN {c = (b - a) / hz; o = (y - x) / hz - c - w; if (o < 0) o = 0;
                                   printf "%.2f %.2f\n", c, o}')
            limit=$(awk -v d="$DURATION" -v n="$(nproc)" 'BEGIN {print 0.05 * d * n}')
            if awk -v o="$other" -v l="$limit" 'BEGIN {exit !(o > l)}' && ((try < RETRIES)); then
                log "round $r $s: other processes used ${other}s of CPU; waiting and repeating"
                wait_quiet
                continue
            fi
            break
        done
        log "round $r $s: ${line#RESULT } cpu_s=$cpu other_cpu_s=$other"
        echo "$s $r ${line#RESULT } cpu_s=$cpu other_cpu_s=$other" >>"$WORK/wrk.tsv"
        echo "$s $r $(cat "$WORK/curve-$s.last")" >>"$WORK/curves.tsv"
        sleep 1
    done
done
: >"$WORK/rss.tsv"
for s in "${SERVERS[@]}"; do
    echo "$s $(status_kb VmHWM "${PID[$s]}") $(tree_pids "${PID[$s]}" | wc -l)" >>"$WORK/rss.tsv"
done
GRAPH_AFTER=$(sim_graph_requests)

# ---------------------------------------------------------------- 7. profile
# PROFILE=auto (default): only when the proxy misses a throughput target.
targets_missed() {
    python3 - "$WORK/wrk.tsv" <<'EOF'
import statistics, sys
rps = {}
for line in open(sys.argv[1]):
    parts = line.split()
    rps.setdefault(parts[0], []).append(float(parts[2].split("=")[1]))
m = {k: statistics.median(v) for k, v in rps.items()}
ok = m["proxy"] >= 1.5 * max(m["nginx"], m["varnish"]) and m["proxy"] >= 0.8 * m["ceiling"]
sys.exit(1 if ok else 0)
EOF
}
PROFILE=${PROFILE:-auto}
if [[ "$PROFILE" == auto ]]; then
    if targets_missed; then PROFILE=1; else PROFILE=0; fi
fi
if [[ "$PROFILE" == 1 ]]; then
    if command -v perf >/dev/null || { apt-get install -y --no-install-recommends linux-perf >&2 && command -v perf >/dev/null; }; then
        log "profiling the proxy under the same load (perf, 8 s, DWARF call graphs)"
        WRK_AUTH="${AUTH[proxy]}" wrk -t"$THREADS" -c"$CONNS" -d12s -s "$WORK/bench.lua" "${URL[proxy]}" >/dev/null 2>&1 &
        WRK_PID=$!
        PIDS+=("$WRK_PID")
        sleep 2
        perf record -q --call-graph dwarf,16384 -F 999 -o "$WORK/perf.data" -p "${PID[proxy]}" -- sleep 8 >/dev/null 2>&1 || true
        wait "$WRK_PID" || true
        P="$RESULTS/proxy-profile.txt"
        {
            echo "# perf profile of graph-session-proxy under wrk -t$THREADS -c$CONNS (hits only)"
            echo "## share of samples by binary"
            perf report -i "$WORK/perf.data" --stdio --no-children --sort dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
            echo "## self time by symbol (top 40)"
            perf report -i "$WORK/perf.data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.3 2>/dev/null \
                | grep -v '^#' | grep -v '^$' | head -40 | cut -c1-180
            echo "## inclusive time by symbol (top 80)"
            perf report -i "$WORK/perf.data" --stdio --children --sort symbol -g none --percent-limit 1 2>/dev/null \
                | grep -v '^#' | grep -v '^$' | head -80 | cut -c1-180
        } >"$P" || true
        cp "$P" "$WORK/profile.txt"
        log "profile in $P"
    else
        log "perf not available: no profile"
    fi
fi

# ---------------------------------------------------------------- 8. cold stampede
# Each case once with Graph answering at once and once with Graph answering after
# STAMPEDE_GRAPH_MS (injected by the simulator), as the real Graph takes 100 ms or more:
# then every request of the burst arrives while the first Graph call is still running.
stampede() { # NAME PREFIX KEYS GRAPH_MS
    local before after
    curl -sf -X POST -H 'content-type: application/json' \
        -d "{\"graph_latency_ms\": $4}" "http://127.0.0.1:$SIM/_sim/faults" >/dev/null
    before=$(sim_graph_requests)
    python3 "$ROOT/benches/load/loadgen.py" stampede --port "$PROXY" --auth "$API_KEY" \
        --prefix "/sessions/webinars/$EVENT/$2" --first 1 --keys "$3" --requests "$COLD" >"$WORK/$1.json"
    after=$(sim_graph_requests)
    curl -sf -X POST -d '{"clear": true}' "http://127.0.0.1:$SIM/_sim/faults" >/dev/null
    python3 - "$WORK/$1.json" "$((after - before))" "$4" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
d["graph_calls"], d["graph_latency_ms"] = int(sys.argv[2]), int(sys.argv[3])
json.dump(d, open(sys.argv[1], "w"))
EOF
    log "stampede $1: $(cat "$WORK/$1.json")"
}
STAMPEDE_GRAPH_MS=${STAMPEDE_GRAPH_MS:-100}
log "cold stampede: $COLD first requests for $COLD keys, then for one key"
stampede stampede_distinct gen-cold- "$COLD" 0
stampede stampede_one gen-stampede- 1 0
if ((STAMPEDE_GRAPH_MS > 0)); then
    stampede stampede_distinct_slow "gen-cold-${STAMPEDE_GRAPH_MS}ms-" "$COLD" "$STAMPEDE_GRAPH_MS"
    stampede stampede_one_slow "gen-stampede-${STAMPEDE_GRAPH_MS}ms-" 1 "$STAMPEDE_GRAPH_MS"
fi

# ---------------------------------------------------------------- 9. memory
log "memory: a fresh proxy caching $MEM_SESSIONS sessions"
kill -TERM "$PROXY_PID"
wait "$PROXY_PID" 2>/dev/null || true
# Room for every session (100,000 of them weigh ~250 MiB): the round measures memory, not eviction.
CACHE_MAX_BYTES=1GiB write_proxy_config "$WORK/proxy-mem.toml" "$MEM" "$MEM_ADMIN"
start_proxy "$WORK/proxy-mem.toml" "$WORK/proxy-mem.log"
wait_http "http://127.0.0.1:$MEM_ADMIN/healthz"
RSS_IDLE=$(status_kb VmRSS "$PROXY_PID")
python3 "$ROOT/benches/load/loadgen.py" fill --port "$MEM" --auth "$API_KEY" \
    --prefix "/sessions/webinars/$EVENT/gen-mem-" --keys "$MEM_SESSIONS" --conns "$MEM_CONNS" >"$WORK/memory.json"
sleep 2  # let the cache's pending maintenance run
curl -sf "http://127.0.0.1:$MEM_ADMIN/metrics" >"$WORK/metrics.txt"
RSS_FULL=$(status_kb VmRSS "$PROXY_PID")
HWM_FULL=$(status_kb VmHWM "$PROXY_PID")
python3 - "$WORK/memory.json" "$WORK/metrics.txt" "$RSS_IDLE" "$RSS_FULL" "$HWM_FULL" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for line in open(sys.argv[2]):
    for name in ("graph_session_proxy_cache_entries", "graph_session_proxy_cache_bytes"):
        if line.startswith(name + " ") or line.startswith(name + "{"):
            d[name] = float(line.rsplit(" ", 1)[1])
d["rss_idle_kb"], d["rss_kb"], d["hwm_kb"] = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
json.dump(d, open(sys.argv[1], "w"))
EOF
log "memory: $(cat "$WORK/memory.json")"

# ---------------------------------------------------------------- 10. report
python3 - >"$WORK/meta.json" <<EOF
import json, subprocess
def out(cmd):
    try:
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except Exception:
        return None
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
json.dump({
    "machine": {
        "nproc": int(out("nproc")), "cpu_model": cpu, "kernel": out("uname -r"),
        "mem_total": out("grep MemTotal /proc/meminfo"), "date": out("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "commit": out("git -C '$ROOT' rev-parse --short HEAD"),
    },
    "versions": {
        "nginx": out("nginx -v"), "varnish": out("varnishd -V"), "wrk": out("wrk -v"),
        "rustc": out("rustc --version"),
    },
    "settings": {
        "duration_s": $DURATION, "rounds": $ROUNDS, "connections": $CONNS, "wrk_threads": $THREADS,
        "cold_requests": $COLD, "stampede_graph_ms": $STAMPEDE_GRAPH_MS, "mem_sessions": $MEM_SESSIONS, "mem_connections": $MEM_CONNS,
    },
    "body_bytes": $BODY_BYTES,
    "graph_calls_during_measurement": $GRAPH_AFTER - $GRAPH_BEFORE,
    "fuzzing_seen": $(pgrep -f cargo-fuzz >/dev/null && echo True || echo False),
}, open("/dev/stdout", "w"))
EOF
python3 "$ROOT/benches/load/report.py" "$WORK" "$RESULTS/latest.json"
if python3 "$ROOT/benches/load/plot.py" "$RESULTS/latest.json" "$RESULTS"; then
    log "plots: $RESULTS/latency.svg, $RESULTS/throughput.svg"
else
    log "warning: plots not drawn"
fi

# ---------------------------------------------------------------- 11. tier 2
# Its own servers (Redis, simulator, two proxies); ours above are idle by now.
if [[ "${TIER2:-1}" != 0 ]]; then
    echo
    bash "$ROOT/benches/load/tier2.sh"
fi
