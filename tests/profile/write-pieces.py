#!/usr/bin/env python3
"""The kernel's cost of writing a file's chunks with a `write` each against one `writev`.

usage: tests/profile/write-pieces.py DIR [--files N] [--size BYTES] [--piece BYTES] [--pairs K]
                                       [--group BYTES] [--writev-first] [--fill-memory DIR]

Creates N files of BYTES random bytes in a fresh folder under DIR, each written in pieces of PIECE
bytes (FastCDC's chunks end anywhere inside a block), once with one `write` per piece and once with
one `writev` for each run of pieces that fits in `--group` bytes (1 MiB, as ferry; 0: one
`writev` for the whole file), alternated K times (`write` first unless `--writev-first`), and prints
the system and wall time of each run and the medians. `sync` is called after each run, so that no
run pays for another's writeback, and the folders are removed at the end.

On a virtual machine whose balloon hands free memory back to its host (as here), a run that writes
into pages the host took back pays for faulting them in again, and which run does is luck:
`--fill-memory DIR` first fills the free memory with the page cache of an unnamed file in DIR, as
`ferry-bench --fill-memory` does, so that the runs write into memory taken back from that cache.
What ferry's maker thread does per small file (engine/src/apply/make.rs), without the rest of a
round.
"""

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time


def groups_of(pieces, group):
    """Runs of pieces of at most `group` bytes (at least one piece each); 0: all of them."""
    if group == 0:
        return [pieces]
    groups, current, length = [], [], 0
    for p in pieces:
        if current and length + len(p) > group:
            groups.append(current)
            current, length = [], 0
        current.append(p)
        length += len(p)
    return groups + [current] if current else groups


def run(base, mode, files, size, piece, group):
    data = os.urandom(size)
    pieces = [data[i : i + piece] for i in range(0, size, piece)]
    groups = groups_of(pieces, group)
    folder = tempfile.mkdtemp(prefix=f"write-pieces-{mode}-", dir=base)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for i in range(files):
        fd = os.open(os.path.join(folder, f"f{i}"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        if mode == "write":
            for p in pieces:
                os.write(fd, p)
        else:
            for g in groups:
                os.writev(fd, g)
        os.close(fd)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.sync()
    return after.ru_stime - before.ru_stime, wall, folder


def fill_memory(folder):
    """An unnamed file in `folder` as large as the free memory less 2 GiB, synced: clean page cache."""
    with open("/proc/meminfo") as meminfo:
        free = next(int(line.split()[1]) << 10 for line in meminfo if line.startswith("MemFree:"))
    disk = os.statvfs(folder)
    size = max(0, min(free, disk.f_bavail * disk.f_frsize) - (2 << 30))
    started, filler, block, written = time.monotonic(), tempfile.TemporaryFile(dir=folder), bytes(8 << 20), 0
    while written < size:
        written += filler.write(block[: min(len(block), size - written)])
    filler.flush()
    os.fsync(filler.fileno())
    print(f"filled the page cache with {size / (1 << 30):.1f} GiB in {time.monotonic() - started:.1f} s")
    return filler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", type=int, default=300_000)
    parser.add_argument("--piece", type=int, default=65_537)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--group", type=int, default=1 << 20)
    parser.add_argument("--writev-first", action="store_true")
    parser.add_argument("--fill-memory", metavar="DIR")
    args = parser.parse_args()
    filler = fill_memory(args.fill_memory) if args.fill_memory else None
    print(
        f"{args.files} files of {args.size} bytes in pieces of {args.piece} under {args.dir}, "
        f"writev groups of {args.group or 'the whole file'}"
    )
    results, folders = {"write": [], "writev": []}, []
    for pair in range(args.pairs):
        for mode in ("writev", "write") if args.writev_first else ("write", "writev"):
            system, wall, folder = run(args.dir, mode, args.files, args.size, args.piece, args.group)
            results[mode].append((system, wall))
            folders.append(folder)
            print(f"  pair {pair + 1} {mode:6}  system {system:6.2f} s  wall {wall:6.2f} s")
    for folder in folders:
        shutil.rmtree(folder)
    if filler:
        filler.close()
    for mode, runs in results.items():
        system = statistics.median(s for s, _ in runs)
        wall = statistics.median(w for _, w in runs)
        print(f"median {mode:6}  system {system:6.2f} s  wall {wall:6.2f} s")


if __name__ == "__main__":
    main()
