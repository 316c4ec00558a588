"""An example operator with files: a task with an input file, its output files saved.

    .venv/bin/python examples/files_operator.py MESH_FILE RESULTS_DIR [--target 127.0.0.1:50051]

Uploads MESH_FILE as the task's input "mesh" (before the task is created, so its agent
is sent it whole), waits for the task to finish, and writes the outputs of its
successful attempt into RESULTS_DIR, one file each, named as the agent named them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent_kit import SyncOperatorClient
from task_manager.v1 import task_manager_pb2 as pb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mesh", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--entity-id", default="scanner-1")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    args = parser.parse_args()

    with SyncOperatorClient(args.target) as client:
        task = client.create_task(
            assignee_entity_id=args.entity_id,
            display_name="scan a mesh",
            inputs={"mesh": args.mesh},  # a path: its content, uploaded first
        )
        task_id = task.version.task_id
        print(f"operator: created {task_id} with input mesh ({args.mesh})")
        done = client.wait(task_id, timeout=args.timeout)
        if done.status.status != pb.STATUS_DONE_OK:
            print(f"operator: {task_id} ended {pb.Status.Name(done.status.status)}")
            return 1
        for name, path in sorted(client.download_outputs(task_id, args.results).items()):
            print(f"operator: output {name} -> {path}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
