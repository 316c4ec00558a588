"""An agent in its own process, for tests that kill it: `python -m tests.agent_process`.

--hang: the handler reports progress, then never returns (the runtime keeps sending
heartbeats); otherwise it saves each of the task's inputs as an output of the same name
and finishes. Prints "started TASK_ID" when a handler starts.
"""

from __future__ import annotations

import argparse

import anyio
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import Agent, Backoff, TaskContext


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--entity-id", required=True)
    parser.add_argument("--pool", action="append", default=[])
    parser.add_argument("--hang", action="store_true")
    args = parser.parse_args()

    async def handle(task: TaskContext) -> StringValue:
        print(f"started {task.task_id} attempt {task.task.attempt}", flush=True)
        await task.progress(StringValue(value="halfway"))
        if args.hang:
            await anyio.sleep_forever()
        for named in task.task.inputs:
            await task.save_output(named.name, await task.input(named.name))
        return StringValue(value=f"done by {args.entity_id}")

    agent = Agent(
        args.target,
        args.entity_id,
        handle,
        reconnect_backoff=Backoff(initial=0.05, maximum=0.5),
        pools=args.pool,
    )
    await agent.run()


if __name__ == "__main__":
    anyio.run(main)
