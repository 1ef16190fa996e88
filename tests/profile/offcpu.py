#!/usr/bin/env python3
"""Sums how long each thread was off the CPU, by where it went to sleep, from a `perf script` of
scheduler events recorded with call graphs:

  tests/profile/during-round.sh 1 perf record -e sched:sched_switch -e sched:sched_wakeup \\
      --call-graph dwarf,8192 -p {serve} -o /tmp/sched.data &
  target/release/ferry-bench --files 200000 --work /mnt/bench --no-rsync --fill-memory /var/tmp
  perf script -i /tmp/sched.data -F comm,tid,time,event,trace,ip,sym > /tmp/sched.txt
  tests/profile/offcpu.py /tmp/sched.txt

Each switch away from a thread starts its time off the CPU, the next switch to it ends it; the time
is put on the first four user-space frames of ferry's own code (or of std's locks, channels and
threads) on the stack it left with, and on its state (S: asleep, D: waiting for the disk, R:
preempted). Prints the eight threads longest off the CPU, each with its six largest causes.
"""
import collections
import re
import sys

HEADER = re.compile(r"^(\S.*?)\s+(\d+)\s+([\d.]+):\s+(sched:\S+):\s+(.*)$")
SWITCH = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)")


def where(frames):
    ours = [
        f
        for f in frames
        if ("ferry" in f or "std::sync" in f or "std::thread" in f) and "(inlined)" not in f and "closure" not in f
    ]
    return " < ".join((ours or frames)[:4])


left = {}  # tid -> (time it left the CPU, where)
off = collections.defaultdict(lambda: collections.defaultdict(float))
names = {}


def switch(event):
    if event is None or event[0] != "sched:sched_switch":
        return
    _, time, trace, frames = event
    m = SWITCH.search(trace)
    if not m:
        return
    prev, following = int(m.group(2)), int(m.group(5))
    names[prev], names[following] = m.group(1), m.group(4)
    left[prev] = (time, f"{where(frames)} [{m.group(3)}]")
    if following in left:
        since, cause = left.pop(following)
        off[following][cause] += time - since


event = None
for line in open(sys.argv[1]):
    m = HEADER.match(line)
    if m:
        switch(event)
        event = (m.group(4), float(m.group(3)), m.group(5), [])
    elif event is not None and line.strip():
        parts = line.split(None, 1)
        if len(parts) == 2:
            event[3].append(parts[1].strip())
switch(event)

for tid, causes in sorted(off.items(), key=lambda t: -sum(t[1].values()))[:8]:
    print(f"== {names.get(tid)} {tid}: off the CPU {sum(causes.values()):.2f} s")
    for cause, seconds in sorted(causes.items(), key=lambda c: -c[1])[:6]:
        print(f"   {seconds:6.2f} s  {cause[:260]}")
