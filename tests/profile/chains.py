#!/usr/bin/env python3
"""Counts the samples of a call-graph profile whose call chain holds a given function, by process:

  perf record -g ... -o /tmp/all.data            (or --call-graph dwarf)
  perf script -i /tmp/all.data -F pid,tid,ip,sym > /tmp/chains.txt
  tests/profile/chains.py /tmp/chains.txt --match exc_page_fault --match madvise \\
      [--under FrameReader --under 'BytesMut as core::convert::From']

A sample counts when any frame of its chain names a function containing one of the `--match`
strings. For each process (pid) it prints all its samples and those that count; then, over the
samples that count, how many also have a frame containing each `--under` string (where in the
program they came from). With `perf record -a`, a sample is a thousandth of a core-second at
`-F 999`.
"""
import argparse
import collections


def samples(path):
    """Yields (pid, [function of each frame, innermost first]) for each sample of a `perf script`."""
    pid, frames = None, []
    for line in open(path, errors="replace"):
        if not line.strip():
            if pid is not None:
                yield pid, frames
            pid, frames = None, []
        elif line[0] in " \t" and pid is not None and "/" not in line.split()[0]:
            fields = line.split(None, 1)
            frames.append(fields[1].strip() if len(fields) > 1 else "")
        else:
            pid, frames = line.split()[0].split("/")[0], []
    if pid is not None:
        yield pid, frames


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="`perf script -F pid,tid,ip,sym` output, with call chains")
    parser.add_argument("--match", action="append", required=True, help="a function a chain must hold")
    parser.add_argument("--under", action="append", default=[], help="a function to count the matches under")
    args = parser.parse_args()

    total = collections.Counter()
    matched = collections.Counter()
    under = collections.Counter()
    for pid, frames in samples(args.script):
        total[pid] += 1
        if not any(m in frame for frame in frames for m in args.match):
            continue
        matched[pid] += 1
        for u in args.under:
            if any(u in frame for frame in frames):
                under[u] += 1
    print(f"samples whose chain holds {' or '.join(args.match)}, by process:")
    for pid, count in matched.most_common():
        print(f"  pid {pid}: {count} of its {total[pid]} samples")
    for u in args.under:
        print(f"  of all {sum(matched.values())}: {under[u]} under {u}")


if __name__ == "__main__":
    main()
