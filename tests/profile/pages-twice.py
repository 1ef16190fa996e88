#!/usr/bin/env python3
"""Pages a process brought into the page cache more than once: what it read, let go and read again.

    perf record -e filemap:mm_filemap_add_to_page_cache -a -o pages.data -- \
        target/release/ferry-bench --read-once 320 --files 100000 --no-rsync --work /mnt/bench
    perf script -i pages.data -F comm,pid,tid,time,trace | tests/profile/pages-twice.py

For each process: the bytes of page-cache pages it added (reads, and pages it wrote anew), those of
them added again (the same device, inode and offset), which thread added them first and again, and
how long after. A page a process writes and then reads back is counted once.
"""

import collections
import re
import sys

LINE = re.compile(
    r"^\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+.*dev (\d+):(\d+) ino (\w+) pfn=\S+ ofs=(\d+) order=(\d+)"
)

added = collections.Counter()
again = collections.Counter()
again_inodes = collections.defaultdict(set)
by_threads = collections.defaultdict(collections.Counter)
gaps = collections.defaultdict(list)
first = {}
names = {}
for line in sys.stdin:
    match = LINE.match(line)
    if not match:
        continue
    comm, pid, _tid, time, major, minor, ino, offset, order = match.groups()
    size = 4096 << int(order)
    names.setdefault(pid, comm)
    added[pid] += size
    page = (pid, major, minor, ino, offset)
    if page in first:
        first_comm, first_time = first[page]
        again[pid] += size
        again_inodes[pid].add((major, minor, ino))
        by_threads[pid][(first_comm, comm)] += 1
        gaps[pid].append(float(time) - first_time)
    first[page] = (comm, float(time))

for pid, size in added.most_common(10):
    print(f"{pid} {names[pid]}: {size} bytes added, {again[pid]} again on {len(again_inodes[pid])} inodes")
    if gaps[pid]:
        spread = sorted(gaps[pid])
        print(f"    again {spread[0]:.1f}-{spread[-1]:.1f} s after the first, by {dict(by_threads[pid])}")
