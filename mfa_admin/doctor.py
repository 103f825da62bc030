"""`mfa-admin doctor`: check a host's mfaguard set-up and explain every finding with its fix."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devicedb.errors import MfaguardError
from devicedb.settings import DEFAULT_CONFIG_PATH, Settings
from devicedb.store import Store
from mfa_admin.pam_setup import (
    ACCOUNT_LINE,
    AFTER_KEY_CONTROL,
    CHECK_CONTROL,
    PASSWORD_MODULES,
    SERVICES,
    included_file,
    is_mfaguard_line,
    is_password_module,
    pam_lines,
    split_line,
)

# Controls under which a failing mfaguard line fails the stack.
_BINDING = {"required", "requisite"}


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn" or "fail"
    topic: str
    text: str
    fix: str = ""


_split = split_line  # (type, control, rest): Linux-PAM reads types and controls without regard to case


@dataclass(frozen=True)
class Advice:
    """Writes the mfa-admin commands a fix names, so that each one works as printed: with the
    --config and --pam-dir doctor itself was given (when they are not the defaults)."""

    config: str | None = None
    pam_dir: str = "/etc/pam.d"

    def command(self, *args: str) -> str:
        words = ["mfa-admin"]
        if self.config and self.config != DEFAULT_CONFIG_PATH:
            words += ["--config", self.config]
        words += args
        if args[:1] == ("pam",) and self.pam_dir != "/etc/pam.d":
            words += ["--pam-dir", self.pam_dir]
        return "`" + shlex.join(words) + "`"

    def reinstall(self, service: str) -> str:
        return (
            f"{self.command('pam', 'uninstall', '--service', service)} then "
            f"{self.command('pam', 'install', '--service', service)}"
        )


@dataclass(frozen=True)
class _Line:
    """One line of a stack, with @include, include and substack expanded in place."""

    file: str  # the file it is in
    text: str  # comments removed, blanks squeezed
    scope: tuple[int, ...]  # the substacks it runs inside (their ids), outermost first
    origin: tuple[str, ...]  # the include chain inside its scope: its file, the file that included it, ...
    sid: int = -1  # for a substack line: the id its own lines carry in their scope


def _expand(
    path: Path,
    pam_dir: Path,
    depth: int = 0,
    scope: tuple[int, ...] = (),
    origin: tuple[str, ...] = (),
    kind: str | None = None,
    ids: list[int] | None = None,
) -> list[_Line]:
    """The stack's lines with @include and include inlined (Linux-PAM counts their lines one by one)
    and each substack kept as one line followed by its own lines in a scope of their own: a jump in
    the parent counts the whole substack as one module, and a jump or `done` inside a substack
    cannot leave it (pam.conf(5); libpam/pam_dispatch.c)."""
    out: list[_Line] = []
    ids = [0] if ids is None else ids
    if depth > 8 or not path.is_file():
        return out
    here = (*origin, path.name)
    for raw in path.read_text(errors="replace").replace("\\\n", " ").splitlines():
        line = " ".join(raw.split("#", 1)[0].split())
        if not line:
            continue
        words = line.split()
        if words[0].lower() == "@include" and len(words) > 1:
            out += _expand(pam_dir / words[1], pam_dir, depth + 1, scope, here, kind, ids)
            continue
        line_kind, control, rest = _split(line)
        if kind is not None and line_kind != kind:
            continue
        if control == "include" and rest:
            out += _expand(pam_dir / rest[0], pam_dir, depth + 1, scope, here, line_kind, ids)
        elif control == "substack" and rest:
            ids[0] += 1
            sid = ids[0]
            out.append(_Line(path.name, line, scope, here, sid))
            out += _expand(pam_dir / rest[0], pam_dir, depth + 1, (*scope, sid), (), line_kind, ids)
        else:
            out.append(_Line(path.name, line, scope, here))
    return out


def _positions(lines: list[_Line]) -> list[int]:
    """Each line's place among the modules of its own scope (lines of one type only)."""
    counters: dict[tuple[int, ...], int] = {}
    out = []
    for line in lines:
        out.append(counters.get(line.scope, 0))
        counters[line.scope] = out[-1] + 1
    return out


def _actions(control: str) -> dict[str, str]:
    return dict(pair.partition("=")[::2] for pair in control.strip("[]").split()) if control.startswith("[") else {}


# Services whose process has the invoking user's real uid (setuid programs): there pam_rootok passes
# only when root itself runs them. sshd and login run as root for every user, so pam_rootok passes
# for everybody there.
_CALLER_UID_SERVICES = frozenset({"su", "su-l", "sudo", "sudo-i"})


def _can_skip(lines: list[_Line], index: int, target: int, service: str = "") -> bool:
    """Whether the line at ``index`` can end the stack or jump past the line at ``target`` (both in
    ``lines``, one type only, ``index`` before ``target``)."""
    line, goal = lines[index], lines[target]
    depth = len(line.scope)
    if goal.scope[:depth] != line.scope:
        return False  # inside a substack that does not hold the target: its jumps and `done` stay in it
    if goal.scope != line.scope:  # the target is inside a substack of this scope: that substack line counts
        goal = next(x for x in lines if x.sid == goal.scope[depth])
    positions = _positions(lines)
    here, there = positions[index], positions[lines.index(goal)]
    _, control, rest = _split(line.text)
    module = rest[0] if rest else ""
    if control == "sufficient":
        # pam_rootok checks the real uid: only root itself passes it in su and sudo; in sshd, login
        # and anything else a root daemon runs, it passes for every user.
        return not (module.endswith("pam_rootok.so") and service in _CALLER_UID_SERVICES)
    actions = _actions(control)
    # What the module does when it succeeds: its success action, else its default one.
    if actions.get("success", actions.get("default", "")) == "done":
        return True
    # A jump taken on any result skips modules without changing the stack's result so far.
    return any(a.isdigit() and here < there <= here + int(a) for a in actions.values())


def _is_check(text: str) -> bool:
    return is_mfaguard_line(text) and any(w.startswith("check=") for w in _split(text)[2][2:])


def _same_control(control: str, wanted: str) -> bool:
    return control.startswith("[") and _actions(control) == _actions(wanted)


def _check_line(
    line: str, file: str, topic: str, service: str, advice: Advice, *, settings: bool = True
) -> list[Finding]:
    """Can this mfaguard line ever work: entry file, venv and settings file all there and sound?"""
    from devicedb.errors import ConfigError, UnsafePathError
    from devicedb.settings import load_settings
    from pam_module.pam_mfaguard import code_tree_problems

    _, _, rest = _split(line)
    entry = rest[1] if len(rest) > 1 else ""
    options = dict(arg.partition("=")[::2] for arg in rest[2:] if "=" in arg)
    findings = []
    relative = [f"{name}={options[name]}" for name in ("venv", "log", "config") if name in options]
    relative = [option for option in relative if not option.split("=", 1)[1].startswith("/")]
    if relative:
        # Resolved against the working directory of whoever runs the program: a sudo caller's choice.
        findings.append(
            Finding(
                "fail",
                topic,
                f"{file}: an mfaguard line has a relative path ({', '.join(relative)}): the module refuses it, "
                "so every login through this line fails",
                "give absolute paths on the PAM line",
            )
        )
        return findings
    venv = options.get("venv") or str(Path(entry).parent.parent / ".venv")
    if not Path(entry).is_file():
        findings.append(
            Finding(
                "fail",
                topic,
                f"{file}: the entry file {entry} does not exist: every login fails",
                f"run {advice.reinstall(service)} from the installed copy",
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
    if not settings:
        return findings  # the publickey check reads no settings
    if "config" not in options:
        findings.append(
            Finding(
                "warn",
                topic,
                f"{file}: an mfaguard line has no config=, so it reads {DEFAULT_CONFIG_PATH} (the PAM module "
                "never takes $MFAGUARD_CONFIG: under sudo and su the environment is the caller's)",
                f"name the settings file on the line: add config={DEFAULT_CONFIG_PATH}, or the file you mean",
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


def _shape_fix(advice: Advice) -> str:
    return f"use the four auth lines of config/pam.d/sshd as they are: {advice.reinstall('sshd')} writes them"


def _is_code(line: _Line) -> bool:
    return is_mfaguard_line(line.text) and not _is_check(line.text)


def _publickey_checks(service: str, lines: list[_Line], topic: str, advice: Advice) -> tuple[list[Finding], set[int]]:
    """Each publickey check (auth lines only) must stand in the one supported shape:

        auth [success=ignore default=1] ...pam_mfaguard.py check=publickey-used ...
        auth [success=done ignore=ignore default=die] ...pam_mfaguard.py config=...   (the code after a key)
        @include common-auth                                                         (the password)
        auth required ...pam_mfaguard.py config=...                                  (the code after it)

    Returns the findings and the indices of the code lines that follow a check."""
    findings: list[Finding] = []
    after_key: set[int] = set()
    for c, line in enumerate(lines):
        if not _is_check(line.text):
            continue
        _, control, rest = _split(line.text)
        problems = []
        if "check=publickey-used" not in rest[2:]:
            problems.append("the only check there is is check=publickey-used")
        if not _same_control(control, CHECK_CONTROL):
            problems.append(f"its control is {control!r}, not {CHECK_CONTROL}")
        if line.scope:
            problems.append("it is inside a substack")
        same = [i for i in range(c + 1, len(lines)) if lines[i].scope == line.scope]  # the modules after it
        if not same or not _is_code(lines[same[0]]):
            problems.append("the next line is not mfaguard's code line, so a key login would skip the code")
        else:
            key = same[0]
            after_key.add(key)
            if not _same_control(_split(lines[key].text)[1], AFTER_KEY_CONTROL):
                problems.append(
                    f"the code line after it has control {_split(lines[key].text)[1]!r}, not {AFTER_KEY_CONTROL}"
                )
            password = (*lines[key].origin, "common-auth")
            after = [i for i in same if i > key]
            if not after or lines[after[0]].origin[: len(password)] != password:
                nxt = lines[after[0]].text if after else "the end of the stack"
                why = ""
                if _split(nxt)[1:] == ("substack", ["common-auth"]):
                    why = (
                        " (a wrong password inside a substack ends only the substack: the code would still be "
                        "asked, and a wrong one counted against the lockout, without the password)"
                    )
                problems.append(f"`@include common-auth` (the password) does not come right after it but `{nxt}`{why}")
            else:
                rest_of = [i for i in after if lines[i].origin[: len(password)] != password]
                main = lines[rest_of[0]] if rest_of else None
                if (
                    main is None
                    or not _is_code(main)
                    or _split(main.text)[1] not in _BINDING
                    or main.origin != lines[key].origin
                ):
                    problems.append("mfaguard's code line (`auth required ...`) does not come right after the password")
        if problems:
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"mfaguard's publickey check in {line.file} is not in the supported shape: " + "; ".join(problems),
                    _shape_fix(advice),
                )
            )
        elif service != "sshd":
            findings.append(
                Finding(
                    "warn",
                    topic,
                    f"mfaguard's publickey check in {line.file} does nothing outside sshd: the password is "
                    "always asked",
                    "remove the check line and the code line after it",
                )
            )
        else:
            findings.append(
                Finding(
                    "ok",
                    topic,
                    f"publickey check in front of the password ({line.file}): after a key the code is asked, "
                    "not the password",
                )
            )
        findings += _check_line(line.text, line.file, topic, service, advice, settings=False)
    return findings, after_key


def _is_password(line: _Line) -> bool:
    kind, _, rest = _split(line.text)
    return kind == "auth" and bool(rest) and is_password_module(rest[0])


# What each simple control does with a module's result (pam.conf(5)).
_SIMPLE = {
    "required": {"success": "ok", "failure": "bad", "ignore": "ignore"},
    "requisite": {"success": "ok", "failure": "die", "ignore": "ignore"},
    "sufficient": {"success": "done", "failure": "ignore", "ignore": "ignore"},
    "optional": {"success": "ok", "failure": "ignore", "ignore": "ignore"},
}


def _outcomes(lines: list[_Line], i: int) -> list[tuple[str, bool]]:
    """The results the line at ``i`` can give on a keyboard-interactive login, each with whether it
    means a password was checked. The publickey check can only answer PAM_IGNORE there (no key)."""
    line = lines[i]
    if line.sid >= 0:  # a substack: one module, a password one if it holds one
        inner = any(_is_password(x) for x in lines if line.sid in x.scope)
        return [("success", inner), ("failure", False)]
    module = Path((_split(line.text)[2] or [""])[0]).name
    if _is_check(line.text):
        return [("ignore", False)]
    if module == "pam_deny.so":
        return [("failure", False)]
    if module == "pam_permit.so":
        return [("success", False)]
    if is_password_module(module):
        return [("success", True), ("failure", False)]
    return [("success", False), ("failure", False), ("ignore", False)]


def _taken(control: str, result: str) -> set[str]:
    if control in _SIMPLE:
        return {_SIMPLE[control][result]}
    actions = _actions(control)
    default = actions.get("default", "bad")  # Linux-PAM's value for a result a bracket leaves out
    keys = {"success": ["success"], "failure": ["auth_err", "user_unknown", "cred_insufficient"], "ignore": ["ignore"]}
    return {actions.get(key, default) for key in keys[result]}


def _code_without_password(lines: list[_Line], target: int) -> bool:
    """Whether a keyboard-interactive login can reach the code line ``lines[target]`` with no failure
    on record and no password module passed: no password before it, one jumped over, or one whose
    failure goes on (optional, default=ignore, ...). Modules are taken as able to succeed or fail,
    pam_permit only to succeed, pam_deny only to fail."""
    scope = lines[target].scope
    if scope:  # inside a substack: only whether a password module comes first at all
        return not any(_is_password(x) for x in lines[:target])
    members = [i for i, x in enumerate(lines) if not x.scope]
    goal = members.index(target)
    todo, seen = [(0, False, False)], set()
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        n, passed, failed = state
        if n == goal:
            if not passed and not failed:
                return True
            continue
        if n > goal:
            continue
        control = _split(lines[members[n]].text)[1]
        for result, password in _outcomes(lines, members[n]):
            now = passed or password
            for action in _taken(control, result):
                if action in ("ok", "ignore"):
                    todo.append((n + 1, now, failed))
                elif action == "reset":
                    todo.append((n + 1, now, False))
                elif action == "bad":
                    todo.append((n + 1, now, True))
                elif action.isdigit():
                    todo.append((n + 1 + int(action), now, failed))
                # die and done end the stack before the code line
    return False


def _install_fix(service: str, pam_dir: Path, advice: Advice) -> str:
    """The command that puts mfaguard into this stack as `pam install` would: for this service; for
    the supported service whose stack it includes (su-l includes su), since install refuses to add a
    second line there; or uninstall then install when the file already holds mfaguard lines."""
    path = pam_dir / service
    text = path.read_text(errors="replace") if path.is_file() else ""
    if any(is_mfaguard_line(line) for line in text.splitlines()):
        return advice.reinstall(service)
    for _, _, line in pam_lines(text):
        included = included_file(line)
        if included is not None and included[1] in SERVICES and included[1] != service:
            install = advice.command("pam", "install", "--service", included[1])
            return f"{install} (the {service} stack takes its auth lines from {included[1]})"
    return advice.command("pam", "install", "--service", service)


def check_stack(service: str, pam_dir: Path, *, account_required: bool, advice: Advice | None = None) -> list[Finding]:
    advice = advice or Advice(pam_dir=str(pam_dir))
    path = pam_dir / service
    topic = f"PAM {service}"
    if not path.is_file():
        return [Finding("ok", topic, f"{path} does not exist (the {service} program is not installed)")]
    everything = _expand(path, pam_dir)
    findings = []
    for line in everything:
        if _is_check(line.text) and _split(line.text)[0] != "auth":
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"`{line.text}` in {line.file}: mfaguard's publickey check works only in the auth stack",
                    "remove that line",
                )
            )
    for kind in ("auth", "account"):
        lines = [line for line in everything if _split(line.text)[0] == kind]
        after_key: set[int] = set()
        if kind == "auth":
            check_findings, after_key = _publickey_checks(service, lines, topic, advice)
            findings += check_findings
        ours = [i for i, line in enumerate(lines) if _is_code(line) and i not in after_key]
        if not ours:
            if kind == "account" and not account_required:
                continue  # sudo's credential cache and NOPASSWD rules are the administrator's choice
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"no mfaguard {kind} line: {service} logins skip the second factor",
                    _install_fix(service, pam_dir, advice),
                )
            )
            continue
        index = ours[0]
        file, line = lines[index].file, lines[index].text
        owner = file if file in SERVICES else service  # the stack `pam install` put the line into
        if len(ours) > 1:
            second = lines[ours[1]].file
            fix = (
                f"keep one: {advice.command('pam', 'uninstall', '--service', second)} takes the one in {second} out"
                if second in SERVICES and second != file
                else f"keep one: {advice.reinstall(owner)}"
            )
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"mfaguard's {kind} line runs twice in this stack ({file}, then {second}): "
                    + (
                        "the code is asked twice, and the second answer is refused as a replay"
                        if kind == "auth"
                        else "the second finds the login's ticket already taken and refuses it"
                    ),
                    fix,
                )
            )
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
        # A code line after a check ends the stack only on mfaguard's own success: not a bypass.
        bypass = [lines[i] for i in range(index) if i not in after_key and _can_skip(lines, i, index, service)]
        if kind == "auth":
            # Without a key the publickey check answers PAM_IGNORE and jumps over the code line after
            # it: every other line before mfaguard's code line is on that path.
            if _code_without_password(lines, index):
                if not any(_is_password(lines[i]) for i in range(index) if i not in after_key):
                    how = (
                        f"mfaguard's code line in {file} comes with no password module before it "
                        f"(none of {', '.join(PASSWORD_MODULES)})"
                    )
                    step = (
                        f"put the password step (Debian's `@include common-auth`) in front of mfaguard's line in {file}"
                    )
                else:
                    how = (
                        f"a login can reach mfaguard's code line in {file} without passing the password module "
                        "before it (a jump over it, or a control under which its failure goes on)"
                    )
                    step = (
                        "make a wrong password end the stack and drop the jumps over it, as Debian's "
                        "`@include common-auth` does"
                    )
                if service == "sshd":
                    how = f"on the keyboard-interactive path (no key, so no publickey check success) {how}"
                    uninstall = advice.command("pam", "uninstall", "--service", "sshd")
                    install = advice.command("pam", "install", "--service", "sshd")
                    step = (
                        f"put the password back in front of it as `@include common-auth`: {uninstall}, make the "
                        f"auth lines of {pam_dir / 'sshd'} hold `@include common-auth` (and common-auth a password "
                        f"module that ends the stack when it fails), then {install}"
                    )
                findings.append(
                    Finding(
                        "fail" if service in ACCOUNT_LINE else "warn",
                        topic,
                        f"{how}: such a {service} login needs only the code, one factor",
                        step,
                    )
                )
            elif service == "sshd" and not any(_is_check(other.text) for other in lines):
                findings.append(
                    Finding(
                        "warn",
                        topic,
                        "no publickey check: an SSH login that already used a key is asked for the password "
                        "as well as the code",
                        _shape_fix(advice),
                    )
                )
        if kind == "auth":
            for other in lines[:index]:
                _, _, rest = _split(other.text)
                if rest and rest[0].endswith("pam_env.so") and "user_readenv=1" in rest:
                    findings.append(
                        Finding(
                            "fail",
                            topic,
                            f"`{other.text}` in {other.file} asks pam_env for users' ~/.pam_environment in the "
                            "auth stack, before mfaguard reads SSH_AUTH_INFO_0 (which names the key of an SSH "
                            "login). Linux-PAM's pam_env reads that file only in setcred, after the decision, so "
                            "it cannot set the variable today; failed as a precaution, since a pam_env that read "
                            "it during auth would let users choose it",
                            "drop user_readenv=1 from auth lines, or move pam_env to the session stack",
                        )
                    )
            for c, check in enumerate(lines[:index]):
                if not _is_check(check.text):
                    continue
                for i in range(c):
                    if lines[i] not in bypass and _can_skip(lines, i, c, service):
                        findings.append(
                            Finding(
                                "fail",
                                topic,
                                f"`{lines[i].text}` in {lines[i].file} can jump past mfaguard's publickey check onto "
                                "the code line that ends the stack, skipping the password",
                                "move it below mfaguard's lines, or drop it",
                            )
                        )
        for other in bypass:
            findings.append(
                Finding(
                    "fail",
                    topic,
                    f"`{other.text}` in {other.file} comes before mfaguard and can end the {kind} stack or "
                    "jump past mfaguard, skipping the code",
                    "move mfaguard's line above it, or drop it",
                )
            )
        findings += _check_line(line, file, topic, owner, advice)
        main_args = _split(line)[2][1:]
        for key in sorted(after_key):
            if _split(lines[key].text)[2][1:] != main_args:
                findings += _check_line(lines[key].text, lines[key].file, topic, owner, advice)
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


def check_store(settings: Settings, advice: Advice | None = None) -> tuple[list[Finding], Store | None]:
    advice = advice or Advice(settings.source)
    try:
        store = Store.open(settings)
    except MfaguardError as exc:
        fix = f"run {advice.command('init')}, or fix the owner and mode named"
        return [Finding("fail", "database", str(exc), fix)], None
    return [
        Finding(
            "ok",
            "database",
            f"{settings.database.path} and {settings.database.key_file}: owner and modes are safe, schema current",
        )
    ], store


def check_coverage(store: Store, advice: Advice | None = None) -> list[Finding]:
    from mfa_admin.report import coverage

    advice = advice or Advice()
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
                    f"enroll a new device for {acct['user']} ({advice.command('enroll', 'totp', acct['user'])}) "
                    "and remove the weak one",
                )
            )
        if acct["status"] in ("covered", "exempt"):
            continue
        fix = advice.command("enroll", "totp", acct["user"])
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
    advice = Advice(settings.source, pam_dir)
    for service in SERVICES:
        if service != "other":
            findings += check_stack(service, Path(pam_dir), account_required=service in ACCOUNT_LINE, advice=advice)
    # The fallback for programs without a PAM file of their own: worth a warning, not a failure.
    for f in check_stack("other", Path(pam_dir), account_required=False, advice=advice):
        if f.level != "fail":
            continue
        text = (
            "the fallback stack `other` has no mfaguard auth line: a service without its own PAM file "
            "authenticates with the password alone"
            if f.text.startswith("no mfaguard auth line")
            else f"the fallback stack `other`: {f.text}"
        )
        findings.append(Finding("warn", "PAM other", text, f.fix))
    if shutil.which("sshd") or Path("/usr/sbin/sshd").exists():
        findings += check_sshd()
    store_findings, store = check_store(settings, advice)
    findings += store_findings
    if store is not None:
        try:
            findings += check_coverage(store, advice)
        finally:
            store.close()
    return findings
