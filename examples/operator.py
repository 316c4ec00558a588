"""An example operator: creates a task for an agent, waits for it, prints its history.

.venv/bin/python examples/operator.py [--target 127.0.0.1:50051] [--entity-id drone-1]
"""

from __future__ import annotations

import argparse
import sys
import time

from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import SyncOperatorClient
from task_manager.v1 import task_manager_pb2 as pb

TERMINAL = {pb.STATUS_DONE_OK, pb.STATUS_DONE_NOT_OK}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--entity-id", default="drone-1")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    args = parser.parse_args()

    with SyncOperatorClient(args.target) as client:
        task = client.create_task(
            assignee_entity_id=args.entity_id,
            display_name="survey the north field",
            description="the north field",
        )
        task_id = task.version.task_id
        status = pb.Status.Name(task.status.status)
        print(f"operator: created {task_id} for {args.entity_id}: {status}")
        deadline = time.monotonic() + args.timeout
        while task.status.status not in TERMINAL:
            if time.monotonic() > deadline:
                status = pb.Status.Name(task.status.status)
                print(f"operator: {task_id} still {status}: is the agent running?")
                return 1
            time.sleep(0.2)
            task = client.get_task(task_id)

        print(f"operator: history of {task_id}:")
        print(f"  {'revision':>8}  {'status_version':>14}  status")
        for entry in client.history(task_id):
            status = pb.Status.Name(entry.status.status)
            print(f"  {entry.revision:>8}  {entry.status_version:>14}  {status}")
        if task.status.status == pb.STATUS_DONE_OK and task.status.HasField("result"):
            result = StringValue()
            if task.status.result.Unpack(result):
                print(f"operator: result: {result.value}")
        elif task.status.HasField("task_error"):
            print(f"operator: error: {task.status.task_error.message}")
        return 0 if task.status.status == pb.STATUS_DONE_OK else 1


if __name__ == "__main__":
    sys.exit(main())
