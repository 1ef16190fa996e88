#!/usr/bin/env python3
"""Samples the CPU time of every thread of the running `ferry serve` and `ferry sync` processes once a
second (from /proc/PID/task/TID/stat) and prints, for each second, the busiest threads as
ROLE:NAME#TID=CPU-seconds in that second. Start it just before a ferry-bench run; it stops LIMIT
seconds after it started, or 5 s after the last ferry process ended.

usage: tests/profile/threads.py [LIMIT] > threads.log

"""
import collections
import os
import sys
import time

limit = float(sys.argv[1]) if len(sys.argv) > 1 else 600
tick = os.sysconf("SC_CLK_TCK")


def ferry_threads():
    """(role, tid, name) -> CPU-seconds so far, for each thread of a ferry serve or sync process."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        if not os.path.basename(argv[0]).startswith(b"ferry") or argv[0].endswith(b"ferry-bench"):
            continue
        role = "serve" if b"serve" in argv else "sync" if b"sync" in argv else None
        if role is None:
            continue
        for tid in tids:
            try:
                stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            found[(role, tid, name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


started, before, last_seen = time.time(), {}, None
while time.time() - started < limit:
    now = ferry_threads()
    if now:
        last_seen = time.time()
        spent = {key: cpu - before.get(key, 0.0) for key, cpu in now.items()}
        busiest = sorted(((v, k) for k, v in spent.items() if v > 0.02), reverse=True)[:10]
        line = "  ".join(f"{role}:{name}#{tid}={cpu:.2f}" for cpu, (role, tid, name) in busiest)
        print(f"{time.time() - started:6.1f} {line}", flush=True)
    elif last_seen is not None and time.time() - last_seen > 5:
        break
    before = now
    time.sleep(1)
