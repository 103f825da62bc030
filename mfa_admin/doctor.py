"""`mfa-admin doctor`: check a host's mfaguard set-up and explain every finding with its fix."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devicedb.errors import MfaguardError
from devicedb.settings import Settings
from devicedb.store import Store
from mfa_admin.pam_setup import ACCOUNT_LINE, SERVICES, is_mfaguard_line

# Controls under which a failing mfaguard line fails the stack.
_BINDING = {"required", "requisite"}


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn" or "fail"
    topic: str
    text: str
    fix: str = ""


def _split(line: str) -> tuple[str, str, list[str]]:
    """(type, control, rest) of a PAM line; a bracketed control stays one word."""
    kind, _, rest = line.partition(" ")
    kind = kind.lower()  # Linux-PAM reads types and controls without regard to case
    rest = rest.strip()
    if rest.startswith("["):
        close = rest.find("]")
        control, rest = (rest, "") if close < 0 else (rest[: close + 1], rest[close + 1 :])
    else:
        control, _, rest = rest.partition(" ")
    return kind.lstrip("-"), control.lower(), rest.split()


def _expand(path: Path, pam_dir: Path, depth: int = 0) -> list[tuple[str, str]]:
    """The stack's lines as (file, line), with @include, include and substack expanded in place."""
    out: list[tuple[str, str]] = []
    if depth > 8 or not path.is_file():
        return out
    for raw in path.read_text(errors="replace").replace("\\\n", " ").splitlines():
        line = " ".join(raw.split("#", 1)[0].split())
        if not line:
            continue
        words = line.split()
        if words[0].lower() == "@include" and len(words) > 1:
            out += _expand(pam_dir / words[1], pam_dir, depth + 1)
            continue
        kind, control, rest = _split(line)
        if control in ("include", "substack") and rest:
            out += [(f, ln) for f, ln in _expand(pam_dir / rest[0], pam_dir, depth + 1) if _split(ln)[0] == kind]
        else:
            out.append((path.name, line))
    return out


def _can_skip(index: int, line: str, target: int) -> bool:
    """Whether this line, at ``index``, can end the stack or jump past the line at ``target``."""
    _, control, rest = _split(line)
    module = rest[0] if rest else ""
    if control == "sufficient":
        return not module.endswith("pam_rootok.so")  # only root itself passes pam_rootok
    if control.startswith("["):
        actions = dict(pair.partition("=")[::2] for pair in control.strip("[]").split())
        # What the module does when it succeeds: its success action, else its default one.
        action = actions.get("success", actions.get("default", ""))
        if action == "done":
            return True
        if action.isdigit() and index + int(action) >= target:
            return True
    return False


def _check_line(line: str, file: str, topic: str) -> list[Finding]:
    """Can this mfaguard line ever work: entry file, venv and settings file all there and sound?"""
    from devicedb.errors import ConfigError, UnsafePathError
    from devicedb.settings import load_settings
    from pam_module.pam_mfaguard import code_tree_problems

    _, _, rest = _split(line)
    entry = rest[1] if len(rest) > 1 else ""
    options = dict(arg.partition("=")[::2] for arg in rest[2:] if "=" in arg)
    findings = []
    venv = options.get("venv") or str(Path(entry).parent.parent / ".venv")
    if not Path(entry).is_file():
        findings.append(
            Finding(
                "fail",
                topic,
                f"{file}: the entry file {entry} does not exist: every login fails",
                "run `mfa-admin pam uninstall` then `pam install` from the installed copy",
            )
        )
    elif not Path(venv).is_dir():
        findings.append(
            Finding(
                "fail",
                topic,
                f"{file}: the venv {venv} does not exist: every login fails",
                "point venv= at the venv mfaguard is installed in",
            )
        )
    else:
        for problem in code_tree_problems(entry, venv):
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"{file}: code run as root can be changed by others: {problem}",
                    "chown -R root: and chmod -R go-w the mfaguard folder and its venv",
                )
            )
        if any(p.startswith(("/tmp/", "/var/tmp/")) for p in (entry, venv)):  # noqa: S108 - a warning about it
            findings.append(
                Finding(
                    "warn",
                    topic,
                    f"{file}: mfaguard runs from under /tmp, which is cleaned out",
                    "install it in /opt/mfaguard",
                )
            )
    try:
        load_settings(options.get("config"), require_file=True, environ={})
    except (ConfigError, UnsafePathError) as exc:
        findings.append(
            Finding(
                "fail",
                topic,
                f"{file}: the PAM line's settings do not load, so every login fails: {exc}",
                "fix the settings file, or the config= option",
            )
        )
    return findings


def check_stack(service: str, pam_dir: Path, *, account_required: bool) -> list[Finding]:
    path = pam_dir / service
    topic = f"PAM {service}"
    if not path.is_file():
        return [Finding("ok", topic, f"{path} does not exist (the {service} program is not installed)")]
    lines = _expand(path, pam_dir)
    findings = []
    for kind in ("auth", "account"):
        ours = [(i, f, line) for i, (f, line) in enumerate(lines) if _split(line)[0] == kind and is_mfaguard_line(line)]
        if not ours:
            if kind == "account" and not account_required:
                continue  # sudo's credential cache and NOPASSWD rules are the administrator's choice
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"no mfaguard {kind} line: {service} logins skip the second factor",
                    f"mfa-admin pam install --service {service}",
                )
            )
            continue
        index, file, line = ours[0]
        control = _split(line)[1]
        if control not in _BINDING:
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"mfaguard's {kind} line in {file} has control {control!r}, so a failure does not fail the login",
                    f"make it `{kind} required ...`",
                )
            )
            continue
        bypass = [
            (f, other)
            for i, (f, other) in enumerate(lines[:index])
            if _split(other)[0] == kind and _can_skip(i, other, index)
        ]
        if kind == "auth":
            for f, other in lines[:index]:
                kind_other, _, rest = _split(other)
                if kind_other == "auth" and rest and rest[0].endswith("pam_env.so") and "user_readenv=1" in rest:
                    findings.append(
                        Finding(
                            "fail",
                            topic,
                            f"`{other}` in {f} lets users set PAM environment variables before "
                            "mfaguard reads SSH_AUTH_INFO_0 (which names the security key of an SSH login)",
                            "drop user_readenv=1 from auth lines, or move pam_env to the session stack",
                        )
                    )
        for f, other in bypass:
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"`{other}` in {f} comes before mfaguard and can end the {kind} stack or "
                    "jump past mfaguard, skipping the code",
                    "move mfaguard's line above it, or drop it",
                )
            )
        findings += _check_line(line, file, topic)
        if not bypass:
            findings.append(Finding("ok", topic, f"mfaguard {kind} line is required ({file})"))
    return findings


def check_sshd(sshd: str = "/usr/sbin/sshd") -> list[Finding]:
    topic = "sshd"
    if not Path(sshd).exists():
        return [Finding("ok", topic, "sshd is not installed")]
    try:
        r = subprocess.run([sshd, "-T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Finding("warn", topic, f"`sshd -T` did not run: {exc}", "run it by hand and read its error")]
    if r.returncode != 0:
        error = r.stderr.strip()[:200]
        fix = (
            "mkdir -p /run/sshd, then run doctor again"
            if "privilege separation directory" in error
            else ("fix the sshd_config line `sshd -T` names")
        )
        return [Finding("warn", topic, f"`sshd -T` failed: {error}", fix)]
    conf: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition(" ")
        conf.setdefault(key.lower(), value.strip())
    findings = []
    if conf.get("usepam") != "yes":
        findings.append(
            Finding(
                "fail",
                topic,
                "UsePAM is off: sshd never runs the mfaguard PAM stack",
                "set `UsePAM yes` (see config/sshd_config.d/mfaguard.conf)",
            )
        )
    if conf.get("kbdinteractiveauthentication") != "yes":
        findings.append(
            Finding(
                "fail",
                topic,
                "KbdInteractiveAuthentication is off: the code prompt cannot be shown",
                "set `KbdInteractiveAuthentication yes`",
            )
        )
    methods = conf.get("authenticationmethods", "any")
    sets = [m.split(",") for m in methods.split()] if methods != "any" else []
    if methods == "any":
        if conf.get("pubkeyauthentication") == "yes":
            findings.append(
                Finding(
                    "warn",
                    topic,
                    "AuthenticationMethods is `any`: a publickey-only login skips "
                    "the code prompt, and only mfaguard's account line stops it",
                    "set `AuthenticationMethods publickey,keyboard-interactive keyboard-interactive`",
                )
            )
    else:
        bare = [",".join(s) for s in sets if not any(m.startswith("keyboard-interactive") for m in s)]
        if bare:
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"AuthenticationMethods allows {' '.join(bare)} without "
                    "keyboard-interactive: those logins never reach the code prompt",
                    "add keyboard-interactive to every method list",
                )
            )
    if conf.get("passwordauthentication") == "yes":
        findings.append(
            Finding(
                "warn",
                topic,
                "PasswordAuthentication is on: sshd answers every PAM prompt with the "
                "password, so the code prompt fails and counts as a failure",
                "set `PasswordAuthentication no`; passwords still work through keyboard-interactive",
            )
        )
    if not findings:
        findings.append(Finding("ok", topic, f"UsePAM and keyboard-interactive on; AuthenticationMethods {methods}"))
    return findings


def check_store(settings: Settings) -> tuple[list[Finding], Store | None]:
    try:
        store = Store.open(settings)
    except MfaguardError as exc:
        return [Finding("fail", "database", str(exc), "run `mfa-admin init`, or fix the owner and mode named")], None
    return [
        Finding(
            "ok",
            "database",
            f"{settings.database.path} and {settings.database.key_file}: owner and modes are safe, schema current",
        )
    ], store


def check_coverage(store: Store) -> list[Finding]:
    from mfa_admin.report import coverage

    result = coverage(store)
    findings = []
    for acct in result["accounts"]:
        if acct.get("weak_devices"):
            findings.append(
                Finding(
                    "warn",
                    "weak secrets",
                    f"{acct['user']}: device(s) {acct['weak_devices']} have a secret "
                    "under 128 bits (kept from a migration or a vendor file)",
                    f"enroll a new device for {acct['user']} and remove the weak one",
                )
            )
        if acct["status"] in ("covered", "exempt"):
            continue
        fix = f"mfa-admin enroll totp {acct['user']}"
        findings.append(
            Finding("fail", "coverage", f"{acct['user']} (uid {acct['uid']}) has no active device: {acct['note']}", fix)
        )
    if not findings:
        findings.append(
            Finding(
                "ok", "coverage", f"all {result['total']} login-capable accounts have an active device or are exempt"
            )
        )
    return findings


def run(settings: Settings, pam_dir: str = "/etc/pam.d") -> list[Finding]:
    findings: list[Finding] = []
    if not Path("/lib/security/pam_python.so").exists():
        findings.append(
            Finding("fail", "pam_python", "/lib/security/pam_python.so is missing", "apt-get install libpam-python")
        )
    for service in (*SERVICES, "su-l"):
        findings += check_stack(service, Path(pam_dir), account_required=service in ACCOUNT_LINE)
    other = check_stack("other", Path(pam_dir), account_required=False)
    if any(f.level == "fail" for f in other):
        findings.append(
            Finding(
                "warn",
                "PAM other",
                "the fallback stack `other` has no mfaguard auth line: a "
                "service without its own PAM file authenticates with the password alone",
                "add the mfaguard auth line to /etc/pam.d/other as well",
            )
        )
    if shutil.which("sshd") or Path("/usr/sbin/sshd").exists():
        findings += check_sshd()
    store_findings, store = check_store(settings)
    findings += store_findings
    if store is not None:
        try:
            findings += check_coverage(store)
        finally:
            store.close()
    return findings
