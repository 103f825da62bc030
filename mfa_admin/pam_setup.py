"""`mfa-admin pam install|uninstall`: put mfaguard into a PAM stack, and take it out again.

The mfaguard lines go right after the stack's password step and its account step
(``@include common-account``), with control ``required``. The password step is Debian's
``@include common-auth``, or ``auth include FILE`` / ``auth substack FILE`` / ``@include FILE``
where FILE runs a password module (pam_unix and the like), or such a module written out in the
file itself. A stack with no password step is refused: the code alone would log in. For sshd,
two more lines go right in front of the password: the publickey check and the code line it leads
to, so that a login that already used a key is asked for the code and not for the password (see
pam_module/publickey_check.py and config/pam.d/sshd). That shape needs the password as
``@include common-auth`` or ``auth include common-auth``; any other sshd stack is refused with
what to change. The original file is kept as ``FILE.mfaguard-orig`` and ``uninstall`` puts it
back.
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

SERVICES = ("sshd", "sudo", "sudo-i", "login", "su", "su-l", "other")
# Services whose logins can skip the auth phase for a reason the administrator chose (sudo's
# credential cache and NOPASSWD rules, su by root): they get the auth line only. sshd and
# login get the account line too, which refuses a login whose auth phase skipped the code.
# `other` is the fallback for programs without a PAM file of their own: the auth line only.
ACCOUNT_LINE = ("sshd", "login")
# Where the operator running `pam install` under sudo would lock themselves out without a device.
OPERATOR_SERVICES = ("sudo", "sudo-i", "su", "su-l")
# Modules that check a password (the first factor): install puts the code line after them, and
# doctor fails a login stack whose code line has none before it.
PASSWORD_MODULES = (
    "pam_unix.so",
    "pam_unix2.so",
    "pam_sss.so",
    "pam_ldap.so",
    "pam_krb5.so",
    "pam_winbind.so",
    "pam_userdb.so",
    "pam_pwdb.so",
    "pam_tacplus.so",
    "pam_radius_auth.so",
)
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


def split_line(line: str) -> tuple[str, str, list[str]]:
    """(type, control, rest) of a PAM line as Linux-PAM reads it: type and control without regard to
    case, a leading `-` dropped, a bracketed control one word."""
    kind, _, rest = line.partition(" ")
    kind = kind.lower()
    rest = rest.strip()
    if rest.startswith("["):
        close = rest.find("]")
        control, rest = (rest, "") if close < 0 else (rest[: close + 1], rest[close + 1 :])
    else:
        control, _, rest = rest.partition(" ")
    return kind.lstrip("-"), control.lower(), rest.split()


def pam_lines(text: str) -> list[tuple[int, int, str]]:
    """(first index, last index in text.splitlines(), line) of each PAM line, read as Linux-PAM reads
    it (_pam_assemble_line): each physical line loses everything from its first ``#`` and its trailing
    white space first, and only then does a final backslash join it to the next line. So a comment
    ending in a backslash joins nothing, and a backslash followed by spaces still joins."""
    raw = text.splitlines()
    out: list[tuple[int, int, str]] = []
    i = 0
    while i < len(raw):
        start, pieces = i, []
        while True:
            piece = raw[i].split("#", 1)[0].rstrip()
            if piece.endswith("\\") and i + 1 < len(raw):
                pieces.append(piece[:-1])
                i += 1
                continue
            pieces.append(piece)
            break
        line = " ".join(" ".join(pieces).split())
        if line:
            out.append((start, i, line))
        i += 1
    return out


def is_password_module(module: str) -> bool:
    return os.path.basename(module) in PASSWORD_MODULES


def included_file(line: str, kind: str = "auth") -> tuple[str, str] | None:
    """(how, file) when the line pulls in another file's ``kind`` lines: ``@include``, ``include``
    or ``substack``; else None."""
    words = line.split()
    if words[0].lower() == "@include" and len(words) > 1:
        return "@include", words[1]
    line_kind, control, rest = split_line(line)
    if line_kind == kind and control in ("include", "substack") and rest:
        return control, rest[0]
    return None


def auth_modules(path: Path, pam_dir: Path, depth: int = 0) -> list[tuple[str, str]]:
    """(file name, line) of every auth module line the file runs, includes and substacks followed."""
    if depth > 8 or path.is_symlink() or not path.is_file():
        return []
    out: list[tuple[str, str]] = []
    for _, _, line in pam_lines(path.read_text(errors="replace")):
        included = included_file(line)
        if included is not None:
            out += auth_modules(pam_dir / included[1], pam_dir, depth + 1)
        elif split_line(line)[0] == "auth":
            out.append((path.name, line))
    return out


def runs_password(path: Path, pam_dir: Path) -> bool:
    return any(is_password_module((split_line(line)[2] or [""])[0]) for _, line in auth_modules(path, pam_dir))


# The file the sshd shape (the publickey check in front of the password) includes as its password step.
COMMON_AUTH = "common-auth"


@dataclass(frozen=True)
class PasswordStep:
    first: int  # index (in the file's lines) of its first line: the sshd check lines go in front
    last: int  # index of its last line: the code line goes after it
    text: str  # the line, as the administrator wrote it
    how: str  # "@include", "include", "substack" or "module" (written out in the file)
    file: str | None  # the included file, or None for a written-out module


def find_password_step(path: Path, text: str, pam_dir: Path) -> PasswordStep | None:
    """Where the stack asks for the password: the last line that includes a file running a password
    module, else the password modules written out in the file (up to its last auth line, since a
    written-out step such as Debian's common-auth jumps over the lines that follow it)."""
    lines = pam_lines(text)
    step = None
    for first, last, line in lines:
        included = included_file(line)
        if included is not None and runs_password(pam_dir / included[1], pam_dir):
            step = PasswordStep(first, last, line, included[0], included[1])
    if step is not None:
        return step
    modules = [x for x in lines if split_line(x[2])[0] == "auth" and included_file(x[2]) is None]
    written = [x for x in modules if is_password_module((split_line(x[2])[2] or [""])[0])]
    if not written:
        return None
    return PasswordStep(written[0][0], modules[-1][1], written[0][2], "module", None)


def _account_anchor(lines: list[str]) -> int | None:
    """After ``@include common-account``, else after the last account line."""
    anchor = None
    for _, last, line in pam_lines("\n".join(lines)):
        if line.split()[:2] == ["@include", "common-account"]:
            anchor = last
    if anchor is None:
        for _, last, line in pam_lines("\n".join(lines)):
            if split_line(line)[0] == "account":
                anchor = last
    return anchor


NO_FIRST_FACTOR = (
    "{path} has no password step: no `@include common-auth`, no `auth include FILE`, `auth substack FILE` "
    "or `@include FILE` whose FILE runs a password module, and no password module ({modules}) in the "
    "file itself. mfaguard's code line goes right after the password; without one the code alone "
    "would log in (one factor). Add the password step (Debian's is `@include common-auth`) to the auth "
    "lines of {path} and run this again; nothing was changed"
)


def _sshd_refusal(path: Path, step: PasswordStep | None) -> str | None:
    """Why the sshd shape cannot be built around this password step, with what to change; or None."""
    shape = (
        "mfaguard's sshd lines go around `@include common-auth` (see config/pam.d/sshd): the publickey "
        "check and the code line for a key login in front of it, the code line after it"
    )
    if step is None:
        return NO_FIRST_FACTOR.format(path=path, modules=", ".join(PASSWORD_MODULES))
    if step.file == COMMON_AUTH and step.how in ("@include", "include"):
        return None
    if step.how == "substack":
        return (
            f"the password step of {path} is `{step.text}`: a wrong password inside a substack ends only "
            "the substack, so the code would still be asked (and a wrong one counted against the lockout) "
            f"of somebody who never knew the password. {shape}. Write `@include common-auth` in its place "
            "and run this again; nothing was changed"
        )
    return (
        f"the password step of {path} is `{step.text}`, not `@include common-auth`. {shape}. Put the "
        "password lines into common-auth (or make sure common-auth holds the same), write "
        "`@include common-auth` in their place and run this again; nothing was changed"
    )


def planned_stack(
    original: str,
    config: str | None,
    *,
    account: bool = True,
    publickey_check: bool = False,
    path: Path | None = None,
    pam_dir: Path | None = None,
) -> str:
    path = path or Path("/etc/pam.d/unknown")
    pam_dir = pam_dir or path.parent
    lines = original.splitlines()
    if any(is_mfaguard_line(line) for line in lines):
        raise InvalidInput("mfaguard is already in this stack; run `mfa-admin pam uninstall` first to redo it")
    for _, _, line in pam_lines(original):
        included = included_file(line)
        through = [] if included is None else auth_modules(pam_dir / included[1], pam_dir)
        if any(is_mfaguard_line(module) for _, module in through):
            raise InvalidInput(
                f"{path} already runs mfaguard's code line through `{line}`: a second one would ask for the "
                "code twice, and refuse the second answer as a replay; nothing was changed"
            )
    step = find_password_step(path, original, pam_dir)
    if step is not None and step.file in SERVICES and step.file != path.name:
        raise InvalidInput(
            f"{path} takes its password step from the {step.file} stack (`{step.text}`): install mfaguard "
            f"there, which covers both: `mfa-admin pam install --service {step.file}`; nothing was changed"
        )
    if publickey_check:
        refusal = _sshd_refusal(path, step)
        if refusal:
            raise InvalidInput(refusal)
    if step is None:
        raise InvalidInput(NO_FIRST_FACTOR.format(path=path, modules=", ".join(PASSWORD_MODULES)))
    auth_line, account_line = mfaguard_lines(config)
    # Inserted from the bottom up, so that the indices above stay right.
    inserts: list[tuple[int, list[str]]] = [(step.last + 1, [MARKER, auth_line])]
    if publickey_check:
        inserts.append((step.first, [MARKER, *publickey_check_lines(config)]))
    if account:
        anchor = _account_anchor(lines)
        inserts.append((len(lines) if anchor is None else anchor + 1, [MARKER, account_line]))
    for position, new in sorted(inserts, key=lambda x: x[0], reverse=True):
        lines[position:position] = new
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
    after = planned_stack(
        before,
        config,
        account=service in ACCOUNT_LINE,
        publickey_check=service in PUBLICKEY_CHECK,
        path=path,
        pam_dir=Path(pam_dir),
    )
    _refuse_unsound(service, Path(pam_dir), after)
    return Plan(path, before, after)


def _refuse_unsound(service: str, pam_dir: Path, after: str) -> None:
    """Read the planned stack as `mfa-admin doctor` does, in a copy of the PAM folder, and refuse an
    install whose result doctor would fail: the lines around the insertion point (a jump that would
    now land on mfaguard's lines, a pam_rootok, ...) can make a stack that skips a factor."""
    import shutil
    import tempfile

    from mfa_admin import doctor

    with tempfile.TemporaryDirectory(prefix="mfaguard-pam-plan-") as tmp:
        copy = Path(tmp) / "pam.d"
        shutil.copytree(pam_dir, copy, symlinks=True)
        (copy / service).write_text(after)
        findings = doctor.check_stack(service, copy, account_required=service in ACCOUNT_LINE)
    failed = [f.text.replace(str(copy), str(pam_dir)) for f in findings if f.level == "fail"]
    if failed:
        raise InvalidInput(
            f"{pam_dir / service}: with mfaguard added, this stack would still be unsafe, so nothing was changed: "
            + "; ".join(failed)
            + ". Fix the stack (see `mfa-admin doctor`), then run pam install again"
        )


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
