"""`make serve-cluster`: a private PostgreSQL and replicas on it, until SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from agent_kit import SyncOperatorClient
from tests.helpers import REPO_ROOT

SERVING = re.compile(r"cluster: replica \d+ serving on (\S+) \(pid (\d+)\)")


def running(pid: int) -> bool:
    """Whether the process runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_task_created_on_one_replica_is_served_by_the_other_and_sigterm_stops_all() -> None:
    cluster = subprocess.Popen(
        [sys.executable, "-m", "devtools.cluster", "--ports", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert cluster.stdout is not None
        replicas: list[tuple[str, int]] = []
        seen = []
        for line in cluster.stdout:  # ends if the cluster exits before it is ready
            seen.append(line)
            if match := SERVING.search(line):
                replicas.append((match[1], int(match[2])))
            if "SIGTERM stops" in line:
                break
        assert len(replicas) == 2, "".join(seen)
        (first, _), (second, _) = replicas
        with SyncOperatorClient(first) as on_first, SyncOperatorClient(second) as on_second:
            task = on_first.create_task(assignee_entity_id="drone-1")
            assert on_second.get_task(task.version.task_id).version == task.version
        cluster.send_signal(signal.SIGTERM)
        rest, _ = cluster.communicate(timeout=60)
    finally:
        if cluster.poll() is None:
            cluster.kill()
            cluster.communicate()
    assert cluster.returncode == 0, rest
    assert not [pid for _, pid in replicas if running(pid)]
