"""`make bench`: real server processes, separate client processes, same-run baselines.

Writes bench/results/latest.json and prints a table. These machines are shared and
noisy: compare ratios against the baseline measured in the same run, not raw numbers
across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "latest.json"
TARGETS = {
    "update_status_vs_echo": (">=", 0.6),
    "lifecycle_tasks_per_s": (">=", 1000),
    "dispatch_ms_p99": ("<=", 10),
    "dispatch_ms_p50": ("<=", 2),
    "watch_fanout_ms_p99": ("<=", 50),
    "idle_stream_rss_kb": ("<=", 100),
    "durable": ("==", True),
}


@dataclass
class Server:
    process: subprocess.Popen[str]
    address: str
    log: Path

    def stop(self) -> str:
        """SIGTERM, wait, and return what the server logged."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.log.read_text()


@contextmanager
def start_server(command: list[str], log: Path, cwd: Path = REPO_ROOT) -> Iterator[Server]:
    """Runs command (from cwd: `python -m task_manager` serves the code found there) until
    the block ends."""
    with log.open("w") as log_file:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=cwd
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "serving on" not in line:
        process.kill()
        raise SystemExit(f"server did not start: {line!r}\n{log.read_text()}")
    address = line.rsplit(" ", 1)[1].strip()
    grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=30)
    server = Server(process, address, log)
    try:
        yield server
    finally:
        if process.poll() is None:
            server.stop()


def task_manager(workdir: Path, name: str) -> list[str]:
    db = workdir / f"{name}.db"
    return [
        sys.executable,
        "-m",
        "task_manager",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        str(db),
        # One unauthenticated client opens every stream here; the default per-principal
        # limit (1,000) is for fairness between principals, not what is measured.
        "--max-streams-per-principal",
        "100000",
    ]


class ClientFailed(Exception):
    """A bench client exited with an error (its stderr is the message)."""


def client(scenario: str, target: str, **options: object) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.load", scenario, "--target", target]
    for key, value in options.items():
        command.append(f"--{key.replace('_', '-')}")
        if value != "":  # "" marks a flag without a value
            command.append(str(value))
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    if result.returncode != 0:
        raise ClientFailed(f"client {scenario} failed:\n{result.stderr}")
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine, every core, kernel and steal included."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def client_with_cpu(
    scenario: str, server_pid: int, target: str, **options: object
) -> dict[str, Any]:
    """client(), plus where the CPU went while it ran: the server's CPU per call and how
    busy the whole machine was. A machine near 100% busy means the figure is bounded by
    the CPU every call costs, not by waiting."""
    server_before, (busy_before, total_before) = cpu_seconds(server_pid), machine_jiffies()
    measured = client(scenario, target, **options)
    server_after, (busy_after, total_after) = cpu_seconds(server_pid), machine_jiffies()
    if measured.get("calls"):
        server_s = server_after - server_before
        measured["server_cpu_us_per_call"] = server_s / measured["calls"] * 1e6
    measured["machine_busy"] = (busy_after - busy_before) / max(1, total_after - total_before)
    return measured


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def durable_from(log: str) -> bool:
    return "commits fsynced: True" in log


def writes_per_commit(log: str) -> float | None:
    found = re.search(r"stopped after (\d+) writes in (\d+) commits", log)
    if found is None or int(found[2]) == 0:
        return None
    return round(int(found[1]) / int(found[2]), 2)


def idle_streams(workdir: Path, streams: int) -> tuple[float, bool]:
    with start_server(task_manager(workdir, "idle"), workdir / "idle.log") as server:
        client("idle-streams", server.address, streams=10)  # warm up the server's paths
        before = rss_kb(server.process.pid)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.load",
                "idle-streams",
                "--target",
                server.address,
                "--streams",
                str(streams),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        assert holder.stdout is not None
        assert holder.stdin is not None
        ready = json.loads(holder.stdout.readline())
        assert ready["ready"] == streams, ready
        time.sleep(1.0)  # let the server settle what it allocated for the streams
        after = rss_kb(server.process.pid)
        holder.stdin.close()
        holder.wait(120)
        holder.stdout.close()
        log = server.stop()
    return (after - before) / streams, durable_from(log)


def measure(quick: bool) -> dict[str, Any]:
    duration = 3.0 if quick else 10.0
    streams = 2_000 if quick else 10_000
    results: dict[str, Any] = {}
    durable: list[bool] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)

        def scenario(name: str, **options: object) -> tuple[dict[str, Any], str]:
            """One client scenario against a fresh server and database; its result and
            the server log."""
            run = f"{name}-{len(durable)}"  # a new database file for every run
            with start_server(task_manager(workdir, run), workdir / f"{run}.log") as server:
                measured = client_with_cpu(name, server.process.pid, server.address, **options)
                log = server.stop()
            durable.append(durable_from(log))
            return measured, log

        # The ratio is the figure that matters, and the machine's speed drifts: measure
        # the baseline and UpdateStatus in adjacent pairs and take the median pair.
        pairs = []
        echo_command = [sys.executable, "-m", "bench.echo_server"]
        with start_server(echo_command, workdir / "echo.log") as echo:
            for _ in range(1 if quick else 5):  # one pair drifts by 10% or more
                baseline = client_with_cpu(
                    "echo", echo.process.pid, echo.address, duration=duration
                )
                measured, log = scenario("update-status", duration=duration)
                pairs.append(
                    (measured["rpc_per_s"] / baseline["rpc_per_s"], baseline, measured, log)
                )
        pairs.sort(key=lambda pair: pair[0])
        ratio, baseline, measured, log = pairs[len(pairs) // 2]
        results["echo_rpc_per_s"] = baseline["rpc_per_s"]
        results["echo_server_cpu_us_per_call"] = baseline["server_cpu_us_per_call"]
        results["echo_machine_busy"] = baseline["machine_busy"]
        results["update_status_per_s"] = measured["rpc_per_s"]
        results["update_status_server_cpu_us_per_call"] = measured["server_cpu_us_per_call"]
        results["update_status_machine_busy"] = measured["machine_busy"]
        results["update_status_writes_per_commit"] = writes_per_commit(log)
        results["update_status_vs_echo"] = ratio
        results["update_status_vs_echo_pairs"] = [round(pair[0], 3) for pair in pairs]

        # The lifecycle's and dispatch's baseline: the same clients against the raw
        # server's Floor (the methods they call, with nothing behind them), each run
        # right before one of ours. Single runs drift as much as the ratio's pairs, so
        # three such pairs each, and medians.
        repeats = 1 if quick else 3
        floors, walked = [], []
        for _ in range(repeats):
            with start_server(echo_command, workdir / "floor-lifecycle.log") as echo:
                floors.append(
                    client_with_cpu("lifecycle", echo.process.pid, echo.address, duration=duration)
                )
            walked.append(scenario("lifecycle", duration=duration))
        # The median run's own figures, so CPU, batching and load belong together.
        floor = sorted(floors, key=lambda run: run["tasks_per_s"])[repeats // 2]
        measured, log = sorted(walked, key=lambda run: run[0]["tasks_per_s"])[repeats // 2]
        results["lifecycle_tasks_per_s"] = measured["tasks_per_s"]
        results["lifecycle_floor_tasks_per_s"] = floor["tasks_per_s"]
        results["lifecycle_vs_floor"] = statistics.median(
            ours[0]["tasks_per_s"] / raw["tasks_per_s"]
            for raw, ours in zip(floors, walked, strict=True)
        )
        results["lifecycle_runs_tasks_per_s"] = [round(run[0]["tasks_per_s"]) for run in walked]
        results["lifecycle_server_cpu_us_per_task"] = measured["server_cpu_us_per_call"]
        results["lifecycle_floor_server_cpu_us_per_task"] = floor["server_cpu_us_per_call"]
        results["lifecycle_floor_machine_busy"] = floor["machine_busy"]
        results["lifecycle_writes_per_commit"] = writes_per_commit(log)
        results["lifecycle_machine_busy"] = measured["machine_busy"]
        measured, _ = scenario("lifecycle", duration=duration, unary="")
        results["lifecycle_unary_tasks_per_s"] = measured["tasks_per_s"]

        rate = max(10.0, results["lifecycle_tasks_per_s"] / 2)
        floors, dispatched = [], []
        for _ in range(repeats):
            with start_server(echo_command, workdir / "floor-dispatch.log") as echo:
                floors.append(client("dispatch", echo.address, duration=duration, rate=rate))
            dispatched.append(scenario("dispatch", duration=duration, rate=rate)[0])
        for name, runs in (("dispatch", dispatched), ("dispatch_floor", floors)):
            results[f"{name}_ms_p50"] = statistics.median(run["p50_ms"] for run in runs)
            results[f"{name}_ms_p99"] = statistics.median(run["p99_ms"] for run in runs)
        results["dispatch_runs_ms_p50"] = [round(run["p50_ms"], 2) for run in dispatched]
        results["dispatch_rate_per_s"] = rate

        # Fan-out's baseline: the same clients against the raw server's Push and Listen,
        # each run right before one of ours; a tail over 30 rounds drifts, so the
        # figures are medians of three such pairs.
        fanout = {"watchers": 1000, "rounds": 10 if quick else 30}
        watched, pushed = [], []
        for _ in range(1 if quick else 3):
            with start_server(echo_command, workdir / "push.log") as echo:
                pushed.append(client("push-fanout", echo.address, **fanout))
            watched.append(scenario("watch-fanout", **fanout)[0])
        results["watch_fanout_watchers"] = fanout["watchers"]
        for name, runs in (("watch_fanout", watched), ("push_fanout", pushed)):
            results[f"{name}_ms_p50"] = statistics.median(run["p50_ms"] for run in runs)
            results[f"{name}_ms_p99"] = statistics.median(run["p99_ms"] for run in runs)
        results["watch_fanout_vs_push_p99"] = statistics.median(
            w["p99_ms"] / p["p99_ms"] for w, p in zip(watched, pushed, strict=True)
        )

        per_stream, idle_durable = idle_streams(workdir, streams)
        durable.append(idle_durable)
        results["idle_streams"] = streams
        results["idle_stream_rss_kb"] = per_stream
    results["durable"] = all(durable)
    results["cores"] = os.cpu_count()
    results["commit"] = git_commit()
    results["python"] = platform.python_version()
    results["grpcio"] = grpc.__version__
    results["quick"] = quick
    results["duration_s"] = duration
    results["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=REPO_ROOT, check=False
        ).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def table(results: dict[str, Any]) -> str:
    rows = [("figure", "value", "target", "")]
    for key in (
        "echo_rpc_per_s",
        "update_status_per_s",
        "update_status_vs_echo",
        "update_status_vs_echo_pairs",
        "update_status_writes_per_commit",
        "echo_server_cpu_us_per_call",
        "update_status_server_cpu_us_per_call",
        "echo_machine_busy",
        "update_status_machine_busy",
        "lifecycle_tasks_per_s",
        "lifecycle_runs_tasks_per_s",
        "lifecycle_floor_tasks_per_s",
        "lifecycle_vs_floor",
        "lifecycle_unary_tasks_per_s",
        "lifecycle_writes_per_commit",
        "lifecycle_server_cpu_us_per_task",
        "lifecycle_floor_server_cpu_us_per_task",
        "lifecycle_machine_busy",
        "lifecycle_floor_machine_busy",
        "dispatch_ms_p50",
        "dispatch_ms_p99",
        "dispatch_runs_ms_p50",
        "dispatch_floor_ms_p50",
        "dispatch_floor_ms_p99",
        "watch_fanout_ms_p50",
        "watch_fanout_ms_p99",
        "push_fanout_ms_p50",
        "push_fanout_ms_p99",
        "watch_fanout_vs_push_p99",
        "idle_stream_rss_kb",
        "durable",
    ):
        value = results.get(key)
        target = TARGETS.get(key)
        verdict = ""
        if target is not None and value is not None:
            op, bound = target
            met = value >= bound if op == ">=" else value <= bound if op == "<=" else value == bound
            verdict = "ok" if met else "MISSED"
        elif target is not None:
            verdict = "missing"
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        rows.append((key, shown, "" if target is None else f"{target[0]} {target[1]}", verdict))
    return columns(rows)


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def save(path: Path, results: dict[str, Any]) -> None:
    """Writes results as indented JSON (bench/results/ is made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under a minute)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = measure(args.quick)
    save(args.output, results)
    print(json.dumps(results, indent=2))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
