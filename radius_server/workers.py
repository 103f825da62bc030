"""Several mfa-radiusd processes on one set of sockets (``radius.workers``).

The master binds the sockets once, without SO_REUSEPORT (so a second server on the port still
fails to start), forks the workers and supervises them. Every worker reads the same sockets.
A request belongs to the worker its User-Name hashes to: a worker that reads another's request
hands it over through that worker's pipe, and the owner answers through its own copy of the
socket the request came in on. So a user's Access-Challenge States, the retransmission cache for
that user's requests and the user's verifications all live in one process, whichever worker the
kernel woke, and whatever source port the NAS used.

Pipes, not Unix datagram sockets: a Unix datagram queue holds only net.unix.max_dgram_qlen
packets (10 by default), while a pipe holds 64 KiB and a write of up to PIPE_BUF bytes is atomic
even with several writers.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import select
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("mfa-radiusd")

# One handed-over request: its length, the socket index, the source port, the source host, the datagram.
_HEADER = struct.Struct("!HBHB")
MAX_HANDOVER = select.PIPE_BUF  # larger writes would not be atomic; such rare requests are served where read
MAX_RESTARTS_PER_MINUTE = 5


def owner_of(user_name: bytes, workers: int) -> int:
    """The worker a User-Name belongs to: the same in every process and after every restart."""
    return zlib.crc32(user_name) % workers


def encode_handover(sock_index: int, host: str, port: int, data: bytes) -> bytes | None:
    raw_host = host.encode("ascii", errors="strict")
    size = _HEADER.size + len(raw_host) + len(data)
    if len(raw_host) > 255 or size > MAX_HANDOVER:
        return None
    return _HEADER.pack(size, sock_index, port, len(raw_host)) + raw_host + data


class Inbox:
    """The read end of one worker's pipe: whole handed-over requests out of a byte stream."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = b""

    def read(self) -> Iterator[tuple[int, tuple[str, int], bytes]]:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._pending += chunk
            if len(chunk) < 65536:
                break
        buf, offset = self._pending, 0
        while len(buf) - offset >= _HEADER.size:
            size, sock_index, port, host_len = _HEADER.unpack_from(buf, offset)
            if size < _HEADER.size + host_len or len(buf) - offset < size:
                break
            start = offset + _HEADER.size
            host = buf[start : start + host_len].decode("ascii")
            yield sock_index, (host, port), buf[start + host_len : offset + size]
            offset += size
        self._pending = buf[offset:]


class Router:
    """What a worker needs to hand requests to their owners."""

    def __init__(self, index: int, count: int, pipes: list[int]) -> None:
        self.index = index
        self.count = count
        self._pipes = pipes  # the write end of every worker's pipe

    def owner(self, user_name: bytes) -> int:
        return owner_of(user_name, self.count)

    def hand_over(self, owner: int, sock_index: int, addr: tuple[Any, ...], data: bytes) -> bool | None:
        """True when handed over; False when the owner's pipe is full (the request is dropped, and the
        NAS retransmits); None when it cannot be handed over at all (the caller serves it)."""
        message = encode_handover(sock_index, addr[0], addr[1], data)
        if message is None:
            return None
        try:
            return os.write(self._pipes[owner], message) == len(message)
        except BlockingIOError:
            return False


class WriteGate:
    """Serialises the workers' write transactions with a POSIX record lock on a file they share.

    SQLite's own busy handler sleeps 1, 2, 5, 10 ms ... between tries, which at a group commit's pace
    would add milliseconds to every contended commit; a blocked fcntl lock wakes the moment the holder
    lets go, and the kernel releases it if the holder dies.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)


def _die_with_parent() -> None:
    """A worker whose master is gone (even killed) must not keep the port."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(0)


class Worker:
    """Everything one forked worker gets from the master."""

    def __init__(self, index: int, count: int, inbox_fd: int, pipes: list[int], gate_fd: int) -> None:
        self.index = index
        self.count = count
        self.router = Router(index, count, pipes)
        self.inbox = Inbox(inbox_fd)
        self.gate = WriteGate(gate_fd)


def supervise(
    count: int,
    run_worker: Callable[[Worker], int],
    on_hup: Callable[[], None] | None = None,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Fork ``count`` workers, pass SIGHUP on (after ``on_hup``, the master's own reload), stop them all
    on SIGTERM/SIGINT, restart one that dies (at most MAX_RESTARTS_PER_MINUTE times a minute, then
    stop with exit status 1)."""
    pipes = [os.pipe() for _ in range(count)]
    for read_end, write_end in pipes:
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
    gate_file = tempfile.TemporaryFile()  # noqa: SIM115 - held until the master exits
    children: dict[int, int] = {}
    stopping = False
    exit_code = 0

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                # Ignored until the worker's loop installs its reload handler: the default would kill it.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                _die_with_parent()
                for i, (read_end, _) in enumerate(pipes):
                    if i != index:
                        os.close(read_end)
                worker = Worker(index, count, pipes[index][0], [w for _, w in pipes], gate_file.fileno())
                code = run_worker(worker)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                sys.stdout.flush()
                os._exit(code)
        children[pid] = index
        log.info("started worker %d (pid %d)", index, pid)

    def pass_on(sig: int) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def on_stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        pass_on(signal.SIGTERM)

    def on_sighup(signum: int, frame: Any) -> None:
        if on_hup is not None:
            on_hup()
        pass_on(signal.SIGHUP)

    restarts: collections.deque[float] = collections.deque()
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_sighup)
    try:
        for index in range(count):
            spawn(index)
        if on_started is not None:
            on_started()  # the sockets are bound: requests wait in them until a worker reads
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index = children.pop(pid, -1)
            if index < 0 or stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            now = time.monotonic()
            restarts.append(now)
            while restarts and now - restarts[0] > 60:
                restarts.popleft()
            if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                log.error("worker %d (pid %d) exited (%s); workers keep exiting: stopping", index, pid, code)
                stopping, exit_code = True, 1
                pass_on(signal.SIGTERM)
                continue
            log.error("worker %d (pid %d) exited (%s); starting it again", index, pid, code)
            spawn(index)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        gate_file.close()
    log.info("stopped")
    return exit_code
