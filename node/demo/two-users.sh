#!/usr/bin/env bash
# Scripted demo: alice and bob, each on a node of their own, chat through one relay.
# Everything lives in a temporary directory and is stopped at the end.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DATA=$(mktemp -d)
start_relay "$DATA/relay"
start_node "$DATA/alice"
start_node "$DATA/bob"
alice() { "$CHITCHAT" --home "$DATA/alice" "$@"; }
bob() { "$CHITCHAT" --home "$DATA/bob" "$@"; }
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }

# wait_history USER CHANNEL TEXT: until TEXT shows in USER's history (at most 20 s).
wait_history() {
    for _ in $(seq 200); do
        "$1" history "$2" | grep -qF -- "$3" && return 0
        sleep 0.1
    done
    echo "$1 never saw: $3" >&2
    exit 1
}

say "alice and bob register with the relay"
alice register --relay "$RELAY_URL" --name alice
bob register --relay "$RELAY_URL" --name bob

say "alice creates #general and invites bob (the commit is ordered by the relay)"
alice channel create general
alice invite general bob@localhost

say "they talk"
alice send general "hi bob, welcome to #general"
wait_history bob general "welcome to #general"
FIRST=$(bob history general | grep -F "welcome to #general" | awk '{print $2}')
bob reply "$FIRST" "thanks alice!"
bob react "$FIRST" "🎉"
wait_history alice general "thanks alice!"
alice edit "$FIRST" "hi bob, welcome to #general (edited to show edits)"
OOPS=$(alice send general "this one was a mistake" | awk '{print $1}')
alice delete "$OOPS"
wait_history bob general "[deleted]"
bob read general
sleep 0.5

say "alice's history (ids, edits, reactions, deletions, receipts)"
alice history general
say "bob's history"
bob history general
say "alice exports the channel as text"
alice export general --format text
say "members"
alice members general
