"""An example agent with files: reads each task's input "mesh", saves an output "report".

    .venv/bin/python examples/files_agent.py [--target 127.0.0.1:50051] [--entity-id scanner-1]

The input arrives as a local file, fetched once per content (a task that names the same
bytes again reads the same file); the output goes to the task manager as a payload,
attached to this attempt. Stop it with Ctrl+C.
"""

from __future__ import annotations

import argparse
import hashlib
import logging

from agent_kit import Agent, TaskContext

parser = argparse.ArgumentParser(description="An example agent with files.")
parser.add_argument("--target", default="127.0.0.1:50051")
parser.add_argument("--entity-id", default="scanner-1")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

agent = Agent(args.target, entity_id=args.entity_id)


@agent.handler()
async def scan(task: TaskContext) -> None:
    mesh = await task.input("mesh")  # a local file
    data = mesh.read_bytes()
    lines, digest = data.count(b"\n"), hashlib.sha256(data).hexdigest()
    report = f"{len(data)} bytes, {lines} lines, sha256 {digest}\n"
    await task.save_output("report", report.encode())
    print(f"agent: scanned {task.task_id}: {report.strip()}", flush=True)


print(f"agent: listening as {args.entity_id} on {args.target}", flush=True)
agent.run_until_signal()
print("agent: stopped", flush=True)
