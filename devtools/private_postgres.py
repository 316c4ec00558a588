"""A private PostgreSQL server for tests and developers: its own data directory in a temp
dir, a free port on 127.0.0.1, trust auth, stopped (and removed) when done.

    with PrivatePostgres(settings={"fsync": "off"}) as server:
        url = server.create_database()

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` OS user
(Debian's package creates it) in a temp dir that user owns; otherwise as the current user.

    python -m devtools.private_postgres           # start one, print its URL, wait for ^C
    python -m devtools.private_postgres --check   # which binaries it would use (exit 1: none)
"""

from __future__ import annotations

import argparse
import atexit
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

__all__ = [
    "PostgresNotFound",
    "PostgresStartError",
    "PrivatePostgres",
    "find_bindir",
]

INSTALL_HINT = (
    "`make test` installs it (as root, with apt-get: `apt-get install postgresql`); "
    "or point $PG_BINDIR at a directory holding initdb and postgres"
)
# Many test servers each hold several connections to one session-wide cluster.
DEFAULT_SETTINGS = {"max_connections": "300"}
SERVER_OS_USER_WHEN_ROOT = "postgres"
LOG_TAIL_LINES = 25


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries (initdb, postgres) on this machine."""


class PostgresStartError(RuntimeError):
    """initdb or the server failed; the message ends with the output or log's last lines."""


def _has_server_binaries(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("initdb", "postgres"))


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    result = subprocess.run(
        [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=False
    )
    return Path(result.stdout.strip()) if result.returncode == 0 else None


def _newest_debian_bindir() -> Path | None:
    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))

    candidates = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if _has_server_binaries(d)]
    return max(candidates, key=version, default=None)


def find_bindir() -> Path:
    """The directory of the server binaries: $PG_BINDIR, else `pg_config --bindir`, else the
    newest /usr/lib/postgresql/*/bin, else wherever `initdb` on PATH really lives."""
    explicit = os.environ.get("PG_BINDIR")
    if explicit:
        if not _has_server_binaries(Path(explicit)):
            raise PostgresNotFound(
                f"$PG_BINDIR={explicit} holds no initdb and postgres. {INSTALL_HINT}"
            )
        return Path(explicit)
    for bindir in (_pg_config_bindir(), _newest_debian_bindir()):
        if bindir is not None and _has_server_binaries(bindir):
            return bindir
    initdb = shutil.which("initdb")
    # Resolved: /usr/local/bin may hold symlinks to some of the binaries only.
    if initdb is not None and _has_server_binaries(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    raise PostgresNotFound(
        "no PostgreSQL server binaries (initdb, postgres) found: not in $PG_BINDIR, "
        f"`pg_config --bindir`, /usr/lib/postgresql/*/bin or PATH. {INSTALL_HINT}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


class PrivatePostgres:
    """One PostgreSQL server in a temp dir; a context manager, or start() and stop()."""

    def __init__(
        self, settings: Mapping[str, str] | None = None, start_timeout_s: float = 60.0
    ) -> None:
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.start_timeout_s = start_timeout_s
        self._root: Path | None = None
        self._port: int | None = None
        self._bindir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._as_root = os.geteuid() == 0
        self.os_user = (
            SERVER_OS_USER_WHEN_ROOT if self._as_root else pwd.getpwuid(os.getuid()).pw_name
        )

    # -- where it is ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def root(self) -> Path:
        """The temp dir: data/ (the cluster), the Unix socket and postgres.log."""
        if self._root is None:
            raise RuntimeError("the server has not been started")
        return self._root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def exited(self) -> bool:
        """Whether the server has exited by itself (False if never started or stopped)."""
        return self._process is not None and self._process.poll() is not None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.os_user}@127.0.0.1:{self.port}/{database}"

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> PrivatePostgres:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """initdb into a fresh temp dir and start the server on a free port; returns once it
        accepts connections. Raises PostgresNotFound or PostgresStartError."""
        if self._process is not None:
            raise RuntimeError("the server is already running")
        self._bindir = bindir = find_bindir()
        # Registered first: a failure or ^C anywhere below still removes the temp dir.
        atexit.register(self.stop)
        try:
            self._root = Path(tempfile.mkdtemp(prefix="private-postgres-"))
            if self._as_root:
                os.chown(self._root, *_uid_and_gid(self.os_user))
            self._initdb(bindir)
            self._start_on_a_free_port(bindir)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Fast shutdown (open sessions are ended), then the temp dir is removed. Idempotent."""
        self._shut_down()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        atexit.unregister(self.stop)

    def restart(self) -> None:
        """Stop and start again: the same data dir and port, open sessions are ended."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        assert self._bindir is not None
        self._shut_down()
        self._launch(self._bindir)

    # -- databases --------------------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database (a unique name unless given); returns its URL."""
        name = name or f"db_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it even while sessions are connected to it (they are ended)."""
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # -- the work ---------------------------------------------------------------------------

    def _as_server_user(self, argv: list[str], die_with_parent: bool = False) -> list[str]:
        """argv run as the server's OS user. setpriv rather than runuser: it execs in place,
        so the postmaster is our own child (signals reach it directly; runuser would sit
        between us and turn a fast-shutdown SIGINT into SIGTERM, then SIGKILL), and it can
        set a parent-death signal after changing user (the kernel clears one set before)."""
        setpriv = shutil.which("setpriv")
        options: list[str] = []
        if self._as_root:
            if setpriv is None:
                raise PostgresStartError("running as root needs setpriv (util-linux)")
            options += [f"--reuid={self.os_user}", f"--regid={self.os_user}", "--init-groups"]
        # The kernel sends the parent-death signal when the *thread* that started the child
        # ends: only the main thread lives as long as the process.
        if die_with_parent and setpriv is not None and _on_main_thread():
            # If the test run is killed outright (no atexit), the postmaster gets SIGQUIT:
            # immediate shutdown, so it and every backend go.
            options.append("--pdeathsig=SIGQUIT")
        if not options:
            return argv
        assert setpriv is not None
        return [setpriv, *options, "--", *argv]

    def _initdb(self, bindir: Path) -> None:
        argv = [str(bindir / "initdb"), "--pgdata", str(self.data_dir), "--username"]
        argv += [self.os_user, "--auth-local=trust", "--auth-host=trust", "--encoding=UTF8"]
        # C: byte-order collation, the same on every machine, and no locale to be installed.
        argv += ["--locale=C", "--no-sync"]
        result = subprocess.run(
            self._as_server_user(argv),
            cwd=self.root,  # the server's user may not be able to enter ours
            capture_output=True,
            text=True,
            timeout=self.start_timeout_s,
            check=False,
        )
        if result.returncode != 0:
            output = _tail(result.stdout + result.stderr)
            raise PostgresStartError(f"initdb failed (exit {result.returncode}):\n{output}")

    def _start_on_a_free_port(self, bindir: Path) -> None:
        # The port is free when probed and taken when the server binds it; another process
        # can take it in between, so a lost race picks another port.
        for attempt in range(3):
            self._port = _free_port()
            self.log_path.write_bytes(b"")  # the log of this attempt only
            try:
                self._launch(bindir)
                return
            except PostgresStartError as error:
                if attempt == 2 or "could not bind" not in str(error):
                    raise

    def _launch(self, bindir: Path) -> None:
        settings = {
            **self.settings,
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
        }
        argv = [str(bindir / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            # Popen rather than `pg_ctl start`: pg_ctl detaches the server, we keep it as a
            # child: its exit is seen at once, and it can die with us. Its own session: a ^C
            # in the terminal reaches us only, and stop() decides how the server ends.
            self._process = subprocess.Popen(
                self._as_server_user(argv, die_with_parent=True),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                pass
            # The pause between attempts is also the check that the server is still there.
            try:
                code = self._process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    continue
                self._shut_down()
                raise PostgresStartError(
                    f"PostgreSQL did not accept connections within {self.start_timeout_s}s; "
                    f"{self.log_path}:\n{self.log_tail()}"
                ) from None
            self._process = None
            raise PostgresStartError(
                f"PostgreSQL exited during startup (exit {code}); {self.log_path}:\n"
                f"{self.log_tail()}"
            )

    def _shut_down(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGQUIT)  # immediate shutdown
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    # Still unreaped, so its pid is still its process group's: no stranger's.
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self._process = None

    def log_tail(self) -> str:
        """The server log's last lines."""
        try:
            return _tail(self.log_path.read_text(errors="replace"))
        except OSError as error:
            return f"(no log: {error})"


def _uid_and_gid(os_user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(os_user)
    except KeyError:
        raise PostgresNotFound(
            f"PostgreSQL refuses to run as root and there is no {os_user!r} OS user to run it "
            f"as (Debian's postgresql package creates it). {INSTALL_HINT}"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _parse_setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.private_postgres",
        description="Start a private PostgreSQL server, print its URL, stop it on ^C/SIGTERM.",
    )
    parser.add_argument(
        "--check", action="store_true", help="print the server binaries' directory and exit"
    )
    parser.add_argument(
        "--set", action="append", default=[], type=_parse_setting, metavar="NAME=VALUE",
        help="a server setting (repeatable), e.g. --set fsync=off",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.check:
            print(find_bindir())
            return 0
        server = PrivatePostgres(settings=dict(args.set))
        server.start()
    except (PostgresNotFound, PostgresStartError) as error:
        print(f"private_postgres: {error}", file=sys.stderr)
        return 1
    with server:
        print(server.url(), flush=True)
        # Waited for, not handled: no handler can run in the middle of stop().
        wanted = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        # A server gone before the mask was set sent its SIGCHLD to no one: poll it too.
        if server.exited() or signal.sigwait(wanted) == signal.SIGCHLD:
            print(f"private_postgres: the server exited; {server.log_path}:", file=sys.stderr)
            print(server.log_tail(), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
