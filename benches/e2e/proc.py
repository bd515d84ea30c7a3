#!/usr/bin/env python3
"""A process tree's figures from /proc, for benches/e2e.sh.

  proc.py cpu PID    # utime + stime, in clock ticks, of PID (all its threads) and its children
  proc.py hwm PID    # VmHWM (peak resident set), KiB, of PID plus that of each child

The children are nginx's workers under its master; a Keel is one process, its threads counted
in its own /proc/PID/stat.
"""
import os
import sys


def stat(pid):
    """The fields of /proc/PID/stat after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def tree(pid):
    pids = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if int(stat(p)[1]) == pid:
                    pids.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def cpu(pid):
    total = 0
    for p in tree(pid):
        f = stat(p)
        total += int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15)
    return total


def hwm(pid):
    total = 0
    for p in tree(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


if __name__ == "__main__":
    what, pid = sys.argv[1], sys.argv[2]
    if pid == "none":
        print(0)
    else:
        print({"cpu": cpu, "hwm": hwm}[what](int(pid)))
