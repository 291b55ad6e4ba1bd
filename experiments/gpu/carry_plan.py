"""Split what a lease must carry into device calls that each fit (issue 17's data travels this way).

A device call carries the repo's working tree (tracked files and untracked ones git does not
ignore) plus at most 8 ignored paths, 64 MiB in all. A lease whose data is larger than what is
left beside the repo carries it over several calls to one warm machine, each path once (a warm
machine keeps what earlier calls brought). This prints one line per call: the paths to give the
`carry` argument, as JSON, and their size. Paths are files or folders; a folder too large for one
call is split into its files, and a file larger than a call can take is an error.

    python3 experiments/gpu/carry_plan.py .carry/whl .carry/c4val .carry/mix .carry/mix6

The repo's share is measured here (`git ls-files --cached --others --exclude-standard`), so run it
from the repo root after the last commit that will travel. Packing is first-fit by decreasing size,
the first call filled first; the call that starts the work should be the last one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

CALL_LIMIT = 64 * 2**20  # bytes one call carries, the repo included
MAX_PATHS = 8  # ignored paths per call
MARGIN = 2**20  # slack for files the tree gains before the call (logs, a pyc)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def repo_bytes(root: Path) -> int:
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=root, check=True, capture_output=True).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())


def pieces(paths: Sequence[Path], room: int) -> List[Tuple[str, int]]:
    """(path, bytes) to pack: each path whole, or a folder too large for one call as its files."""
    out = []
    for p in paths:
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        n = size_of(p)
        if n <= room or p.is_file():
            out.append((str(p), n))
        else:
            out += [(str(f), f.stat().st_size) for f in sorted(p.rglob("*")) if f.is_file()]
    return out


def plan(items: Sequence[Tuple[str, int]], room: int, max_paths: int = MAX_PATHS) -> List[List[Tuple[str, int]]]:
    """First-fit decreasing into calls of `room` bytes and `max_paths` paths each."""
    too_big = [(p, n) for p, n in items if n > room]
    if too_big:
        p, n = too_big[0]
        raise ValueError(f"{p} is {n / 1e6:.1f} MB, more than one call can carry beside the repo "
                         f"({room / 1e6:.1f} MB): split it or shrink the repo")
    calls: List[List[Tuple[str, int]]] = []
    for p, n in sorted(items, key=lambda it: (-it[1], it[0])):
        for call in calls:
            if len(call) < max_paths and sum(s for _, s in call) + n <= room:
                call.append((p, n))
                break
        else:
            calls.append([(p, n)])
    return calls


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carry_plan.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--repo-mb", type=float, default=None,
                    help="the repo's share in MB (default: measured with git from this folder)")
    args = ap.parse_args(argv)
    repo = int(args.repo_mb * 1e6) if args.repo_mb is not None else repo_bytes(Path(os.getcwd()))
    room = CALL_LIMIT - repo - MARGIN
    try:
        if room <= 0:
            raise ValueError(f"the repo alone ({repo / 1e6:.1f} MB) fills a call ({CALL_LIMIT / 1e6:.1f} MB)")
        calls = plan(pieces(args.paths, room), room)
    except ValueError as err:
        print(f"carry_plan.py: {err}", file=sys.stderr)
        return 2
    total = sum(n for call in calls for _, n in call)
    print(f"repo {repo / 1e6:.1f} MB, room per call {room / 1e6:.1f} MB: {total / 1e6:.1f} MB in "
          f"{len(calls)} call(s)")
    for i, call in enumerate(calls, 1):
        print(f"call {i} ({sum(n for _, n in call) / 1e6:.1f} MB): {json.dumps([p for p, _ in call])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
