"""`mfa-admin doctor`: check a host's mfaguard set-up and explain every finding with its fix."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devicedb.errors import MfaguardError
from devicedb.settings import Settings
from devicedb.store import Store
from mfa_admin.pam_setup import SERVICES, is_mfaguard_line

# Controls under which a failing mfaguard line fails the stack.
_BINDING = {"required", "requisite"}


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn" or "fail"
    topic: str
    text: str
    fix: str = ""


def _expand(path: Path, pam_dir: Path, depth: int = 0) -> list[tuple[str, str]]:
    """The stack's lines as (file, line), with @include files expanded in place."""
    out: list[tuple[str, str]] = []
    if depth > 8 or not path.is_file():
        return out
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "@include" and len(words) > 1:
            out += _expand(pam_dir / words[1], pam_dir, depth + 1)
        else:
            out.append((path.name, line))
    return out


def check_stack(service: str, pam_dir: Path) -> list[Finding]:
    path = pam_dir / service
    topic = f"PAM {service}"
    if not path.is_file():
        return [Finding("warn", topic, f"{path} does not exist", f"install {service}, or ignore this finding")]
    lines = _expand(path, pam_dir)
    findings = []
    for kind in ("auth", "account"):
        ours = [
            (i, f, line)
            for i, (f, line) in enumerate(lines)
            if line.split()[0].lstrip("-") == kind and is_mfaguard_line(line)
        ]
        if not ours:
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
        control = line.split()[1]
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
        if kind == "auth":
            bypass = [
                (f, other)
                for f, other in lines[:index]
                if other.split()[0].lstrip("-") == "auth"
                and (other.split()[1] == "sufficient" or "success=done" in other)
            ]
            for f, other in bypass:
                findings.append(
                    Finding(
                        "fail",
                        topic,
                        f"`{other}` in {f} comes before mfaguard and can end the auth stack "
                        "with success, skipping the code",
                        "move mfaguard's line above it, or drop it",
                    )
                )
            if not bypass:
                findings.append(Finding("ok", topic, f"mfaguard auth line is required ({file})"))
        else:
            findings.append(Finding("ok", topic, f"mfaguard account line is required ({file})"))
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
        return [Finding("warn", topic, f"`sshd -T` failed: {r.stderr.strip()[:200]}", "fix sshd_config")]
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
    for service in SERVICES:
        findings += check_stack(service, Path(pam_dir))
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
