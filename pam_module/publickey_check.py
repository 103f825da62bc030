"""`check=publickey-used`: the mfaguard PAM line that tells sshd's auth stack whether this
connection has already passed the publickey method, so that the stack can leave out the
password (and never the code).

    auth  [success=ignore default=1]  pam_python.so /PATH/pam_mfaguard.py check=publickey-used venv=V
    auth  [success=done ignore=ignore default=die]  pam_python.so /PATH/pam_mfaguard.py config=C venv=V
    @include common-auth
    auth  required  pam_python.so /PATH/pam_mfaguard.py config=C venv=V

This is the only supported shape, and `mfa-admin doctor` fails any other. The check verifies
nothing and grants nothing: it answers PAM_SUCCESS only when it runs inside sshd and sshd's
``SSH_AUTH_INFO_0`` (in the PAM environment, put there by sshd just before it runs PAM for
keyboard-interactive) holds a well-formed line for a completed ``publickey`` method. Then, and
only then, the stack goes on to the next line, which asks for the code and ends the stack
either way. Every other answer (no variable, an empty or unclear one, another program than
sshd, a bad option, an error) is PAM_IGNORE, which jumps over that line into the password and
then the code. PAM_IGNORE is the closed direction here: it never skips anything.

A success of this line counts for nothing in the stack's result (``success=ignore``).

Why not ``[success=1 default=ignore]`` in front of ``auth substack common-auth``: a ``requisite``
or ``die`` inside a substack ends only the substack, so after a wrong password the parent stack
would still ask for the code (and count a wrong one against the lockout), letting anybody who
does not know the password reach the code prompt and lock the account. With ``@include``, a
wrong password ends the whole stack before the code.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from typing import Any

CHECK = "publickey-used"
ENV = "SSH_AUTH_INFO_0"
# The programs that run PAM for sshd: sshd itself, and sshd-session from OpenSSH 9.8 on.
SSHD_PROGRAMS = frozenset({"sshd", "sshd-session"})
MAX_AUTH_INFO = 64 * 1024
FALLBACK_LOG = "/var/log/mfaguard/mfaguard.log"  # where errors go without log= (the entry file's fallback too)
# One line per completed method: "method[/submethod][ details]", details printable; sshd's method names.
_METHOD = re.compile(
    r"(publickey|password|keyboard-interactive|hostbased|gssapi-with-mic|gssapi-keyex)(/[a-z0-9-]+)?\Z"
)
_KEY_TYPE = re.compile(r"[a-z0-9][a-z0-9@.-]*\Z")

log = logging.getLogger("mfaguard.publickey_check")
log.propagate = False  # its own handler only: the code line's logger may write to the same file
_log_ready: set[str] = set()


class CheckOptionError(ValueError):
    pass


def parse_options(args: list[str]) -> str | None:
    """The log= path of a check line, or None. Only check=publickey-used, venv= and log= are allowed."""
    seen: set[str] = set()
    log_path = None
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or name in seen:
            raise CheckOptionError(f"PAM option {arg!r}: give each of check=, venv=, log= once, as name=value")
        seen.add(name)
        if name == "check":
            if value != CHECK:
                raise CheckOptionError(f"PAM option check={value!r}: the only check is check={CHECK}")
        elif name == "log":
            if not value.startswith("/"):
                raise CheckOptionError(f"PAM option log={value!r}: an absolute path is needed")
            log_path = value
        elif name != "venv":  # venv= is read by the entry file
            raise CheckOptionError(f"PAM option {name}= is not for a check line; allowed: check=, venv=, log=")
    if "check" not in seen:
        raise CheckOptionError(f"a check line needs check={CHECK}")
    return log_path


def running_program() -> str:
    """The name of the program this PAM module runs in ('' if unknown)."""
    try:
        return os.path.basename(os.path.realpath("/proc/self/exe"))
    except OSError:
        return ""


def _ssh_string(data: bytes) -> bytes | None:
    if len(data) < 4:
        return None
    size = int.from_bytes(data[:4], "big")
    return data[4 : 4 + size] if 4 + size <= len(data) else None


def _publickey_line(words: list[str]) -> bool:
    """``publickey TYPE BASE64 [certificate details]`` with a key blob that names TYPE."""
    if len(words) < 3 or not _KEY_TYPE.match(words[1]):
        return False
    try:
        blob = base64.b64decode(words[2], validate=True)
    except (binascii.Error, ValueError):
        return False
    name = _ssh_string(blob)
    return name is not None and name == words[1].encode()


def publickey_completed(auth_info: object) -> bool:
    """Whether sshd's SSH_AUTH_INFO_0 shows a completed publickey method. Anything unclear is False.

    sshd writes one line, ending in a newline, per method that succeeded in this connection (an
    empty value when none has), and only for methods that succeeded."""
    if not isinstance(auth_info, str) or not auth_info or len(auth_info) > MAX_AUTH_INFO:
        return False
    if not auth_info.endswith("\n"):
        return False
    found = False
    for line in auth_info[:-1].split("\n"):
        if not line or not line.isprintable() or line.startswith(" "):
            return False
        words = line.split(" ")
        if not _METHOD.match(words[0]):
            return False
        if words[0] == "publickey":
            if not _publickey_line(words):
                return False
            found = True
    return found


def _setup_log(path: str | None) -> None:
    if not path or _log_ready:
        return  # one log file per process
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
        handler.setFormatter(logging.Formatter(f"%(asctime)s mfaguard pam[{os.getpid()}]: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        _log_ready.add(path)
    except OSError:
        pass  # the check decides nothing that needs recording


def _env(pamh: Any) -> object:
    try:
        return pamh.env.get(ENV)
    except Exception:
        return None


def authenticate(pamh: Any, flags: int, argv: list[str]) -> int:
    """PAM_SUCCESS only when sshd reports a completed publickey method; PAM_IGNORE otherwise."""
    try:
        log_path = parse_options(list(argv[1:]))
    except CheckOptionError as exc:
        _log_error(argv, f"{exc}; the password is asked")
        return int(pamh.PAM_IGNORE)
    _setup_log(log_path)
    try:
        service = str(getattr(pamh, "service", "") or "pam")
        program = running_program()
        if program not in SSHD_PROGRAMS:
            log.info("%s: publickey check: not running in sshd (%r); the password is asked", service, program)
            return int(pamh.PAM_IGNORE)
        if publickey_completed(_env(pamh)):
            log.info("%s: publickey check: a key was used; the password is not asked, the code is", service)
            return int(pamh.PAM_SUCCESS)
        log.info("%s: publickey check: no publickey method in %s; the password is asked", service, ENV)
        return int(pamh.PAM_IGNORE)
    except Exception as exc:
        _log_error(argv, f"publickey check failed ({type(exc).__name__}); the password is asked")
        return int(pamh.PAM_IGNORE)


def setcred(pamh: Any, flags: int, argv: list[str]) -> int:
    # Grants nothing, and lets the password stack's setcred run as it did before this line existed.
    return int(pamh.PAM_IGNORE)


def acct_mgmt(pamh: Any, flags: int, argv: list[str]) -> int:
    # The check belongs in the auth stack only: anywhere else it is a configuration error.
    _log_error(argv, f"check={CHECK} is on an account line; it works only in the auth stack")
    return int(pamh.PAM_PERM_DENIED)


def _log_error(argv: list[str], text: str) -> None:
    path = next((a[4:] for a in argv[1:] if a.startswith("log=") and a[4:].startswith("/")), None)
    _setup_log(path or FALLBACK_LOG)
    log.warning("%s", text)
