# Helpers shared by the load-benchmark scripts (sourced, not run). Before sourcing, set
# LOG_TAG (the progress-line prefix) and WORK_PREFIX (the temp dir's name).
# shellcheck shell=bash

# Where results go: target/bench-results/ (untracked) by default, so that a trial run
# never rewrites the tracked files; RECORD=1 writes benches/results/, where the README's
# tables come from. Needs ROOT set (the repository root).
if [[ "${RECORD:-0}" == 1 ]]; then RESULTS="$ROOT/benches/results"; else RESULTS="$ROOT/target/bench-results"; fi
mkdir -p "$RESULTS"

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# A temp dir for the run, and every process started into PIDS stopped on exit (TERM,
# then KILL after 5 s); KEEP_WORK=1 keeps the dir.
WORK=$(mktemp -d "/tmp/$WORK_PREFIX.XXXXXX")
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ "${KEEP_WORK:-0}" == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_ports() { # N free loopback ports, distinct
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
wait_http() { # URL: until it answers at all (any status)
    for _ in $(seq 200); do
        curl -s -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.05
    done
    die "nothing answers at $1"
}
