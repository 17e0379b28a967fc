#!/usr/bin/env bash
# Quick start: a local relay and your node, registered, with a channel "general" open.
# Type a line to send it; messages from others appear as they arrive. Ctrl-D or Ctrl-C stops
# everything (the data stays in ./chitchat-quickstart, so the next run picks up where you were).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DATA=${CHITCHAT_QUICKSTART_DIR:-$PWD/chitchat-quickstart}
NAME=${1:-me}
mkdir -p "$DATA"
# Fixed ports (CHITCHAT_QUICKSTART_PORT and the next one), so the next run finds the relay.
start_relay "$DATA/relay" "${CHITCHAT_QUICKSTART_PORT:-7460}"
start_node "$DATA/node"
you() { "$CHITCHAT" --home "$DATA/node" "$@"; }

if you whoami | grep -q 'not registered'; then
    you register --relay "$RELAY_URL" --name "$NAME" >/dev/null
fi
you channels | grep -q ' general ' || you channel create general >/dev/null
ADDRESS=$(you whoami | head -1)

cat <<TEXT
You are $ADDRESS, in channel "general" (relay at $RELAY_URL).
Type a message and press Enter to send it. Ctrl-D quits.

In another terminal, these work on the same node:
  $CHITCHAT --home $DATA/node history general
  $CHITCHAT --home $DATA/node react <id> 👍
A friend on this machine (a second node, through the same relay):
  $CHITCHAT --home /tmp/friend init && $CHITCHAT --home /tmp/friend daemon &
  $CHITCHAT --home /tmp/friend register --relay $RELAY_URL --name friend
  $CHITCHAT --home $DATA/node invite general friend@localhost
TEXT

"$CHITCHAT" --home "$DATA/node" tail general &
PIDS+=($!)
while IFS= read -r line; do
    [ -n "$line" ] && you send general "$line" >/dev/null
done
