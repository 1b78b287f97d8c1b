#!/usr/bin/env bash
# Instructions per cache hit: the proxy under valgrind's callgrind, which counts the
# instructions it executes in user space, not seconds. For the same binary, inputs and
# environment the count repeats whatever else the machine is doing, so it shows a change
# to the hit path that wrk's req/s on a noisy machine cannot (the kernel's share, ~65% of
# a hit's time under load, is not counted: compare.sh measures that).
#
#   bash benches/load/instructions.sh [BINARY ...]
#
# Each BINARY (default: target/release/graph-session-proxy, built here) serves one hot
# session; 300 hits warm it up, callgrind's counters are zeroed, then HITS (3000) hits
# over 4 keep-alive connections are counted. MODE: none (callers.mode = "none", warn;
# default) or keys (API-key callers, an info access line per request to a file, as
# deployed); LEVEL overrides the log level (MODE=keys LEVEL=warn: the key check without
# the access line). Prints one markdown row per binary on stdout. Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HITS=${HITS:-3000}
MODE=${MODE:-none}
LOG_TAG=instructions
WORK_PREFIX=gsp-instructions
# shellcheck source=benches/load/common.sh
source "$ROOT/benches/load/common.sh"

command -v valgrind >/dev/null || die "valgrind not found (apt-get install valgrind)"
if (($# == 0)); then
    log "building (release)"
    cargo build --release --quiet >&2
    set -- "$ROOT/target/release/graph-session-proxy"
fi

TENANT=5466a424-aadf-425c-9b24-034ca28d4bdd
EVENT="f8ce2a5f-0e6a-4186-aa90-1f64bc023566@$TENANT"
HIT_PATH="/sessions/webinars/$EVENT/gen-bench-1"
KEY=bench-key
KEY_SHA=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
case "$MODE" in
    none) CALLERS='mode = "none"'; LEVEL=${LEVEL:-warn} ;;
    keys) CALLERS="mode = \"api_key\"

[[callers.api_keys]]
name = \"bench\"
sha256 = \"$KEY_SHA\""; LEVEL=${LEVEL:-info} ;;
    *) die "MODE must be none or keys" ;;
esac

hits() { # PORT N CONNS: N hits, CONNS connections, each answer read whole
    python3 - "$@" "$HIT_PATH" "$KEY" <<'EOF'
import socket, sys
port, n, conns, path, key = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
req = f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
for _ in range(n // conns):
    for s in socks:
        s.sendall(req)
    for s in socks:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            sys.exit(f"answer {status}, not a hit")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
        while len(rest) < length:
            rest += s.recv(65536)
EOF
}

echo "| binary | mode | hits counted | instructions | per hit |"
echo "|---|---|---:|---:|---:|"
for bin in "$@"; do
    [[ -x "$bin" ]] || die "$bin is not an executable"
    read -r SIM PORT ADMIN <<<"$(free_ports 3)"
    "$bin" sim --listen "127.0.0.1:$SIM" >"$WORK/sim.log" 2>&1 &
    PIDS+=("$!")
    wait_http "http://127.0.0.1:$SIM/_sim/stats"
    cat >"$WORK/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN"

[graph]
base_url = "http://127.0.0.1:$SIM"

[auth]
tenant_id = "$TENANT"
client_id = "00000000-0000-0000-0000-00000000c11e"
client_secret = "sim-client-secret"
token_url = "http://127.0.0.1:$SIM/{tenant}/oauth2/v2.0/token"

[cache]
ttl = "1h"

[callers]
$CALLERS

[log]
level = "$LEVEL"
EOF
    rm -f "$WORK"/callgrind.out*
    (cd "$WORK" && exec env -u RUST_LOG valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" \
        "$bin" serve --config "$WORK/proxy.toml" >"$WORK/proxy.log" 2>&1) &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    for _ in $(seq 600); do curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$ADMIN/healthz" && break; sleep 0.1; done
    hits "$PORT" 300 1
    callgrind_control -z "$PROXY_PID" >/dev/null 2>&1
    hits "$PORT" "$HITS" 4
    callgrind_control -d "$PROXY_PID" >/dev/null 2>&1
    sleep 1
    dump=$(ls -t "$WORK"/callgrind.out* | head -1)
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
    [[ -n "$total" ]] || die "no counts in $dump"
    printf '| %s | %s | %d | %d | %d |\n' "$(basename "$bin")" "$MODE" "$HITS" "$total" "$((total / HITS))"
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    PIDS=()
done
