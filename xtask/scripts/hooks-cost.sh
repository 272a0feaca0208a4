#!/bin/bash
# Run from the workspace root as root, after `cargo xtask run` built target/release/tcptrace.
# Side by side: untraced / tcptrace --no-timewait / tcptrace (default), 3 rounds of 8 s each,
# python churn load; then the programs' own run counts and times (bpf_stats).
BIN=${TCPTRACE:-target/release/tcptrace}
sysctl -q -w kernel.bpf_stats_enabled=1
run() { # $1 label, rest: tcptrace args or "none"
  label=$1; shift
  if [ "$1" != none ]; then $BIN --view none -o /dev/null --no-snapshot "$@" 2>/tmp/hooks.err & P=$!; sleep 1.5; fi
  r=$(python3 "$(dirname "$0")/churn.py" 8)
  if [ "$1" != none ]; then
    bpftool prog show 2>/dev/null | grep -A0 -E "name (inet_sock_set_s|tw_timer_start|tw_timer_expir|tw_timer_cance|sys_exit_accep)" > /tmp/hooks.prog.$label; cat /tmp/hooks.prog.$label
    kill -INT $P; wait $P
  fi
  echo "$label $r"
}
for round in 1 2 3; do
  run untraced none
  run no-timewait --no-timewait
  run default
done
sysctl -q -w kernel.bpf_stats_enabled=0
