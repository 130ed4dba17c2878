"""Start command-line processes in their own session and leave none behind (their whole process tree)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (by PPid), also those that started their own session."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        found.append(stack.pop())
        stack.extend(children.get(found[-1], []))
    return found


def ray_processes(driver: int) -> list[int]:
    """Live processes of the local Ray session started by ``driver`` (session names end in the driver's pid)."""
    pattern = re.compile(rf"session_[0-9_-]+_{driver}\b".encode())
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and pattern.search(Path(f"/proc/{entry}/cmdline").read_bytes()) and alive(int(entry)):
                found.append(int(entry))
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_tree(process: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> None:
    """SIGTERM the process group and every descendant, then SIGKILL what is left after ``grace_s``."""
    pids = descendants(process.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [process.pid, *pids]:
            try:
                os.killpg(pid, sig) if pid == process.pid else os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        if not any(alive(p) for p in pids):
            break
    process.wait(timeout=grace_s)


Start = Callable[..., "subprocess.Popen[bytes]"]  # start(argv, log, *, cwd=REPO, env_extra=None)


@contextmanager
def process_pool(env: dict[str, str]) -> Iterator[Start]:
    """Yield ``start(argv, log, *, cwd, env_extra)`` (own session, output to ``log``, in ``cwd`` with ``env`` plus
    ``env_extra``); on exit stop every tree and check none lives."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], log: Path, *, cwd: Path = REPO, env_extra: dict[str, str] | None = None,
              ) -> subprocess.Popen[bytes]:
        processes.append(subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                          env=env | (env_extra or {}), start_new_session=True, cwd=cwd))
        return processes[-1]

    pids: list[int] = []
    try:
        yield start
    finally:
        for process in reversed(processes):
            pids += descendants(process.pid)
            stop_tree(process)
    assert not [p for p in pids if alive(p)], "processes left behind"
