"""`make bench-compare REV=<commit>`: another revision's server beside this checkout's.

Two whole `make bench` runs an hour apart differ by more than most single changes on
these shared machines; short runs of the two servers, alternating, do not. So each
scenario runs in pairs, one run of each server, the order swapped from pair to pair, all
driven by this checkout's clients. The other revision is checked out in a temporary git
worktree and served from there: its own code, this environment's packages. A scenario
its server cannot run (ReportStatus or WatchTasks before they existed) is shown as
missing. Writes bench/results/compare-REV.json and prints a table of medians.

    python -m bench.compare 6921684 [--pairs 3] [--duration 5] [--rate 250]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.run import (
    REPO_ROOT,
    ClientFailed,
    client_with_cpu,
    columns,
    git_commit,
    save,
    start_server,
    task_manager,
    writes_per_commit,
)


@dataclass(frozen=True)
class Scenario:
    """One bench.load scenario and the figures of its result compared."""

    name: str
    client: str
    options: dict[str, object]
    figures: tuple[str, ...]


@dataclass
class Side:
    """One revision's server: where it is served from, the serve options it knows, and
    what each run measured, figure by figure."""

    label: str
    tree: Path
    options_known: frozenset[str]
    runs: dict[str, list[float]] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)


def scenarios(duration: float, rate: float, rounds: int) -> list[Scenario]:
    timed: dict[str, object] = {"duration": duration}
    return [
        Scenario(
            "update-status",
            "update-status",
            timed,
            ("rpc_per_s", "server_cpu_us_per_call", "writes_per_commit"),
        ),
        Scenario(
            "lifecycle",
            "lifecycle",
            timed,
            ("tasks_per_s", "server_cpu_us_per_call", "writes_per_commit"),
        ),
        Scenario("lifecycle-unary", "lifecycle", {**timed, "unary": ""}, ("tasks_per_s",)),
        # Agents report with UpdateStatus here, so a revision without ReportStatus runs it.
        Scenario(
            "dispatch", "dispatch", {**timed, "rate": rate, "unary": ""}, ("p50_ms", "p99_ms")
        ),
        Scenario(
            "watch-fanout",
            "watch-fanout",
            {"watchers": 1000, "rounds": rounds},
            ("p50_ms", "p99_ms"),
        ),
    ]


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        tree = Path(tmp) / "tree"
        git = ["git", "-C", str(REPO_ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), revision], check=True)
        try:
            yield tree
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


def side(label: str, tree: Path) -> Side:
    """Checks that `python -m task_manager` run in tree serves tree's code (not the
    installed checkout's) and reads which serve options it has."""
    found = subprocess.run(
        [sys.executable, "-c", "import task_manager; print(task_manager.__file__)"],
        capture_output=True,
        text=True,
        cwd=tree,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{label}: task_manager imports from {found}, not from {tree}")
    usage = subprocess.run(
        [sys.executable, "-m", "task_manager", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=tree,
        check=True,
    ).stdout
    known = frozenset(word for word in usage.replace("[", " ").split() if word.startswith("--"))
    return Side(label, tree, known)


def serve_command(server: Side, workdir: Path, name: str) -> list[str]:
    """bench.run's server command, less the options this revision does not know."""
    command = task_manager(workdir, f"{server.label}-{name}")
    start = command.index("serve") + 1
    options = command[start:]  # each option is followed by its value
    kept = command[:start]
    for option, value in zip(options[::2], options[1::2], strict=True):
        if option in server.options_known:
            kept += [option, value]
    return kept


def run_once(server: Side, scenario: Scenario, workdir: Path, run: int) -> None:
    if scenario.name in server.missing:
        return
    name = f"{scenario.name}-{run}"
    with start_server(
        serve_command(server, workdir, name), workdir / f"{server.label}-{name}.log", server.tree
    ) as process:
        try:
            measured = client_with_cpu(
                scenario.client, process.process.pid, process.address, **scenario.options
            )
        except ClientFailed as failed:
            lines = str(failed).strip().splitlines()
            why = next((line.strip() for line in lines if "details = " in line), lines[-1])
            print(f"{server.label} {scenario.name}: missing ({why})", file=sys.stderr)
            server.missing.add(scenario.name)
            return
        log = process.stop()
    measured["writes_per_commit"] = writes_per_commit(log)
    for figure in scenario.figures:
        value = measured.get(figure)
        if value is not None:
            server.runs.setdefault(f"{scenario.name} {figure}", []).append(value)


def compare(revision: str, pairs: int, duration: float, rate: float, rounds: int) -> dict[str, Any]:
    planned = scenarios(duration, rate, rounds)
    with worktree(revision) as tree, tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        other, this = side(revision, tree), side("this", REPO_ROOT)
        for scenario in planned:
            for pair in range(pairs):
                order = (other, this) if pair % 2 == 0 else (this, other)
                for server in order:
                    run_once(server, scenario, Path(tmp), pair)
    results: dict[str, Any] = {
        "revision": revision,
        "this": git_commit(),
        "pairs": pairs,
        "figures": {},
    }
    for figure in (f"{s.name} {figure}" for s in planned for figure in s.figures):
        a, b = other.runs.get(figure), this.runs.get(figure)
        if not (a or b):
            continue  # neither server logs it (writes per commit, before it was logged)
        results["figures"][figure] = {
            revision: a,
            "this": b,
            "this_vs_other": statistics.median(b) / statistics.median(a) if a and b else None,
        }
    return results


def table(results: dict[str, Any]) -> str:
    revision = results["revision"]
    rows = [("figure", f"{revision} (median)", "this (median)", "this / other")]

    def median(values: list[float] | None) -> str:
        return "missing" if not values else f"{statistics.median(values):,.2f}"

    for figure, found in results["figures"].items():
        ratio = found["this_vs_other"]
        rows.append(
            (
                figure,
                median(found[revision]),
                median(found["this"]),
                "" if ratio is None else f"{ratio:.2f}",
            )
        )
    return columns(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="a commit, tag or branch of this repository")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per timed run")
    parser.add_argument("--rate", type=float, default=250.0, help="dispatch: tasks per second")
    parser.add_argument("--rounds", type=int, default=10, help="watch-fanout: updates")
    args = parser.parse_args()
    results = compare(args.revision, args.pairs, args.duration, args.rate, args.rounds)
    save(REPO_ROOT / "bench" / "results" / f"compare-{args.revision}.json", results)
    print(table(results))


if __name__ == "__main__":
    main()
