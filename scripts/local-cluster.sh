#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, for trying node loss by hand (root; iproute2).
#
#   scripts/local-cluster.sh up [--workers N] [--ray-default-health-checks]
#   scripts/local-cluster.sh status
#   scripts/local-cluster.sh kill HOST                 # SIGKILL every process of a host
#   scripts/local-cluster.sh partition HOST [--mode link|ray]
#                                                      # link: its veth down (cut off from everything);
#                                                      # ray: blackholed to the other Ray hosts, S3 still reachable
#   scripts/local-cluster.sh heal HOST                 # undo a partition
#   scripts/local-cluster.sh restart HOST              # start Ray on a host again (after kill, or a partitioned
#                                                      # host whose raylet exited on learning it was declared dead)
#   scripts/local-cluster.sh down                      # stop everything by pid, remove namespaces, veths, bridge
#
# HOST is head, worker-1, worker-2, ... or s3. The cluster lives under $HEADSHOTS_CLUSTER_DIR (default
# /tmp/hs-cluster; keep it short: Ray's socket paths must stay under ~107 characters); `up` prints the
# addresses, the Ray token path and the S3 endpoint (TLS, with a CA made for the cluster). Drivers run on
# the head host: `ip netns exec <head namespace> ...`. Everything is done by
# tests/integration/multinode.py, which the multi-node tests use too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HEADSHOTS_VENV:-.venv}"
PYTHON="$VENV/bin/python"
DIR="${HEADSHOTS_CLUSTER_DIR:-/tmp/hs-cluster}"
command="${1:-}"
if [ -z "$command" ]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
shift

cluster() { "$PYTHON" -m tests.integration.multinode "$1" "$DIR" "${@:2}"; }

case "$command" in
  up)
    # A signal while it starts (or a failure) leaves nothing behind: the Python side cleans up on
    # errors and Ctrl-C; this trap covers SIGTERM/SIGHUP, which end Python without its cleanup.
    "$PYTHON" -m tests.integration.multinode up "$DIR" "$@" &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; cluster down || true; exit 1' TERM HUP
    trap 'wait "$child" 2>/dev/null; cluster down || true; exit 130' INT
    wait "$child"
    ;;
  down)
    if [ ! -f "$DIR/cluster.json" ]; then
      echo "no cluster under $DIR" >&2
      exit 1
    fi
    cluster down
    rm -rf "$DIR"
    ;;
  status|kill|partition|heal|restart)
    cluster "$command" "$@"
    ;;
  *)
    echo "unknown command: $command (up, status, kill, partition, heal, restart, down)" >&2
    exit 2
    ;;
esac
