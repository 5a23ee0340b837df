"""Processes of a benchmark run: start pinned to a core, wait until they answer, re-pin, measure RSS, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

KIB = 1024
MIB = 1024 * 1024


def freePort() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BenchProcess:
    """One server process started as ``taskset -c <core> <command>`` with its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], core: int, logPath: Path,
                 cwd: Path | None = None) -> None:
        self.name, self.command, self.env, self.core = name, command, env, core
        self.logPath, self.cwd = logPath, cwd
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> BenchProcess:
        with open(self.logPath, "wb") as log:
            self.process = subprocess.Popen(["taskset", "-c", str(self.core), *self.command], env=self.env,
                                            cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def waitForHttp(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited before {url} answered:\n{self.logTail()}")
            try:
                httpx.get(url, timeout=1.0, trust_env=False)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {url} did not answer within {timeout:g} s:\n{self.logTail()}")

    def pinTo(self, core: int) -> None:
        """Move every thread of the process (and of its children) to ``core``."""
        for pid in processTree(self.pid):
            for task in _tasksOf(pid):
                try:
                    os.sched_setaffinity(task, {core})
                except (ProcessLookupError, PermissionError):
                    pass

    def signalTree(self, signum: int) -> None:
        """Send ``signum`` to the process and its children (SIGSTOP / SIGCONT around another target's runs)."""
        if not self.alive():
            return
        for pid in processTree(self.pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def rssBytes(self) -> int:
        return treeRssBytes(self.pid) if self.alive() else 0

    def cpuSeconds(self) -> float:
        """CPU time (user + system) used so far by the process and its children."""
        return treeCpuSeconds(self.pid) if self.alive() else 0.0

    def logTail(self, chars: int = 1500) -> str:
        try:
            return self.logPath.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)  # a process stopped for another target's run would not see TERM
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _tasksOf(pid: int) -> list[int]:
    try:
        return [int(task) for task in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _childrenOf() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def processTree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children = _childrenOf()
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def parseVmRss(statusText: str) -> int:
    """VmRSS of a /proc/<pid>/status text, in bytes (0 when absent)."""
    for line in statusText.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    return 0


def rssBytesOf(pid: int) -> int:
    try:
        return parseVmRss(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0


def treeRssBytes(root: int) -> int:
    """Summed VmRSS of a process and its descendants."""
    return sum(rssBytesOf(pid) for pid in processTree(root))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parseCpuTicks(statText: str) -> int:
    """utime + stime (clock ticks) from a /proc/<pid>/stat text."""
    fields = statText.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def treeCpuSeconds(root: int) -> float:
    ticks = 0
    for pid in processTree(root):
        try:
            ticks += parseCpuTicks(Path(f"/proc/{pid}/stat").read_text())
        except OSError:
            continue
    return ticks / CLOCK_TICKS


BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
STEAL_FIELD = 7
"""user, nice, system, irq, softirq, steal in a /proc/stat cpuN line."""


def parseCoreBusyTicks(procStatText: str, core: int, fields: tuple[int, ...] = ()) -> int:
    """Busy clock ticks of one core from a /proc/stat text (or the sum of ``fields`` of its line)."""
    prefix = f"cpu{core} "
    for line in procStatText.splitlines():
        if line.startswith(prefix):
            values = [int(v) for v in line.split()[1:]]
            return sum(values[i] for i in fields or BUSY_FIELDS if i < len(values))
    return 0


def coreBusySeconds(core: int) -> float:
    return parseCoreBusyTicks(Path("/proc/stat").read_text(), core) / CLOCK_TICKS


def coreStealSeconds(core: int) -> float:
    """Time the hypervisor ran something else on this virtual core (steal, part of the busy time above)."""
    return parseCoreBusyTicks(Path("/proc/stat").read_text(), core, (STEAL_FIELD,)) / CLOCK_TICKS


IDLE_WINDOW_SECONDS = 0.25
IDLE_SHARE = 0.05
IDLE_WAIT_LIMIT_SECONDS = 30.0


def waitUntilIdle(process: "BenchProcess", limit: float = IDLE_WAIT_LIMIT_SECONDS) -> float:
    """Wait until the process (and its children) use less than IDLE_SHARE of a core over IDLE_WINDOW_SECONDS: a
    gateway that keeps working on requests the load generator abandoned at the end of its run (LiteLLM finishes
    every stream whose client left) would otherwise take the core from the next target's run. Returns the wait."""
    started = time.monotonic()
    while time.monotonic() - started < limit and process.alive():
        before = process.cpuSeconds()
        time.sleep(IDLE_WINDOW_SECONDS)
        if process.cpuSeconds() - before < IDLE_SHARE * IDLE_WINDOW_SECONDS:
            break
    return time.monotonic() - started
