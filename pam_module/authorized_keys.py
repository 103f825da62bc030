"""Reading a user's own authorized_keys files, as root inside sshd, for the security-key check.

sshd reads ``AuthorizedKeysFile`` (default ``.ssh/authorized_keys .ssh/authorized_keys2`` under
the home directory) besides mfaguard's AuthorizedKeysCommand, and applies the options of the
line it matched. The core (``devicedb.kinds.ssh_sk.user_files_weaken``) decides from what this
module hands it; this module only reads, and reads safely: the home directory from passwd, then
``.ssh`` and each file opened relative to it with O_NOFOLLOW (a symlink anywhere below the home is
refused), regular files only, at most MAX_BYTES each, opened without blocking (a FIFO cannot hang
the login). A missing ``.ssh`` or file is fine; anything else that keeps a file from being read
is a ``problem``, and then the key does not count. Other AuthorizedKeysFile paths configured in
sshd_config are not read.
"""

from __future__ import annotations

import os
import pwd
import stat

from devicedb.kinds.ssh_sk import UserKeyFiles

DEFAULT_FILES = ("authorized_keys", "authorized_keys2")  # in ~/.ssh: sshd's default AuthorizedKeysFile
MAX_BYTES = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _read(name: str, folder_fd: int, path: str) -> bytes | str | None:
    """The file's bytes, None when it does not exist, or why it cannot be read safely."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=folder_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: cannot be opened ({_why(exc)}; a symlink is refused)"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file"
        if st.st_size > MAX_BYTES:
            return f"{path} is larger than {MAX_BYTES} bytes"
        chunks = []
        size = 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_BYTES:
            return f"{path} is larger than {MAX_BYTES} bytes"
        return b"".join(chunks)
    except OSError as exc:
        return f"{path}: cannot be read ({_why(exc)})"
    finally:
        os.close(fd)


def user_key_files(user: str) -> UserKeyFiles:
    """The user's ~/.ssh/authorized_keys and ~/.ssh/authorized_keys2, or the problem reading them."""
    try:
        home = pwd.getpwnam(user).pw_dir
    except (KeyError, ValueError):
        return UserKeyFiles(problem=f"{user!r} has no passwd entry, so no home directory to look in")
    if not home.startswith("/"):
        return UserKeyFiles(problem=f"the home directory {home!r} of {user!r} is not an absolute path")
    try:
        home_fd = os.open(home, _DIR_FLAGS)  # the passwd entry's own path, as sshd resolves it
    except FileNotFoundError:
        return UserKeyFiles()
    except OSError as exc:
        return UserKeyFiles(problem=f"{home}: cannot be opened ({_why(exc)})")
    try:
        try:
            ssh_fd = os.open(".ssh", _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=home_fd)
        except FileNotFoundError:
            return UserKeyFiles()
        except OSError as exc:
            return UserKeyFiles(problem=f"{home}/.ssh: cannot be opened ({_why(exc)}; a symlink is refused)")
        try:
            files = []
            for name in DEFAULT_FILES:
                path = os.path.join(home, ".ssh", name)
                data = _read(name, ssh_fd, path)
                if isinstance(data, str):
                    return UserKeyFiles(problem=data)
                if data is not None:
                    files.append((path, data))
            return UserKeyFiles(tuple(files))
        finally:
            os.close(ssh_fd)
    finally:
        os.close(home_fd)
