"""An example agent: runs every task sent to one entity id and reports each step.

    .venv/bin/python examples/agent.py [--target 127.0.0.1:50051] [--entity-id drone-1]

Stop it with Ctrl+C. The runtime reports MACHINE_RECEIPT, ACK, WILCO, EXECUTING, then
DONE_OK with the result below (or DONE_NOT_OK if the handler raises).
"""

from __future__ import annotations

import argparse
import logging

import anyio
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import Agent, TaskContext

parser = argparse.ArgumentParser(description="An example agent.")
parser.add_argument("--target", default="127.0.0.1:50051")
parser.add_argument("--entity-id", default="drone-1")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

agent = Agent(args.target, entity_id=args.entity_id)


@agent.handler()  # every task; agent.handler(SomeMessage) for tasks of one specification type
async def survey(task: TaskContext) -> StringValue:
    print(f"agent: executing {task.task_id} ({task.task.display_name or 'unnamed'})", flush=True)
    await anyio.sleep(1.0)  # the work itself
    print(f"agent: finished {task.task_id}", flush=True)
    return StringValue(value=f"surveyed: {task.task.description or 'the area'}")


print(f"agent: listening as {args.entity_id} on {args.target}", flush=True)
agent.run_until_signal()  # Ctrl+C or SIGTERM stops it cleanly
print("agent: stopped", flush=True)
