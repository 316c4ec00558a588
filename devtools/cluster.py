"""`make serve-cluster`: a private PostgreSQL and several Task Manager replicas on it, for
trying replicas by hand; stopped together on ^C or SIGTERM.

    python -m devtools.cluster                        # 2 replicas, 127.0.0.1:50051 and :50052
    python -m devtools.cluster --replicas 3           # ports 50051, 50052, 50053
    python -m devtools.cluster --ports 6000,6001 -- --heartbeat-timeout 30

Arguments after `--` go to every `task-manager serve`. PostgreSQL runs with fsync on, as
a real deployment would; its data is gone when the cluster stops. A replica that exits
by itself ends the cluster (exit 1): nothing here restarts one.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from devtools.private_postgres import PostgresNotFound, PostgresStartError, PrivatePostgres

__all__ = ["Replica", "main"]

FIRST_PORT = 50051
STOP_TIMEOUT_S = 60.0
"""How long a replica may take to stop after SIGTERM (its shutdown grace and then some)
before it is killed."""
READY_MARK = "task-manager: serving on "


def say(message: str) -> None:
    print(f"cluster: {message}", flush=True)


@dataclass
class Replica:
    """One `task-manager serve` process; its output goes to ours, each line prefixed."""

    number: int
    listen: str
    process: subprocess.Popen[str]
    address: str = ""
    _forwarder: threading.Thread | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"replica {self.number}"

    @classmethod
    def start(cls, number: int, listen: str, url: str, extra: Sequence[str]) -> Replica:
        """Starts it and waits for its "serving on" line; raises RuntimeError with what it
        printed if it exits first."""
        command = [sys.executable, "-m", "task_manager", "serve", "--listen", listen]
        # Replicas on one host cannot share the HTTP default: each takes a free port,
        # and says which (its "HTTP on" line is forwarded).
        host = listen.rsplit(":", 1)[0]
        command += ["--http-listen", f"{host}:0", "--db", url, *extra]
        process = subprocess.Popen(
            _dies_with_us(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Its own session: a ^C in the terminal reaches us only, and we stop the
            # replicas in order (SIGTERM, wait) before PostgreSQL.
            start_new_session=True,
        )
        replica = cls(number, listen, process)
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(READY_MARK):
                replica.address = line[len(READY_MARK) :].strip()
                break
            replica.forward(line)  # what it says while starting (why it failed)
        else:
            code = process.wait()
            process.stdout.close()
            raise RuntimeError(f"{replica.name} ({listen}) exited at startup (exit {code})")
        return replica

    def forward(self, line: str) -> None:
        print(f"[{self.name}] {line}", end="", flush=True)

    def forward_output(self) -> None:
        """Copies its further output to ours from a thread, until it closes."""

        def copy(stream: IO[str]) -> None:
            for line in stream:
                self.forward(line)

        assert self.process.stdout is not None
        self._forwarder = threading.Thread(
            target=copy, args=(self.process.stdout,), name=self.name, daemon=True
        )
        self._forwarder.start()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        """Waits for it to exit (SIGKILL after STOP_TIMEOUT_S) and for its last lines
        ("stopped after ..."); its exit code."""
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            say(f"{self.name} did not stop within {STOP_TIMEOUT_S:.0f} s: killed")
            self.process.kill()
            self.process.wait()
        if self._forwarder is not None:
            self._forwarder.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def _dies_with_us(command: list[str]) -> list[str]:
    """command with a parent-death SIGTERM (setpriv, as private_postgres does), so a
    cluster killed outright leaves no replica behind; unchanged without setpriv."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return command
    return [setpriv, "--pdeathsig=SIGTERM", "--", *command]


def ports_for(ports: str | None, replicas: int | None) -> list[int]:
    """The replicas' ports: --ports as a comma list (or its first port, counted up; 0: a
    free port each), else FIRST_PORT counted up, one per replica (2 by default)."""
    given = [int(port) for port in ports.split(",")] if ports else [FIRST_PORT]
    count = replicas if replicas is not None else len(given) if len(given) > 1 else 2
    if count < 1:
        raise ValueError("--replicas must be at least 1")
    if len(given) == 1:
        return [given[0] + n if given[0] else 0 for n in range(count)]
    if len(given) != count:
        raise ValueError(f"--ports names {len(given)} ports for {count} replicas")
    return given


def describe(postgres: PrivatePostgres, url: str, replicas: Sequence[Replica]) -> None:
    say(f"PostgreSQL {url} (fsync on; log {postgres.log_path})")
    for replica in replicas:
        say(f"{replica.name} serving on {replica.address} (pid {replica.process.pid})")
    both = ",".join(replica.address for replica in replicas)
    first = replicas[0].address
    say("every replica serves the same tasks; point clients at one or at all of them:")
    print(f"    .venv/bin/taskctl --target {first} list")
    print(f"    .venv/bin/python examples/agent.py --target ipv4:{both}")
    print(f'    Agent("ipv4:{both}", entity_id="drone-1")  # gRPC picks one, fails over')
    print(f"    psql {url}")
    say("^C or SIGTERM stops the replicas, then PostgreSQL")


def wait_for_the_end(postgres: PrivatePostgres, replicas: Sequence[Replica]) -> int:
    """Blocks until ^C/SIGTERM (0) or until a replica or PostgreSQL exits by itself (1)."""
    # Waited for, not handled (as in private_postgres): no handler runs in the middle of
    # a shutdown. Blocked only now: children inherit a signal mask, and theirs stays open.
    wanted = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    for replica in replicas:
        replica.forward_output()  # threads started after the mask inherit it
    while True:
        # A child gone before the mask was set sent its SIGCHLD to no one: poll first.
        for replica in replicas:
            code = replica.process.poll()
            if code is not None:
                say(f"{replica.name} ({replica.address}) exited by itself (exit {code})")
                return 1
        if postgres.exited():
            say(f"PostgreSQL exited by itself; {postgres.log_path}:")
            print(postgres.log_tail(), file=sys.stderr)
            return 1
        if signal.sigwait(wanted) != signal.SIGCHLD:
            return 0


def run(ports: Sequence[int], host: str, extra: Sequence[str]) -> int:
    replicas: list[Replica] = []
    code = 1
    # Until the wait below takes it over, a SIGTERM stops a half-started cluster as ^C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with PrivatePostgres() as postgres:
        try:
            url = postgres.create_database("task_manager")
            for number, port in enumerate(ports, start=1):
                replicas.append(Replica.start(number, f"{host}:{port}", url, extra))
            describe(postgres, url, replicas)
            code = wait_for_the_end(postgres, replicas)
        except RuntimeError as error:
            say(str(error))
        except KeyboardInterrupt:
            code = 0  # ^C while starting
        finally:
            say("stopping")
            for replica in replicas:  # all at once: each drains its own calls
                replica.terminate()
            for replica in replicas:
                exit_code = replica.wait()
                if exit_code != 0 and code == 0:
                    say(f"{replica.name} stopped with exit {exit_code}")
                    code = 1
            say("stopping PostgreSQL")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.cluster",
        description="PostgreSQL and Task Manager replicas on it, until ^C/SIGTERM.",
        epilog="Arguments after -- are passed to every `task-manager serve`.",
    )
    parser.add_argument("--replicas", type=int, help="how many replicas (default 2)")
    parser.add_argument(
        "--ports",
        help=f"comma-separated ports, or the first one (default {FIRST_PORT}, +1...; 0: free ones)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("serve_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        ports = ports_for(args.ports, args.replicas)
    except ValueError as error:
        parser.error(str(error))
    try:
        return run(ports, args.host, args.serve_args)
    except (PostgresNotFound, PostgresStartError) as error:
        say(str(error))
        return 1
    except KeyboardInterrupt:  # ^C while PostgreSQL starts: it cleaned up after itself
        return 1


if __name__ == "__main__":
    sys.exit(main())
