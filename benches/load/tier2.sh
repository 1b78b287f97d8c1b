#!/usr/bin/env bash
# The tier-2 round of the load benchmark: what a hit costs when it comes from the shared
# Redis tier instead of the proxy's own memory. One redis-server, one simulator, two
# proxies A and B with the same [cache.shared]. A fills Redis with T2_KEYS distinct
# sessions (gen-t2-<i>); then a fresh B is asked for each of them once (every answer a
# tier-2 hit: a memory miss, one Redis round trip, no Graph call), then once more (every
# answer a tier-1 hit). Each pass is repeated T2_REPEATS times, each time with a new B
# (an empty memory), and the median is reported.
#
#   bash benches/load/tier2.sh            (compare.sh also runs it at its end; TIER2=0 there skips it)
#
# Environment: T2_KEYS (sessions, 20000), T2_CONNS (client connections, 64), T2_THREADS
# (client threads, 2), T2_REPEATS (3), T2_SERIAL (2000 more sessions, asked for over one
# connection: the latency of one hit on an otherwise idle proxy; 0: skip), KEEP_WORK (1:
# keep the temp dir).
# Markdown on stdout, progress on stderr, JSON in target/bench-results/tier2.json (with
# RECORD=1: benches/results/tier2.json, the tracked file the README quotes).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

KEYS=${T2_KEYS:-20000}
CONNS=${T2_CONNS:-64}
THREADS=${T2_THREADS:-2}
REPEATS=${T2_REPEATS:-3}
SERIAL=${T2_SERIAL:-2000}

TENANT=5466a424-aadf-425c-9b24-034ca28d4bdd
CLIENT_ID=00000000-0000-0000-0000-00000000c11e
CLIENT_SECRET=sim-client-secret
EVENT="f8ce2a5f-0e6a-4186-aa90-1f64bc023566@$TENANT"
API_KEY=bench-key
PREFIX="/sessions/webinars/$EVENT/gen-t2-"
KEY_PREFIX="gsp-bench:"

LOG_TAG=tier2
WORK_PREFIX=gsp-tier2
# shellcheck source=benches/load/common.sh
source "$ROOT/benches/load/common.sh"

for tool in curl python3 cargo redis-server redis-cli sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (redis-server: apt-get install redis-server)"
done

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime (ticks) of PID (the proxy and redis-server are one process each)
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
busy_ticks() { # all CPUs' non-idle time since boot (ticks)
    awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}
sim_graph_requests() {
    curl -sf "http://127.0.0.1:$SIM/_sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["graph_requests"])'
}
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS" --no-auth-warning -a "$REDIS_PASSWORD" "$@"; }
redis_info() { # SECTION FIELD
    rcli INFO "$1" | tr -d '\r' | awk -F: -v f="$2" '$1 == f {print $2}'
}

# ---------------------------------------------------------------- build
log "building (release, walk client)"
cargo build --release --quiet >&2
cargo bench --bench walk --no-run --quiet >&2
WALK_BIN=$(cargo bench --bench walk --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "walk" and m.get("executable"):
        print(m["executable"])')
[[ -x "$WALK_BIN" ]] || die "walk binary not found"
PROXY_BIN=$ROOT/target/release/graph-session-proxy

# ---------------------------------------------------------------- redis, simulator
read -r SIM REDIS A A_ADMIN <<<"$(free_ports 4)"
REDIS_PASSWORD="bench-$RANDOM$RANDOM"
mkdir -p "$WORK/redis"
# No persistence: the round measures the cache, not the disk.
redis-server --port "$REDIS" --bind 127.0.0.1 --requirepass "$REDIS_PASSWORD" \
    --save "" --appendonly no --dir "$WORK/redis" --daemonize no \
    >"$WORK/redis/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 100); do rcli PING 2>/dev/null | grep -q PONG && break; sleep 0.05; done
rcli PING | grep -q PONG || die "redis-server does not answer: $(tail -3 "$WORK/redis/redis.log")"
log "redis $(redis-server --version | awk '{print $3}') on $REDIS"

"$PROXY_BIN" sim --listen "127.0.0.1:$SIM" >"$WORK/sim.log" 2>&1 &
PIDS+=("$!")
wait_http "http://127.0.0.1:$SIM/_sim/stats"

KEY_SHA=$(printf %s "$API_KEY" | sha256sum | cut -d' ' -f1)
write_proxy_config() { # FILE LISTEN_PORT ADMIN_PORT
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

[cache.shared]
redis_url = "redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS/0"
key_prefix = "$KEY_PREFIX"

[callers]
mode = "api_key"

[[callers.api_keys]]
name = "bench"
sha256 = "$KEY_SHA"

[log]
level = "warn"
EOF
}
start_proxy() { # NAME PORT ADMIN -> PROXY_PID
    write_proxy_config "$WORK/$1.toml" "$2" "$3"
    env -u RUST_LOG "$PROXY_BIN" serve --config "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_http "http://127.0.0.1:$3/healthz"
}
stop_proxy() { # PID
    kill -TERM "$1"
    wait "$1" 2>/dev/null || true
}
walk() { # PORT FIRST COUNT CONNS OUT.json: each of COUNT paths once; client CPU s in OUT.cpu
    local TIMEFORMAT='%U %S'
    { time "$WALK_BIN" --port "$1" --auth "$API_KEY" --prefix "$PREFIX" --first "$2" \
        --keys "$3" --conns "$4" --threads "$THREADS" >"$5"; } 2>"$5.time" \
        || die "walk against $1 failed: $(cat "$5" "$5.time")"
    awk '{printf "%.2f", $1 + $2}' "$5.time" >"${5%.json}.cpu"
}

# ---------------------------------------------------------------- fill through A
start_proxy a "$A" "$A_ADMIN"
A_PID=$PROXY_PID
USED_EMPTY=$(redis_info memory used_memory)
G0=$(sim_graph_requests)
log "filling Redis through A: $KEYS + $SERIAL sessions"
walk "$A" 0 "$((KEYS + SERIAL))" "$CONNS" "$WORK/fill.json"
G1=$(sim_graph_requests)
DBSIZE=$(rcli DBSIZE)
USED_FULL=$(redis_info memory used_memory)
rcli --scan --pattern "${KEY_PREFIX}e:*" >"$WORK/entry-keys.txt"
SAMPLE_KEY=$(head -1 "$WORK/entry-keys.txt")
ENTRY_KEYS=$(wc -l <"$WORK/entry-keys.txt")
SAMPLE_LEN=$(rcli STRLEN "$SAMPLE_KEY")
SAMPLE_USAGE=$(rcli MEMORY USAGE "$SAMPLE_KEY")
log "fill: $(cat "$WORK/fill.json")"
log "redis: $DBSIZE keys ($ENTRY_KEYS entries), used_memory $USED_EMPTY -> $USED_FULL B; Graph calls $((G1 - G0))"
stop_proxy "$A_PID"

# ---------------------------------------------------------------- measure on B
: >"$WORK/runs.tsv"
for ((r = 1; r <= REPEATS; r++)); do
    read -r B B_ADMIN <<<"$(free_ports 2)"
    start_proxy "b$r" "$B" "$B_ADMIN"
    B_PID=$PROXY_PID
    # A key outside the set, so the token and B's Redis connection exist before the clock.
    curl -sf -o /dev/null -H "Authorization: Bearer $API_KEY" \
        "http://127.0.0.1:$B/sessions/webinars/$EVENT/gen-t2-warm-$r" || die "B does not answer"
    # Under load (CONNS connections over keys 0..KEYS), then one at a time (SERIAL more).
    passes=("tier2 0 $KEYS $CONNS" "tier1 0 $KEYS $CONNS")
    ((SERIAL > 0)) && passes+=("tier2_serial $KEYS $SERIAL 1" "tier1_serial $KEYS $SERIAL 1")
    for spec in "${passes[@]}"; do
        read -r pass first count conns <<<"$spec"
        g0=$(sim_graph_requests)
        hits0=$(redis_info stats keyspace_hits)
        b0=$(cpu_ticks "$B_PID")
        r0=$(cpu_ticks "$REDIS_PID")
        x0=$(busy_ticks)
        walk "$B" "$first" "$count" "$conns" "$WORK/$pass-$r.json"
        x1=$(busy_ticks)
        r1=$(cpu_ticks "$REDIS_PID")
        b1=$(cpu_ticks "$B_PID")
        hits1=$(redis_info stats keyspace_hits)
        g1=$(sim_graph_requests)
        # CPU of anything but B, Redis and the client: other work on this machine.
        read -r b_s redis_s other_s < <(awk -v b="$((b1 - b0))" -v r="$((r1 - r0))" -v x="$((x1 - x0))" \
            -v w="$(cat "$WORK/$pass-$r.cpu")" -v hz="$CLK_TCK" \
            'BEGIN {o = x / hz - b / hz - r / hz - w; if (o < 0) o = 0; printf "%.2f %.2f %.2f\n", b / hz, r / hz, o}')
        echo "$pass $r $WORK/$pass-$r.json b_cpu_s=$b_s redis_cpu_s=$redis_s client_cpu_s=$(cat "$WORK/$pass-$r.cpu") other_cpu_s=$other_s graph_calls=$((g1 - g0)) redis_keyspace_hits=$((hits1 - hits0))" >>"$WORK/runs.tsv"
        log "B#$r $pass: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.0f req/s p50 %d p99 %d p99.9 %d us, %s" % (d["requests_per_s"], d["p50_us"], d["p99_us"], d["p999_us"], d["cache_status"]))' "$WORK/$pass-$r.json"), B cpu ${b_s}s, redis ${redis_s}s, other ${other_s}s, Graph calls $((g1 - g0))"
    done
    stop_proxy "$B_PID"
done

# ---------------------------------------------------------------- report
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
        "date": out("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "commit": out("git -C '$ROOT' rev-parse --short HEAD"),
    },
    "versions": {"redis": out("redis-server --version"), "rustc": out("rustc --version")},
    "settings": {"keys": $KEYS, "serial_keys": $SERIAL, "connections": $CONNS, "client_threads": $THREADS, "repeats": $REPEATS},
    "redis": {
        "keys_after_fill": $DBSIZE, "entries_after_fill": $ENTRY_KEYS, "used_memory_empty": $USED_EMPTY, "used_memory_full": $USED_FULL,
        "sample_value_bytes": $SAMPLE_LEN, "sample_memory_usage": $SAMPLE_USAGE,
    },
    "fill_graph_calls": $((G1 - G0)),
}, open("/dev/stdout", "w"))
EOF
python3 "$ROOT/benches/load/report.py" tier2 "$WORK" "$RESULTS/tier2.json"
