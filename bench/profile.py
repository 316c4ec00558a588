"""`make profile`: where the server's GIL goes under one bench scenario.

One GIL bounds the server (README, Performance), so this samples only the thread that
holds it. The Task Manager runs under py-spy (as py-spy's child, so no special ptrace
permission is needed), one bench.load scenario drives it, and the samples are summed:
each thread's share, what kind of code held the GIL, and our functions that held it
most (inclusive). Writes bench/results/profile-SCENARIO.json and prints a table.

    python -m bench.profile update-status [--duration 10] [--postgresql]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.run import OVER_HTTP, REPO_ROOT, client, save, task_manager
from devtools.private_postgres import PrivatePostgres

SCENARIOS: dict[str, dict[str, object]] = {
    "update-status": {},
    "lifecycle": {},
    "dispatch": {"rate": 250},
    "watch-fanout": {"watchers": 1000, "rounds": 30},
    # What run.py measures as session_create_tasks_per_s and session_lifecycle_tasks_per_s.
    "create": {"session_size": 1000, "concurrency": 4},
    "session-lifecycle": {"session_size": 100, "concurrency": 200},
    # What run.py measures as upload_mib_per_s and download_mib_per_s, and release_ms_*.
    "payloads": {"size": 256 * 1024 * 1024, "count": 4},
    "release": {"rate": 250},
    # What run.py measures as rest_update_status_per_s: UpdateStatus over the REST API.
    "rest-update-status": {},
}
OURS = ("task_manager/", "storage/")
IMPORTING = "_find_and_load"
ENTRY_POINT = ("(task_manager/__main__.py", "(task_manager/cli.py")
"""Frames under which everything runs: left out of the inclusive list."""
LOOP_CALLBACK = "Handle._run (asyncio/events.py"
"""A sample whose innermost Python frame is this is in C code a loop callback called:
mostly grpc.aio's Cython, which py-spy does not see into."""


def record(
    scenario: str, duration: float, workdir: Path, db: str | None = None
) -> list[tuple[list[str], int]]:
    """Runs the server (on an SQLite file in workdir, or on db) under py-spy through one
    scenario; its samples as (stack, count)."""
    samples = workdir / "samples.raw"
    spy = Path(sys.executable).parent / "py-spy"
    command = [
        str(spy),
        *("record", "--gil", "--threads", "--rate", "250", "--format", "raw"),
        *("--output", str(samples), "--"),
        *task_manager(workdir, "profile", db),
    ]
    with (workdir / "server.log").open("w") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT
        )
    assert process.stdout is not None
    for line in process.stdout:  # py-spy's own banner comes first
        if "serving on" in line:
            break
    else:
        raise SystemExit(f"server did not start:\n{(workdir / 'server.log').read_text()}")
    address = line.rsplit(" ", 1)[1].strip()
    if scenario in OVER_HTTP:  # the next line: "task-manager: HTTP on http://HOST:PORT/ ..."
        address = process.stdout.readline().split()[3]
    options = dict(SCENARIOS[scenario])
    if "rounds" not in options:
        options["duration"] = duration
    try:
        measured = client(scenario, address, **options)
    finally:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
        os.kill(int(children.split()[0]), signal.SIGTERM)  # py-spy writes when it exits
        process.wait(120)
        process.stdout.close()
    print(f"{scenario}: {json.dumps(measured)}", file=sys.stderr)
    if not samples.exists():
        raise SystemExit(f"py-spy wrote no samples:\n{(workdir / 'server.log').read_text()}")
    stacks = []
    for line in samples.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stacks.append((stack.split(";"), int(count)))
    return stacks


def is_ours(frame: str) -> bool:
    return any(f"({prefix}" in frame for prefix in OURS)


def kind(leaf: str) -> str:
    if leaf.startswith(LOOP_CALLBACK):
        return "C under a loop callback (grpc.aio)"
    if is_ours(leaf):
        return "ours (task_manager, storage)"
    if "(asyncio/" in leaf or "(selectors.py" in leaf:
        return "asyncio"
    if "(aiohttp/" in leaf or "(multidict/" in leaf or "(yarl/" in leaf:
        return "aiohttp (and its multidict, yarl)"
    return "other Python"


def summarize(stacks: list[tuple[list[str], int]]) -> dict[str, Any]:
    # Samples taken while importing modules at startup are not serving: left out.
    serving = [(frames, n) for frames, n in stacks if not any(IMPORTING in f for f in frames)]
    total = sum(count for _, count in serving)
    threads: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    for frames, count in serving:
        # With --threads the first frame names the thread: "thread (tid): name".
        threads[frames[0].split(": ", 1)[-1]] += count
        kinds[kind(frames[-1])] += count
        for frame in set(frames[1:]):
            if is_ours(frame) and not any(entry in frame for entry in ENTRY_POINT):
                ours[frame] += count

    def shares(counter: collections.Counter[str], top: int) -> dict[str, float]:
        return {name: round(n / total, 3) for name, n in counter.most_common(top)}

    return {
        "samples": total,
        "threads": shares(threads, 10),
        "innermost_frame": shares(kinds, 10),
        "ours_inclusive": shares(ours, 20),
    }


def table(summary: dict[str, Any]) -> str:
    lines = [f"GIL-holding samples: {summary['samples']}"]
    for title, key in (
        ("by thread", "threads"),
        ("by the code holding the GIL", "innermost_frame"),
        ("our functions, inclusive", "ours_inclusive"),
    ):
        lines.append(f"\n{title}:")
        lines += [f"  {share:6.1%}  {name}" for name, share in summary[key].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument(
        "--postgresql",
        action="store_true",
        help="serve from a private PostgreSQL (fsync on) instead of an SQLite file",
    )
    args = parser.parse_args()
    name = f"profile-{args.scenario}{'-postgresql' if args.postgresql else ''}.json"
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp, contextlib.ExitStack() as stack:
        db = None
        if args.postgresql:
            db = stack.enter_context(PrivatePostgres()).create_database()
        summary = summarize(record(args.scenario, args.duration, Path(tmp), db))
    save(REPO_ROOT / "bench" / "results" / name, summary)
    print(table(summary))


if __name__ == "__main__":
    main()
