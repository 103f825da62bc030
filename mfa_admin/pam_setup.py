"""`mfa-admin pam install|uninstall`: put mfaguard into a PAM stack, and take it out again.

The mfaguard lines go right after the stack's password step (Debian's
``@include common-auth``) and its account step (``@include common-account``), with
control ``required``. For sshd, two more lines go right in front of the password: the
publickey check and the code line it leads to, so that a login that already used a key is
asked for the code and not for the password (see pam_module/publickey_check.py and
config/pam.d/sshd). The original file is kept as ``FILE.mfaguard-orig`` and ``uninstall``
puts it back.
"""

from __future__ import annotations

import difflib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pam_module
from devicedb.errors import InvalidInput, LockoutGuardError
from devicedb.models import Requirement

SERVICES = ("sshd", "sudo", "sudo-i", "login", "su")
# Services whose logins can skip the auth phase for a reason the administrator chose (sudo's
# credential cache and NOPASSWD rules, su by root): they get the auth line only. sshd and
# login get the account line too, which refuses a login whose auth phase skipped the code.
ACCOUNT_LINE = ("sshd", "login")
# sshd: the password step is skipped after a key, never the code.
PUBLICKEY_CHECK = ("sshd",)
BACKUP_SUFFIX = ".mfaguard-orig"
MARKER = "# added by mfa-admin pam install"
PAM_PYTHON = "/lib/security/pam_python.so"


def entry_file() -> str:
    return str(Path(pam_module.__file__).resolve().parent / "pam_mfaguard.py")


def module_args(config: str | None) -> str:
    args = [entry_file()]
    if config:
        args.append(f"config={os.path.abspath(config)}")
    args.append(f"venv={sys.prefix}")
    return " ".join(args)


def mfaguard_lines(config: str | None) -> tuple[str, str]:
    args = module_args(config)
    return (f"auth     required  {PAM_PYTHON} {args}", f"account  required  {PAM_PYTHON} {args}")


# The only controls the publickey check and the code line right after it may have (doctor checks them).
CHECK_CONTROL = "[success=ignore default=1]"
AFTER_KEY_CONTROL = "[success=done ignore=ignore default=die]"


def publickey_check_lines(config: str | None) -> tuple[str, str]:
    """The check line, and the code line it leads to when sshd reports a key (which ends the stack)."""
    return (
        f"auth     {CHECK_CONTROL}  {PAM_PYTHON} {entry_file()} check=publickey-used venv={sys.prefix}",
        f"auth     {AFTER_KEY_CONTROL}  {PAM_PYTHON} {module_args(config)}",
    )


def is_mfaguard_line(line: str) -> bool:
    return "pam_python.so" in line and "pam_mfaguard.py" in line and not line.lstrip().startswith("#")


def _insert_after(lines: list[str], kind: str, include: str, new: str) -> list[str]:
    """After ``@include <include>``, else after the last line of that kind, else at the end."""
    anchor = None
    for i, line in enumerate(lines):
        words = line.split()
        if words[:2] == ["@include", include]:
            anchor = i
    if anchor is None:
        for i, line in enumerate(lines):
            words = line.split()
            if words and words[0].lstrip("-") == kind:
                anchor = i
    position = len(lines) if anchor is None else anchor + 1
    return [*lines[:position], MARKER, new, *lines[position:]]


def _insert_publickey_check(lines: list[str], config: str | None) -> list[str]:
    """In front of ``@include common-auth``: the check, then the code line for a key login.
    Without that line there is no password step to leave out, and the stack is left as it is."""
    anchor = next((i for i, line in enumerate(lines) if line.split()[:2] == ["@include", "common-auth"]), None)
    if anchor is None:
        return lines
    return [*lines[:anchor], MARKER, *publickey_check_lines(config), *lines[anchor:]]


def planned_stack(original: str, config: str | None, *, account: bool = True, publickey_check: bool = False) -> str:
    lines = original.splitlines()
    if any(is_mfaguard_line(line) for line in lines):
        raise InvalidInput("mfaguard is already in this stack; run `mfa-admin pam uninstall` first to redo it")
    auth_line, account_line = mfaguard_lines(config)
    if publickey_check:
        lines = _insert_publickey_check(lines, config)
    lines = _insert_after(lines, "auth", "common-auth", auth_line)
    if account:
        lines = _insert_after(lines, "account", "common-account", account_line)
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Plan:
    path: Path
    before: str
    after: str

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.before.splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                fromfile=str(self.path),
                tofile=f"{self.path} (with mfaguard)",
            )
        )


def plan_install(service: str, pam_dir: str, config: str | None) -> Plan:
    if service not in SERVICES:
        raise InvalidInput(f"--service {service!r}: use one of {', '.join(SERVICES)}")
    path = Path(pam_dir) / service
    if path.is_symlink() or not path.is_file():
        raise InvalidInput(f"{path} does not exist or is not a regular file; is the {service} package installed?")
    before = path.read_text()
    after = planned_stack(before, config, account=service in ACCOUNT_LINE, publickey_check=service in PUBLICKEY_CHECK)
    return Plan(path, before, after)


def guard_root(status_requirement: Requirement, root_active_devices: int) -> None:
    """The lock-out guard: never make a stack demand a code root cannot give."""
    if status_requirement is Requirement.REQUIRED and root_active_devices == 0:
        raise LockoutGuardError(
            "root has no active device: installing mfaguard now would lock root out. "
            "Run `mfa-admin enroll totp root` first"
        )


def install(plan: Plan) -> Path:
    backup = plan.path.with_name(plan.path.name + BACKUP_SUFFIX)
    if not backup.exists():
        _write_atomically(backup, plan.before, os.stat(plan.path).st_mode & 0o777)
    _write_atomically(plan.path, plan.after, os.stat(plan.path).st_mode & 0o777)
    return backup


def uninstall(service: str, pam_dir: str) -> str:
    """Take mfaguard's lines out of the stack as it is now, keeping every other edit made since."""
    if service not in SERVICES:
        raise InvalidInput(f"--service {service!r}: use one of {', '.join(SERVICES)}")
    path = Path(pam_dir) / service
    if path.is_symlink() or not path.is_file():
        raise InvalidInput(f"{path} does not exist or is not a regular file")
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not is_mfaguard_line(line) and line != MARKER]
    if kept == lines:
        return f"{path} holds no mfaguard line; nothing to do"
    _write_atomically(path, "\n".join(kept) + "\n", os.stat(path).st_mode & 0o777)
    if backup.is_file() and not backup.is_symlink() and backup.read_text().splitlines() == kept:
        backup.unlink()
        return f"removed the mfaguard lines from {path}; it is the original again"
    note = f"; the copy from before install is still in {backup}" if backup.exists() else ""
    return f"removed the mfaguard lines from {path}, keeping the edits made since install{note}"
