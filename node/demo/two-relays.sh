#!/usr/bin/env bash
# Scripted demo of federation: alice and carol on relay A, bob on relay B, in one channel that
# both relays order together. Everything lives in a temporary directory and is stopped at the
# end. The relays listen on loopback: A on ports 7470 (libp2p) and 7471 (HTTP), B on 7480 and
# 7481; CHITCHAT_DEMO_PORTS="A_P2P A_HTTP B_P2P B_HTTP" picks others.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

read -r A_P2P A_HTTP B_P2P B_HTTP <<<"${CHITCHAT_DEMO_PORTS:-7470 7471 7480 7481}"
DATA=$(mktemp -d)
start_federated_relay "$DATA/relay-a" "$A_P2P" "$A_HTTP"
A_URL=$RELAY_URL A=$RELAY_HOST
start_federated_relay "$DATA/relay-b" "$B_P2P" "$B_HTTP"
B_URL=$RELAY_URL B=$RELAY_HOST
start_node "$DATA/alice"
start_node "$DATA/carol"
start_node "$DATA/bob"
alice() { "$CHITCHAT" --home "$DATA/alice" "$@"; }
carol() { "$CHITCHAT" --home "$DATA/carol" "$@"; }
bob() { "$CHITCHAT" --home "$DATA/bob" "$@"; }
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }

# wait_history USER CHANNEL TEXT: until TEXT shows in USER's history (at most 30 s).
wait_history() {
    for _ in $(seq 300); do
        "$1" history "$2" | grep -qF -- "$3" && return 0
        sleep 0.1
    done
    echo "$1 never saw: $3" >&2
    exit 1
}

say "alice and carol register with relay A ($A), bob with relay B ($B)"
alice register --relay "$A_URL" --name alice
carol register --relay "$A_URL" --name carol
bob register --relay "$B_URL" --name bob

say "alice looks bob up at his relay, through hers"
alice lookup "bob@$B"

say "alice creates #general, invites carol, then bob: B joins the channel's relay set"
alice channel create general
alice invite general "carol@$A"
alice invite general "bob@$B"
alice channel info general

say "they talk across the two relays"
alice send general "hi bob, hi carol"
wait_history bob general "hi bob, hi carol"
FIRST=$(bob history general | grep -F "hi bob, hi carol" | awk '{print $2}')
bob reply "$FIRST" "hello from relay B"
wait_history carol general "hi bob, hi carol"
carol react "$FIRST" "👋"
wait_history alice general "hello from relay B"
wait_history carol general "hello from relay B"
alice edit "$FIRST" "hi bob, hi carol, welcome to #general"
wait_history bob general "welcome to #general"
wait_history bob general "👋"

say "bob's history"
bob history general
say "no relay signed two commits for one epoch, no member is in another state"
bob status

say "bob is removed: he was B's only user, so B leaves the relay set in the same commit"
alice remove general "bob@$B"
alice channel info general
alice send general "just the two of us on A"
wait_history carol general "just the two of us on A"
say "carol's history"
carol history general
