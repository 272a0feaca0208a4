#!/bin/bash
# Two tcptrace builds side by side: the daemon's CPU per event under the same load, and the
# replay time of the same recorded log. Run from the workspace root as root:
#   bash xtask/scripts/daemon-ab.sh OLD_BINARY NEW_BINARY [ROUNDS]
# (e.g. keep a copy of target/release/tcptrace before a change, then rebuild.)
# Load: xtask/scripts/churn.py for 8 s (Python, ~18k connections/s here, below the rate where
# the daemon falls behind, so both builds handle the same events). The log goes to /dev/shm
# so the disk is out of the figure. CPU per event = (daemon user+sys CPU - the same daemon's
# CPU with no load) / events in its log. Rounds interleave the builds (A B A B ...).
set -euo pipefail
if [ $# -lt 2 ] || [ ! -x "$1" ] || [ ! -x "$2" ]; then
  echo "usage: bash $0 OLD_BINARY NEW_BINARY [ROUNDS] (two executable tcptrace builds)" >&2
  exit 2
fi
if [ ! -x /usr/bin/time ]; then
  echo "$0 needs /usr/bin/time (Debian package time)" >&2
  exit 2
fi
A=$1 B=$2 ROUNDS=${3:-3}
DIR=$(mktemp -d /dev/shm/tcptrace-ab.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
CHURN="$(dirname "$0")/churn.py"

# Prints "<events> <cpu seconds> <conn/s>" for one traced run of $2 seconds of load.
run() {
  local bin=$1 secs=$2 rate=-
  rm -f "$DIR/log.ndjson" # tcptrace appends to an existing log
  /usr/bin/time -f "%U %S" -o "$DIR/time" \
    "$bin" --view none --no-timewait -o "$DIR/log.ndjson" --duration $((secs + 4))s 2>"$DIR/err" &
  local pid=$!
  sleep 1.5
  if [ "$secs" -gt 0 ]; then rate=$(python3 "$CHURN" "$secs" | cut -d' ' -f1); fi
  wait $pid || { echo "tracer failed: $(tail -1 "$DIR/err")" >&2; exit 1; }
  local events cpu
  events=$(grep -c '"type":"\(transition\|accept\)"' "$DIR/log.ndjson" || true)
  cpu=$(awk '{print $1 + $2}' "$DIR/time")
  echo "$events $cpu $rate"
}

read -r _ idle_a _ < <(run "$A" 0)
read -r _ idle_b _ < <(run "$B" 0)
echo "idle daemon CPU over the same span: A $idle_a s, B $idle_b s"
for round in $(seq 1 "$ROUNDS"); do
  for which in A B; do
    if [ $which = A ]; then bin=$A idle=$idle_a; else bin=$B idle=$idle_b; fi
    read -r events cpu rate < <(run "$bin" 8)
    us=$(awk -v c="$cpu" -v i="$idle" -v e="$events" 'BEGIN { printf "%.3f", (c - i) * 1e6 / e }')
    echo "round $round $which: $rate conn/s, $events events, $cpu s CPU -> $us us/event"
  done
done
# Replay: the last log (B's), by both builds, interleaved.
lines=$(grep -c '"type":"transition"' "$DIR/log.ndjson" || true)
for round in $(seq 1 "$ROUNDS"); do
  for which in A B; do
    if [ $which = A ]; then bin=$A; else bin=$B; fi
    /usr/bin/time -f "%e" -o "$DIR/time" "$bin" analyze "$DIR/log.ndjson" --view none >/dev/null 2>&1
    echo "round $round $which: replay of $lines transitions in $(cat "$DIR/time") s"
  done
done
