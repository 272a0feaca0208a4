#!/usr/bin/env python3
"""Did the kernel run tcptrace's state program for every transition of a bench round?

The bench counts what is missing from a tracer's log (expected - seen) and names each round
where tcptrace's own loss count differs. This script tells, for those rounds, whether the
events reached the program at all: it keeps the kernel's BPF run-time stats on for the whole
bench (a BPF_ENABLE_STATS fd, which the bench's own sysctl guard does not switch off), samples
every `inet_sock_set_state` program's run_cnt and recursion_misses with bpftool, and then
compares, round by round:

  expected transitions  vs  program runs + recursion misses  vs  log's transitions + tcptrace's lost

Run as root from the workspace root, in one shell:

    python3 xtask/scripts/prog-runs.py watch &
    cargo xtask bench --rounds 4 --seconds 8 --skip-bcc --skip-onset --skip-filtered
    kill %1; wait
    python3 xtask/scripts/prog-runs.py compare

The stats cost two clock reads per program run, so the bench's ratios are a little lower
than without them; the counts are what this is for.
"""
import ctypes
import json
import signal
import subprocess
import sys
import time

SAMPLES = "target/bench/prog-runs.json"
RESULTS = "target/bench/results.json"
BPF_ENABLE_STATS = 32
SYS_BPF = 321  # x86_64


def watch():
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint8 * 128)()  # enable_stats.type = BPF_STATS_RUN_TIME (0)
    fd = libc.syscall(SYS_BPF, BPF_ENABLE_STATS, ctypes.byref(attr), 128)
    if fd < 0:
        sys.exit(f"prog-runs: BPF_ENABLE_STATS failed (errno {ctypes.get_errno()}); run as root")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    last = {}
    while not stop:
        out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True)
        for p in json.loads(out.stdout or "[]"):
            if p.get("name") == "inet_sock_set_state":
                # The last sample before the tracer exits: its load ended a moment before.
                last[p["id"]] = {"run_cnt": p.get("run_cnt", 0),
                                 "recursion_misses": p.get("recursion_misses", 0)}
        time.sleep(0.1)
    with open(SAMPLES, "w") as f:
        json.dump({str(k): v for k, v in sorted(last.items())}, f, indent=1)
    print(f"prog-runs: {len(last)} programs sampled into {SAMPLES}")


def compare():
    results = json.load(open(RESULTS))
    samples = json.load(open(SAMPLES))
    # Programs are loaded in the order the bench runs tcptrace: counted rounds, then the
    # BPF run-time round.
    runs = [r for r in results["runs"] if r["tracer"].startswith("tcptrace")]
    runs += [r for r in results.get("bpf_run_time_runs", []) if r["tracer"].startswith("tcptrace")]
    ids = sorted(samples, key=int)
    if len(ids) != len(runs):
        sys.exit(f"prog-runs: {len(ids)} programs sampled, {len(runs)} tcptrace runs in {RESULTS}")
    print(f"{'tracer':<17} {'round':>5} {'expected':>10} {'runs+misses':>12} {'never ran':>10} "
          f"{'seen+lost':>10} {'misses':>8}")
    for run, pid in zip(runs, ids):
        e = run.get("events") or {}
        s = samples[pid]
        reached = s["run_cnt"] + s["recursion_misses"]
        lost = (e.get("summary") or {}).get("lost")
        accounted = e["seen"] + lost if lost is not None else None
        print(f"{run['tracer']:<17} {run['round']:>5} {e.get('expected', 0):>10} {reached:>12} "
              f"{e.get('expected', 0) - reached:>10} {accounted if accounted is not None else '?':>10} "
              f"{s['recursion_misses']:>8}")
    print("never ran: transitions the kernel neither ran the program for nor counted as a miss "
          "(0 when every event reached it). seen+lost equal to runs+misses: tcptrace accounts "
          "for every event the kernel gave it.")


if __name__ == "__main__":
    {"watch": watch, "compare": compare}.get(sys.argv[1] if len(sys.argv) > 1 else "", lambda: sys.exit(__doc__))()
