"""Checks that the files the core trusts cannot be swapped or edited by others.

A file or folder is trusted when it is not a symlink, is owned by root (or by
the user running the process: such a process can already write its own
files, as OpenSSH also reasons), and is not writable by group or others.
"""

from __future__ import annotations

import os
import stat
from typing import TextIO

from devicedb.errors import UnsafePathError


def trusted_owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def describe_mode(mode: int) -> str:
    return oct(stat.S_IMODE(mode))


def check_not_writable_by_others(path: str, st: os.stat_result, what: str) -> None:
    if st.st_uid not in trusted_owners():
        raise UnsafePathError(
            f"{what} {path} is owned by uid {st.st_uid}; it must be owned by root. Fix: chown root:root {path}"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            # /tmp and the like: shared on purpose, so the fix is to move, not to chmod.
            raise UnsafePathError(
                f"{what} {path} is a shared folder (mode {describe_mode(st.st_mode)}) that anybody can write to; "
                "keep mfaguard's files in a root-owned folder such as /var/lib/mfaguard or /etc/mfaguard"
            )
        raise UnsafePathError(
            f"{what} {path} has mode {describe_mode(st.st_mode)}, writable by group or others; fix: chmod go-w {path}"
        )


def lstat_no_symlink(path: str, what: str) -> os.stat_result:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnsafePathError(f"{what} {path} cannot be examined: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{what} {path} is a symlink; symlinks are refused. Point the setting at the real file.")
    return st


def check_folder(path: str, what: str) -> None:
    """A folder holding trusted files: a real directory, trusted owner, not group/world-writable."""
    st = lstat_no_symlink(path, what)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{what} {path} is not a directory")
    check_not_writable_by_others(path, st, what)


def check_file(path: str, what: str, *, secret: bool = False) -> os.stat_result:
    """Check a trusted regular file and its folder. Raises FileNotFoundError if it is absent.

    With ``secret`` the file must not be readable by group or others either.
    """
    check_folder(os.path.dirname(os.path.abspath(path)) or "/", f"folder of the {what}")
    st = lstat_no_symlink(path, what)
    _check_regular(path, st, what, secret)
    return st


def check_open_file(fd: int, path: str, what: str, *, secret: bool = False) -> None:
    """Re-check an opened file through its descriptor, closing the lstat/open race."""
    _check_regular(path, os.fstat(fd), what, secret)


def _check_regular(path: str, st: os.stat_result, what: str, secret: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{what} {path} is not a regular file")
    check_not_writable_by_others(path, st, what)
    if secret and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UnsafePathError(
            f"{what} {path} has mode {describe_mode(st.st_mode)}, readable by group or others; fix: chmod 600 {path}"
        )


def read_trusted_file(path: str, what: str, *, secret: bool = False, limit: int = 1 << 20) -> bytes:
    """Read a trusted file without following a symlink at its last component."""
    check_file(path, what, secret=secret)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        check_open_file(fd, path, what, secret=secret)
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise UnsafePathError(f"{what} {path} is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def make_private_dir(path: str, what: str, mode: int = 0o700) -> None:
    """Create a folder (and parents) if absent; check it either way."""
    if not os.path.lexists(path):
        os.makedirs(path, mode=mode, exist_ok=True)
        os.chmod(path, mode)
    check_folder(path, what)


def open_private_log(path: str) -> TextIO:
    """A log file for appending: its folder made 0700 if missing, the file created 0600, and never
    opened through a symlink (the PAM module and mfa-radiusd run as root and share it)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8")
