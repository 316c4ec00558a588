"""An example agent: runs every task sent to one entity id and reports each step.

    .venv/bin/python examples/agent.py [--target 127.0.0.1:50051] [--entity-id drone-1]

Stop it with Ctrl+C. The runtime reports MACHINE_RECEIPT, ACK, WILCO, EXECUTING, then
DONE_OK with the result below (or DONE_NOT_OK if the handler raises).
"""

from __future__ import annotations

import argparse
import contextlib
import logging

import anyio
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import Agent, TaskContext


async def survey(task: TaskContext) -> StringValue:
    print(f"agent: executing {task.task_id} ({task.task.display_name or 'unnamed'})", flush=True)
    await anyio.sleep(1.0)  # the work itself
    print(f"agent: finished {task.task_id}", flush=True)
    return StringValue(value=f"surveyed: {task.task.description or 'the area'}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--entity-id", default="drone-1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    agent = Agent(args.target, args.entity_id, survey)
    print(f"agent: listening as {args.entity_id} on {args.target}", flush=True)
    await agent.run()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C is how this example stops
        anyio.run(main)
