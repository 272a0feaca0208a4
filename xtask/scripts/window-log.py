#!/usr/bin/env python3
# Usage: python3 xtask/scripts/window-log.py N W > log.ndjson  (e.g. 2000000 900000: 5.9 M lines, 3.7 GB)
# Synthetic log: N connections, each CLOSE->SYN_SENT, SYN_SENT->ESTABLISHED at open, ESTABLISHED->CLOSE
# W connections later: a sliding window of W live connections (like 60 s of TIME_WAIT on a busy host).
import sys
N, W = int(sys.argv[1]), int(sys.argv[2])
T = ('{"type":"transition","schema":1,"ts_ns":%d,"time":"2026-11-24T07:02:31.498006599Z","conn_id":%d,'
     '"skaddr":"0xffff8881f1029bc0","family":"ipv4","laddr":"127.0.0.1","lport":%d,"raddr":"127.0.0.1","rport":80,'
     '"old":"%s","new":"%s","in_old_state_ns":null,"owner_pid":4174,"owner_tid":4174,"owner_comm":"python3",'
     '"owner_source":"kernel","task_pid":4174,"task_tid":4174,"task_comm":"python3","role":"active_open","legal":true,'
     '"gap":false,"starts_conn":%s,"midlife":false,"cpu":%d,"owner_via":"connect","owner_uid":0,"cgroup_id":1,'
     '"netns":4026531833,"unaccepted":false,"container":null}\n')
out = sys.stdout
ts = 10**12
cid = lambda i: (i // 2) << 12 | (i % 2)
buf = []
for i in range(N + W):
    ts += 1000
    if i < N:
        c = cid(i); p = 1024 + i % 60000
        buf.append(T % (ts, c, p, "CLOSE", "SYN_SENT", "true", i % 2))
        buf.append(T % (ts + 10, c, p, "SYN_SENT", "ESTABLISHED", "false", i % 2))
    if i >= W:
        j = i - W; c = cid(j)
        buf.append(T % (ts + 20, c, 1024 + j % 60000, "ESTABLISHED", "CLOSE", "false", j % 2))
    if len(buf) > 30000:
        out.write("".join(buf)); buf = []
out.write("".join(buf))
