# Shared by the demo scripts: build (unless CHITCHAT_BIN names a directory holding the
# binaries), start processes in the background, wait for them, stop them on exit.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${CHITCHAT_BIN:-}" ]; then
    echo "building chitchat and chitchat-relay (the first build takes a few minutes)..." >&2
    (cd "$ROOT" && cargo build --quiet -p chitchat-node -p chitchat-relay)
    CHITCHAT_BIN="$ROOT/target/debug"
fi
CHITCHAT="$CHITCHAT_BIN/chitchat"
RELAY="$CHITCHAT_BIN/chitchat-relay"
PIDS=()

cleanup() {
    # Newest first: clients before the daemons they talk to, nodes before the relay.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[$i]}" 2>/dev/null || true
        wait "${PIDS[$i]}" 2>/dev/null || true
    done
}
trap cleanup EXIT

# wait_for FILE: waits until FILE exists (a run.json), at most 30 s.
wait_for() {
    for _ in $(seq 300); do
        [ -s "$1" ] && return 0
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2
    exit 1
}

# json_field FILE KEY: a top-level string field of a JSON file.
json_field() {
    sed -n "s/.*\"$2\": *\"\([^\"]*\)\".*/\1/p" "$1" | head -1
}

# start_relay DIR [PORT]: a relay on loopback for host "localhost", registration open. Without
# PORT it takes ephemeral ports (`run --dev`); with PORT it listens on PORT (libp2p, TCP) and
# PORT+1 (HTTP), so that nodes find it again after a restart. Sets RELAY_URL.
start_relay() {
    [ -f "$1/relay.key" ] || "$RELAY" --dir "$1" init --host localhost >/dev/null
    rm -f "$1/run.json"
    if [ -z "${2:-}" ]; then
        RUST_LOG=warn "$RELAY" --dir "$1" run --dev >"$1/relay.log" 2>&1 &
    else
        CHITCHAT_RELAY_LISTEN="/ip4/127.0.0.1/tcp/$2" CHITCHAT_RELAY_HTTP="127.0.0.1:$(($2 + 1))" \
            CHITCHAT_RELAY_OPEN_REGISTRATION=true RUST_LOG=warn \
            "$RELAY" --dir "$1" run >"$1/relay.log" 2>&1 &
    fi
    PIDS+=($!)
    wait_for "$1/run.json"
    RELAY_URL="http://$(json_field "$1/run.json" http)"
}

# start_node HOME: initialises (once) and starts a node daemon.
start_node() {
    [ -f "$1/node.redb" ] || "$CHITCHAT" --home "$1" init >/dev/null
    rm -f "$1/run.json"
    RUST_LOG=warn "$CHITCHAT" --home "$1" daemon >"$1/daemon.log" 2>&1 &
    PIDS+=($!)
    wait_for "$1/run.json"
}

# start_federated_relay DIR P2P HTTP: a relay named by its HTTP address (`127.0.0.1:HTTP`), as
# relays side by side on one machine are, so that other relays find it through its
# `.well-known`; registration open. Sets RELAY_URL and RELAY_HOST.
start_federated_relay() {
    [ -f "$1/relay.key" ] || "$RELAY" --dir "$1" init --host "127.0.0.1:$3" >/dev/null
    rm -f "$1/run.json"
    CHITCHAT_RELAY_LISTEN="/ip4/127.0.0.1/tcp/$2" CHITCHAT_RELAY_HTTP="127.0.0.1:$3" \
        CHITCHAT_RELAY_HOST="127.0.0.1:$3" CHITCHAT_RELAY_OPEN_REGISTRATION=true RUST_LOG=warn \
        "$RELAY" --dir "$1" run >"$1/relay.log" 2>&1 &
    PIDS+=($!)
    wait_for "$1/run.json"
    RELAY_URL="http://127.0.0.1:$3"
    RELAY_HOST="127.0.0.1:$3"
}
