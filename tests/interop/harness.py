"""What every interop suite shares: a `keel serve` process, bounded waits, metrics, a runner.

test_interop.py (tritonclient against the embedded models) and test_mlserver.py (tritonclient
through Keel to a real MLServer) both import it, so Keel is started, awaited and stopped one
way. Nothing here sleeps for a fixed time: every wait polls with a bound.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request
from typing import Callable, TypeVar

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

# Bounds on every wait.
STARTUP_TIMEOUT = 60.0  # until Keel prints its listening line
READY_TIMEOUT = 30.0  # until ServerReady answers true
RPC_TIMEOUT = 10.0  # any single call
STOP_TIMEOUT = 15.0  # from SIGTERM to exit
POLL_INTERVAL = 0.05

LISTENING = re.compile(
    r"^keel \S+ listening on (\S+) \(gRPC, OIP v2\), admin on (\S+), serving models: (.*)$")

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# Starting and stopping Keel
# --------------------------------------------------------------------------------------


class KeelProcess:
    """One `keel serve` subprocess on ephemeral loopback ports.

    stdout is read by a thread (so the pipe never fills); stderr (Keel's logs) goes to a
    temporary file that is shown when something goes wrong.
    """

    def __init__(self, binary: str, config: str | None = None):
        self.log = tempfile.NamedTemporaryFile(prefix="keel-interop-", suffix=".log", delete=False)
        # Ephemeral ports for both listeners, so parallel runs never collide.
        args = [binary, "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
        if config is not None:
            args += ["--config", config]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        try:
            self.address, self.admin, self.models = self._read_banner(STARTUP_TIMEOUT)
        except BaseException:
            self.kill()
            self.close()
            raise

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # EOF

    def _read_banner(self, timeout: float) -> tuple[str, str, list[str]]:
        """Waits for the `listening on ADDR` line and returns (ADDR, admin ADDR, models).

        Raises RuntimeError (with Keel's log) if it does not come; __init__ then kills Keel.
        """
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"keel printed no listening line within {timeout:.0f} s; "
                                   f"stdout: {seen}\n{self.log_tail()}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait(timeout=5)
                raise RuntimeError(f"keel exited with {code} before listening; stdout: {seen}\n"
                                   f"{self.log_tail()}")
            seen.append(line)
            m = LISTENING.match(line)
            if m:
                address, admin = m.group(1), m.group(2)
                for where in (address, admin):
                    if not where.startswith("127.0.0.1:"):
                        raise RuntimeError(f"keel listens on {where}, not on 127.0.0.1")
                return address, admin, [s.strip() for s in m.group(3).split(",")]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Polls ServerReady until it answers true, the process dies or `timeout` passes."""
        client = grpcclient.InferenceServerClient(self.address)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"keel exited with {self.proc.returncode}\n{self.log_tail()}")
                try:
                    if client.is_server_ready(client_timeout=RPC_TIMEOUT):
                        return
                except InferenceServerException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"keel not ready within {timeout:.0f} s\n{self.log_tail()}")
                time.sleep(POLL_INTERVAL)
        finally:
            client.close()

    def metrics(self) -> str:
        """The text of Keel's `/metrics` (admin listener)."""
        return scrape(f"http://{self.admin}/metrics")

    def terminate(self) -> None:
        """Sends SIGTERM to this process (by PID) if it still runs."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> tuple[int | None, float]:
        """Waits for exit; kills on timeout. Returns (exit code or None if killed, seconds)."""
        start = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None, time.monotonic() - start
        return code, time.monotonic() - start

    def stop(self, timeout: float = STOP_TIMEOUT) -> tuple[int | None, float]:
        """SIGTERM, then wait at most `timeout` (kill after it)."""
        self.terminate()
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        return file_tail(self.log, "keel's log", lines)

    def close(self) -> None:
        """Frees the log file (after the process has exited)."""
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def start_keel(binary: str, config: str | None = None) -> KeelProcess:
    """Starts Keel (on `config`, else its embedded default) and waits until it is ready;
    kills it if it never gets ready."""
    keel = KeelProcess(binary, config)
    try:
        keel.wait_ready()
    except BaseException:
        keel.kill()
        keel.close()
        raise
    return keel


# --------------------------------------------------------------------------------------
# Small tools
# --------------------------------------------------------------------------------------


def file_tail(f, what: str, lines: int = 40) -> str:
    """The last `lines` lines of the open file `f`, headed for a failure message."""
    f.flush()
    with open(f.name, encoding="utf-8", errors="replace") as r:
        tail = r.readlines()[-lines:]
    return f"--- last {len(tail)} lines of {what} ({f.name}) ---\n" + "".join(tail)


def free_port() -> int:
    """A loopback TCP port the OS just chose and nothing holds (for servers that cannot be
    told to take port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(check: Callable[[], T | None], timeout: float, what: str,
         interval: float = POLL_INTERVAL) -> T:
    """Calls `check` until it returns something other than None, at most `timeout` seconds;
    raises AssertionError naming `what` (and the last exception `check` raised) after that."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value is not None:
                return value
        except Exception as e:  # noqa: BLE001 - reported if the wait runs out
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s"
                                 + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


def scrape(url: str) -> str:
    """GETs a Prometheus text exposition."""
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT) as r:
        return r.read().decode("utf-8")


_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there is none yet:
    Prometheus clients create a labelled series on its first count)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# --------------------------------------------------------------------------------------
# Running a suite
# --------------------------------------------------------------------------------------


class CountingResult(unittest.TextTestResult):
    """TextTestResult that also counts successes, for the closing line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def parse_args(description: str) -> argparse.Namespace:
    """`--keel PATH` (made absolute, checked executable; exits 2 if not) and `-k PATTERN`."""
    parser = argparse.ArgumentParser(description=description.split("\n")[0])
    parser.add_argument("--keel", required=True, help="path of the keel binary")
    parser.add_argument("-k", dest="pattern", action="append",
                        help="run only tests whose name contains this (repeatable)")
    args = parser.parse_args()
    args.keel = os.path.abspath(args.keel)
    if not os.access(args.keel, os.X_OK):
        print(f"error: {args.keel} is not an executable (build it: cargo build --release --bin keel)",
              file=sys.stderr)
        sys.exit(2)
    return args


def run_suite(name: str, cases: list[type[unittest.TestCase]], patterns: list[str] | None) -> int:
    """Runs `cases` in this order (a module's setUpModule too) and prints
    `NAME: N passed, N failed, N skipped`. Returns the exit code: 0 if all passed."""
    loader = unittest.TestLoader()
    if patterns:
        loader.testNamePatterns = [f"*{p}*" for p in patterns]
    suite = unittest.TestSuite([loader.loadTestsFromTestCase(c) for c in cases])
    runner = unittest.TextTestRunner(verbosity=2, resultclass=CountingResult, stream=sys.stdout)
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print(f"{name}: {result.passed} passed, {failed} failed, {len(result.skipped)} skipped")
    return 0 if result.wasSuccessful() and failed == 0 else 1
