"""`mfa-admin pam install|uninstall` and `mfa-admin doctor` on copies of Debian's real PAM files."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pam_helpers import (
    ENTRY_FILE,
    PAM_D,
    REPO,
    Mfa,
    SystemUser,
    pamtester,
    require,
    totp_code,
    wait_for_fresh_step,
)

from mfa_admin.doctor import Advice
from mfa_admin.pam_setup import pam_lines

MFA_ADMIN = str(Path(sys.executable).parent / "mfa-admin")


@pytest.fixture
def pam_copy(tmp_path: Path) -> Path:
    """A copy of the host's PAM folder: the files `pam install` edits, for real, but not in /etc.

    Each file as the distribution shipped it: where mfaguard is installed on this machine, the copy
    `pam install` kept (NAME.mfaguard-orig) stands in, so the tests start from a stack without it."""
    folder = tmp_path / "pam.d"
    folder.mkdir()
    for name in (
        "sshd",
        "sudo",
        "login",
        "common-auth",
        "common-account",
        "common-session",
        "common-session-noninteractive",
        "common-password",
    ):
        source = PAM_D / name
        require(source.is_file(), f"{source} missing: apt-get install openssh-server sudo login")
        kept = PAM_D / f"{name}.mfaguard-orig"
        shutil.copy(kept if kept.is_file() else source, folder / name)
        require(
            "pam_mfaguard" not in (folder / name).read_text(),
            f"{source} holds mfaguard lines but no {kept.name}: run `mfa-admin pam uninstall` or restore it",
        )
    return folder


def admin(mfa: Mfa, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MFA_ADMIN, "--config", str(mfa.config), *args], capture_output=True, text=True, timeout=120)


def test_install_is_refused_while_root_has_no_device(mfa: Mfa, pam_copy: Path) -> None:
    before = (pam_copy / "sudo").read_bytes()
    r = admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy))
    assert r.returncode == 5, r
    assert "root has no active device" in r.stderr
    assert (pam_copy / "sudo").read_bytes() == before
    assert not (pam_copy / "sudo.mfaguard-orig").exists()


def test_dry_run_shows_the_change_and_changes_nothing(mfa: Mfa, pam_copy: Path) -> None:
    before = (pam_copy / "sshd").read_bytes()
    r = admin(mfa, "pam", "install", "--service", "sshd", "--pam-dir", str(pam_copy), "--dry-run")
    assert r.returncode == 0, r
    assert "+auth     required  /lib/security/pam_python.so" in r.stdout
    assert "+account  required  /lib/security/pam_python.so" in r.stdout
    assert (pam_copy / "sshd").read_bytes() == before


def test_install_then_uninstall_restores_the_original(mfa: Mfa, pam_copy: Path) -> None:
    mfa.enroll("root")
    for service, account in (("sshd", True), ("sudo", False)):
        original = (pam_copy / service).read_bytes()
        r = admin(mfa, "pam", "install", "--service", service, "--pam-dir", str(pam_copy))
        assert r.returncode == 0, r
        lines = (pam_copy / service).read_text().splitlines()
        ours = [i for i, line in enumerate(lines) if line.startswith("auth") and "pam_mfaguard.py" in line]
        password = lines.index("@include common-auth")
        assert "required" in lines[ours[-1]].split()[:2] and password < ours[-1]
        if service == "sshd":  # the publickey check and the code line after a key, right in front of the password
            assert ours[:2] == [password - 2, password - 1]
            assert "check=publickey-used" in lines[ours[0]] and "[success=ignore default=1]" in lines[ours[0]]
            assert "[success=done ignore=ignore default=die]" in lines[ours[1]]
        else:
            assert len(ours) == 1
        has_account = any(line.startswith("account") and "pam_mfaguard.py" in line for line in lines)
        # sudo keeps its credential cache and NOPASSWD rules working: no account line there.
        assert has_account is account
        assert (pam_copy / f"{service}.mfaguard-orig").read_bytes() == original
        again = admin(mfa, "pam", "install", "--service", service, "--pam-dir", str(pam_copy))
        assert again.returncode == 5 and "already" in again.stderr
        r = admin(mfa, "pam", "uninstall", "--service", service, "--pam-dir", str(pam_copy))
        assert r.returncode == 0, r
        assert (pam_copy / service).read_bytes() == original
        assert not (pam_copy / f"{service}.mfaguard-orig").exists()


def test_uninstall_keeps_edits_made_after_install(mfa: Mfa, pam_copy: Path) -> None:
    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)).returncode == 0
    with (pam_copy / "sudo").open("a") as f:
        f.write("session optional pam_echo.so added-later\n")
    r = admin(mfa, "pam", "uninstall", "--service", "sudo", "--pam-dir", str(pam_copy))
    assert r.returncode == 0, r
    text = (pam_copy / "sudo").read_text()
    assert "added-later" in text and "pam_mfaguard.py" not in text
    assert "still in" in r.stdout


def test_install_refuses_without_a_settings_file(pam_copy: Path) -> None:
    default = Path("/etc/mfaguard/mfaguard.yaml")
    require(not default.exists(), f"{default} exists on this machine: this test needs a machine without it")
    r = subprocess.run(
        [MFA_ADMIN, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MFAGUARD_CONFIG": ""},
    )
    assert r.returncode == 3 and "refuses to run without one" in r.stderr
    assert "pam_mfaguard" not in (pam_copy / "sudo").read_text()


def test_install_refuses_for_an_operator_without_device(mfa: Mfa, pam_copy: Path) -> None:
    mfa.enroll("root")
    env = {"PATH": "/usr/bin:/bin", "SUDO_USER": "operator-without-device"}
    r = subprocess.run(
        [MFA_ADMIN, "--config", str(mfa.config), "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 5 and "your own sudo would be refused" in r.stderr
    assert "pam_mfaguard" not in (pam_copy / "sudo").read_text()
    r = subprocess.run(
        [
            MFA_ADMIN,
            "--config",
            str(mfa.config),
            "pam",
            "install",
            "--service",
            "sudo",
            "--pam-dir",
            str(pam_copy),
            "--force",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r
    assert "will be refused by sudo" in r.stderr  # uncovered accounts are named


def test_installed_stack_demands_password_and_code(
    mfa: Mfa, pam_copy: Path, pam_service: Callable[..., str], system_user: Callable[[], SystemUser]
) -> None:
    """The file `pam install` writes, run for real: Debian's common-auth, then mfaguard."""
    mfa.enroll("root")
    user = system_user()
    secret = mfa.enroll(user.name)
    assert admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)).returncode == 0
    service = pam_service((pam_copy / "sudo").read_text().splitlines())
    wait_for_fresh_step()
    right = totp_code(secret)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    assert pamtester(service, user.name, ["not-the-password", right]).rc != 0
    assert pamtester(service, user.name, [user.password, wrong, wrong, wrong]).rc != 0
    r = pamtester(service, user.name, [user.password, right], "authenticate", "acct_mgmt")
    assert r.rc == 0, r


def doctor(mfa: Mfa, pam_dir: Path) -> list[dict[str, str]]:
    r = admin(mfa, "doctor", "--pam-dir", str(pam_dir), "--json")
    assert r.returncode in (0, 1), r
    # The checkout under test may itself live under /tmp (CI clones anywhere): that warning is about
    # where this copy of mfaguard runs from, not about the stacks these tests build.
    return [f for f in json.loads(r.stdout) if "runs from under /tmp" not in f["text"]]


def test_doctor_finds_missing_and_bypassable_stacks(mfa: Mfa, pam_copy: Path) -> None:
    findings = doctor(mfa, pam_copy)
    sudo = [f for f in findings if f["topic"] == "PAM sudo"]
    assert {f["level"] for f in sudo} == {"fail"}
    assert all("pam install --service sudo --pam-dir" in f["fix"] for f in sudo)
    assert any(f["topic"] == "coverage" and "root" in f["text"] and f["level"] == "fail" for f in findings)

    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)).returncode == 0
    sudo = [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sudo"]
    assert [f["level"] for f in sudo] == ["ok"]
    assert not any(f["topic"] == "coverage" and "root " in f["text"] for f in doctor(mfa, pam_copy))

    # A `sufficient` module ahead of mfaguard can end the stack before the code is asked.
    text = (
        (pam_copy / "sudo")
        .read_text()
        .replace("@include common-auth", "auth sufficient pam_permit.so\n@include common-auth", 1)
    )
    (pam_copy / "sudo").write_text(text)
    sudo = [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sudo"]
    assert any(f["level"] == "fail" and "sufficient" in f["text"] for f in sudo)

    # An `optional` mfaguard line does not fail the login.
    text = (pam_copy / "sudo").read_text().replace("auth sufficient pam_permit.so\n", "")
    text = text.replace("auth     required  /lib/security/pam_python.so", "auth optional /lib/security/pam_python.so")
    (pam_copy / "sudo").write_text(text)
    sudo = [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sudo"]
    assert any(f["level"] == "fail" and "'optional'" in f["text"] for f in sudo)


def test_doctor_reports_unsafe_database(mfa: Mfa, pam_copy: Path) -> None:
    db = mfa.root / "lib" / "mfaguard.db"
    db.chmod(0o666)  # noqa: S103 - the unsafe mode under test
    findings = doctor(mfa, pam_copy)
    database = [f for f in findings if f["topic"] == "database"]
    assert database and database[0]["level"] == "fail"
    assert "writable by group or others" in database[0]["text"]


def test_doctor_finds_jumps_includes_and_broken_lines(mfa: Mfa, pam_copy: Path) -> None:
    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", "sshd", "--pam-dir", str(pam_copy)).returncode == 0
    installed = (pam_copy / "sshd").read_text()

    def sshd_findings(text: str) -> list[dict[str, str]]:
        (pam_copy / "sshd").write_text(text)
        return [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sshd"]

    assert {f["level"] for f in sshd_findings(installed)} == {"ok"}
    marker = "# added by mfa-admin pam install\nauth"
    jump = installed.replace(marker, "auth [success=1 default=ignore] pam_permit.so\n" + marker, 1)
    assert any("jump past mfaguard" in f["text"] for f in sshd_findings(jump))
    (pam_copy / "extra-auth").write_text("auth sufficient pam_permit.so\n")
    include = installed.replace(marker, "auth include extra-auth\n" + marker, 1)
    assert any(f["level"] == "fail" and "sufficient" in f["text"] for f in sshd_findings(include))
    account = installed.replace("@include common-account", "account sufficient pam_permit.so\n@include common-account")
    assert any(f["level"] == "fail" and "account stack" in f["text"] for f in sshd_findings(account))
    broken = installed.replace(f"config={mfa.config}", "config=/nonexistent.yaml")
    assert any(f["level"] == "fail" and "do not load" in f["text"] for f in sshd_findings(broken))
    gone = installed.replace(str(ENTRY_FILE), "/nonexistent/pam_module/pam_mfaguard.py")
    assert any(f["level"] == "fail" and "does not exist" in f["text"] for f in sshd_findings(gone))


def test_doctor_checks_sudo_i_and_su(mfa: Mfa, pam_copy: Path) -> None:
    for name in ("sudo-i", "su", "su-l"):
        source = PAM_D / name
        require(source.is_file(), f"{source} missing")
        shutil.copy(source, pam_copy / name)
    findings = doctor(mfa, pam_copy)
    for service in ("sudo-i", "su", "su-l"):
        assert any(f["topic"] == f"PAM {service}" and f["level"] == "fail" for f in findings), service
    mfa.enroll("root")
    for service in ("sudo-i", "su"):
        assert admin(mfa, "pam", "install", "--service", service, "--pam-dir", str(pam_copy)).returncode == 0
    findings = doctor(mfa, pam_copy)
    for service in ("sudo-i", "su", "su-l"):  # su-l includes su
        levels = {f["level"] for f in findings if f["topic"] == f"PAM {service}"}
        assert levels == {"ok"}, (service, [f for f in findings if f["topic"] == f"PAM {service}"])


def test_doctor_reads_controls_as_linux_pam_does(mfa: Mfa, pam_copy: Path) -> None:
    """Upper-case types and controls, and backslash-continued lines, are what Linux-PAM honours too."""
    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)).returncode == 0
    installed = (pam_copy / "sudo").read_text()
    for extra in (
        "AUTH SUFFICIENT pam_permit.so\n",
        "auth Sufficient pam_permit.so\n",
        "auth \\\n  sufficient pam_permit.so\n",
    ):
        (pam_copy / "sudo").write_text(installed.replace("@include common-auth", extra + "@include common-auth", 1))
        sudo = [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sudo"]
        assert any(f["level"] == "fail" and "sufficient" in f["text"].lower() for f in sudo), (extra, sudo)


# -- sshd's publickey check: the one supported shape ------------------------------------------------------

SHAPE = "not in the supported shape"


def installed_sshd(mfa: Mfa, pam_copy: Path) -> str:
    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", "sshd", "--pam-dir", str(pam_copy)).returncode == 0
    return (pam_copy / "sshd").read_text()


def sshd_findings(mfa: Mfa, pam_copy: Path, text: str) -> list[dict[str, str]]:
    (pam_copy / "sshd").write_text(text)
    return [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sshd"]


def auth_line_of(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("auth") and needle in line)


def test_doctor_accepts_the_installed_and_the_shipped_sshd_stacks(mfa: Mfa, pam_copy: Path) -> None:
    installed = installed_sshd(mfa, pam_copy)
    findings = sshd_findings(mfa, pam_copy, installed)
    assert {f["level"] for f in findings} == {"ok"}, findings
    assert any("publickey check in front of the password" in f["text"] for f in findings)
    # config/pam.d/sshd holds the same auth lines as `pam install` writes, with /opt/mfaguard paths.
    shipped = (REPO / "config" / "pam.d" / "sshd").read_text()
    for placeholder, here in (
        ("/opt/mfaguard/pam_module/pam_mfaguard.py", str(ENTRY_FILE)),
        ("venv=/opt/mfaguard/.venv", f"venv={sys.prefix}"),
        ("config=/etc/mfaguard/mfaguard.yaml", f"config={mfa.config}"),
    ):
        shipped = shipped.replace(placeholder, here)

    def auth_part(text: str) -> list[str]:
        return [
            " ".join(line.split())
            for line in text.splitlines()
            if line.split()[:1] == ["auth"] or line.split()[:2] == ["@include", "common-auth"]
        ]

    assert auth_part(shipped) == auth_part(installed)
    findings = sshd_findings(mfa, pam_copy, shipped)
    assert {f["level"] for f in findings} == {"ok"}, findings


def test_doctor_warns_about_an_sshd_stack_without_the_publickey_check(mfa: Mfa, pam_copy: Path) -> None:
    installed = installed_sshd(mfa, pam_copy)
    check = auth_line_of(installed, "check=publickey-used")
    after_key = auth_line_of(installed, "[success=done")
    old_style = installed.replace(check + "\n", "").replace(after_key + "\n", "")
    findings = sshd_findings(mfa, pam_copy, old_style)
    assert [f["level"] for f in findings if f["level"] != "ok"] == ["warn"], findings
    assert any("asked for the password as well as the code" in f["text"] for f in findings)


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        ("check [success=1 default=ignore]", "its control is '[success=1 default=ignore]'"),
        ("check sufficient", "its control is 'sufficient'"),
        ("check required", "its control is 'required'"),
        ("check [success=ignore default=2]", "its control is '[success=ignore default=2]'"),
        ("after-key required", "the code line after it has control 'required'"),
        ("after-key [success=done default=ignore]", "the code line after it has control"),
        ("no after-key line", "the next line is not mfaguard's code line"),
        ("substack", "ends only the substack"),
        ("no code line after the password", "does not come right after the password"),
        ("a module between the password and the code", "does not come right after the password"),
        ("another check", "the only check there is is check=publickey-used"),
        ("jump onto the after-key line", "can jump past mfaguard's publickey check"),
        ("an account line with the check", "works only in the auth stack"),
    ],
)
def test_doctor_fails_a_publickey_check_out_of_shape(mutation: str, expected: str, mfa: Mfa, pam_copy: Path) -> None:
    installed = installed_sshd(mfa, pam_copy)
    check = auth_line_of(installed, "check=publickey-used")
    after_key = auth_line_of(installed, "[success=done")
    code = auth_line_of(installed, "  required  ")
    words = mutation.split()
    if words[0] == "check" and len(words) > 1:
        text = installed.replace(check, check.replace("[success=ignore default=1]", mutation[len("check ") :]))
    elif words[0] == "after-key" and len(words) > 1:
        text = installed.replace(
            after_key, after_key.replace("[success=done ignore=ignore default=die]", mutation[len("after-key ") :])
        )
    elif mutation == "no after-key line":
        text = installed.replace(after_key + "\n", "")
    elif mutation == "substack":
        text = installed.replace("\n@include common-auth\n", "\nauth substack common-auth\n")
    elif mutation == "no code line after the password":
        text = installed.replace(code + "\n", "")
    elif mutation == "a module between the password and the code":
        text = installed.replace(code, "auth optional pam_permit.so\n" + code)
    elif mutation == "another check":
        text = installed.replace("check=publickey-used", "check=password-used")
    elif mutation == "jump onto the after-key line":
        text = installed.replace(check, "auth [success=1 default=ignore] pam_permit.so\n" + check)
    elif mutation == "an account line with the check":
        account = next(line for line in installed.splitlines() if line.startswith("account") and "mfaguard" in line)
        text = installed.replace(account, account + "\n" + check.replace("auth", "account", 1))
    else:
        raise AssertionError(mutation)
    assert text != installed
    findings = sshd_findings(mfa, pam_copy, text)
    fails = [f for f in findings if f["level"] == "fail"]
    assert any(expected in f["text"] for f in fails), (mutation, findings)
    if SHAPE in " ".join(f["text"] for f in fails):
        assert any("config/pam.d/sshd" in f["fix"] for f in fails if SHAPE in f["text"])


def test_doctor_counts_a_substack_as_one_module_when_jumping(mfa: Mfa, pam_copy: Path) -> None:
    """Linux-PAM skips a whole substack as one module, and a jump or `done` inside a substack stays in it."""
    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)).returncode == 0
    installed = (pam_copy / "sudo").read_text()

    def sudo_findings(replacement: str) -> list[dict[str, str]]:
        (pam_copy / "sudo").write_text(installed.replace("@include common-auth", replacement, 1))
        return [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sudo"]

    # Over the substack (one module, though common-auth has several lines) onto mfaguard: no bypass
    # of mfaguard, only of the password (a warning for sudo: the code alone passes).
    found = sudo_findings("auth [success=1 default=ignore] pam_permit.so\nauth substack common-auth")
    assert {f["level"] for f in found} == {"ok", "warn"}, found
    assert [f["text"] for f in found if f["level"] == "warn"][0].startswith("a login can reach mfaguard's code line")
    # Two modules on: past mfaguard, whatever common-auth's length.
    found = sudo_findings("auth [success=2 default=ignore] pam_permit.so\nauth substack common-auth")
    assert any(f["level"] == "fail" and "jump past mfaguard" in f["text"] for f in found), found
    # A jump taken on failure skips as well as one taken on success.
    found = sudo_findings("auth [success=ok default=2] pam_permit.so\nauth substack common-auth")
    assert any(f["level"] == "fail" and "jump past mfaguard" in f["text"] for f in found), found
    # `sufficient` inside a substack ends only the substack; @included, it ends the whole stack.
    (pam_copy / "extra-auth").write_text("auth sufficient pam_permit.so\n")
    assert {f["level"] for f in sudo_findings("@include common-auth\nauth substack extra-auth")} == {"ok"}
    found = sudo_findings("@include common-auth\n@include extra-auth")
    assert any(f["level"] == "fail" and "sufficient" in f["text"] for f in found), found


# -- where the password step is: install recognises each supported form, or refuses ---------------------

# Debian's common-auth written out in the stack itself (without the optional pam_cap line).
WRITTEN_OUT = (
    "auth [success=1 default=ignore] pam_unix.so nullok\nauth requisite pam_deny.so\nauth required pam_permit.so"
)


def copy_services(pam_copy: Path, *names: str) -> None:
    for name in names:
        source = PAM_D / name
        require(source.is_file(), f"{source} missing")
        kept = PAM_D / f"{name}.mfaguard-orig"
        shutil.copy(kept if kept.is_file() else source, pam_copy / name)


def refused(mfa: Mfa, pam_copy: Path, service: str) -> str:
    """Install is refused: exit 5, the stack left as it was, no backup written. Returns the error."""
    before = (pam_copy / service).read_bytes()
    r = admin(mfa, "pam", "install", "--service", service, "--pam-dir", str(pam_copy))
    assert r.returncode == 5, r
    assert (pam_copy / service).read_bytes() == before
    assert not (pam_copy / f"{service}.mfaguard-orig").exists()
    assert "nothing was changed" in r.stderr, r.stderr
    return r.stderr


def test_sshd_install_around_auth_include_common_auth(mfa: Mfa, pam_copy: Path) -> None:
    """`auth include common-auth` is the same password step as `@include common-auth` to Linux-PAM."""
    mfa.enroll("root")
    original = (pam_copy / "sshd").read_text()
    assert "\n@include common-auth\n" in original
    (pam_copy / "sshd").write_text(original.replace("\n@include common-auth\n", "\nauth include common-auth\n"))
    r = admin(mfa, "pam", "install", "--service", "sshd", "--pam-dir", str(pam_copy))
    assert r.returncode == 0, r
    lines = (pam_copy / "sshd").read_text().splitlines()
    password = lines.index("auth include common-auth")
    assert "check=publickey-used" in lines[password - 2] and "[success=done" in lines[password - 1]
    assert lines[password + 1] == "# added by mfa-admin pam install"
    assert lines[password + 2].split()[:2] == ["auth", "required"] and "pam_mfaguard.py" in lines[password + 2]
    findings = [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sshd"]
    assert {f["level"] for f in findings} == {"ok"}, findings


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("written out", "not `@include common-auth`"),
        ("substack", "ends only the substack"),
        ("none", "has no password step"),
        ("another file", "not `@include common-auth`"),
        ("common-auth without a password module", "has no password step"),
    ],
)
def test_sshd_install_refuses_a_password_step_it_cannot_build_around(
    form: str, expected: str, mfa: Mfa, pam_copy: Path
) -> None:
    """Once: exit 0, no publickey check, the code line at the end, and keyboard-interactive logged in
    with the code alone. Now: refused, saying what to change, and nothing changed."""
    mfa.enroll("root")
    include = "\n@include common-auth\n"
    text = (pam_copy / "sshd").read_text()
    if form == "written out":
        text = text.replace(include, f"\n{WRITTEN_OUT}\n")
    elif form == "substack":
        text = text.replace(include, "\nauth substack common-auth\n")
    elif form == "none":
        text = text.replace(include, "\n")
    elif form == "another file":
        (pam_copy / "sshd-password").write_text(WRITTEN_OUT + "\n")
        text = text.replace(include, "\n@include sshd-password\n")
    elif form == "common-auth without a password module":
        (pam_copy / "common-auth").write_text("auth required pam_permit.so\n")
    (pam_copy / "sshd").write_text(text)
    error = refused(mfa, pam_copy, "sshd")
    assert expected in error, error
    assert "@include common-auth" in error  # what to write instead


def test_install_finds_a_written_out_password_step_and_refuses_a_stack_without_one(
    mfa: Mfa, pam_copy: Path, pam_service: Callable[..., str], system_user: Callable[[], SystemUser]
) -> None:
    mfa.enroll("root")
    original = (pam_copy / "sudo").read_text()
    (pam_copy / "sudo").write_text(original.replace("@include common-auth", "auth optional pam_faildelay.so delay=1\n"))
    assert "has no password step" in refused(mfa, pam_copy, "sudo")

    # Written out as Debian's common-auth: the code line goes after the whole step, never between
    # pam_unix and the pam_deny its success jumps over.
    (pam_copy / "sudo").write_text(original.replace("@include common-auth", WRITTEN_OUT))
    assert admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)).returncode == 0
    lines = (pam_copy / "sudo").read_text().splitlines()
    code = next(i for i, line in enumerate(lines) if "pam_mfaguard.py" in line)
    assert lines[code - 2] == "auth required pam_permit.so"
    assert {f["level"] for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sudo"} == {"ok"}
    user = system_user()
    secret = mfa.enroll(user.name)
    service = pam_service(lines)
    wait_for_fresh_step()
    assert pamtester(service, user.name, ["not-the-password", totp_code(secret)]).rc != 0
    r = pamtester(service, user.name, [user.password, totp_code(secret)])
    assert r.rc == 0, r


def test_su_l_is_installed_through_su_and_other_directly(mfa: Mfa, pam_copy: Path) -> None:
    """Debian's su-l takes its auth lines from su (`auth include su`): install points there, and once su
    holds mfaguard, a second line in su-l (the code asked twice) is refused."""
    copy_services(pam_copy, "su", "su-l", "other")
    mfa.enroll("root")
    require("su" in [w for line in (pam_copy / "su-l").read_text().splitlines() for w in line.split()[2:3]], "su-l")
    assert "`mfa-admin pam install --service su`" in refused(mfa, pam_copy, "su-l")
    assert admin(mfa, "pam", "install", "--service", "su", "--pam-dir", str(pam_copy)).returncode == 0
    assert "already runs mfaguard's code line through" in refused(mfa, pam_copy, "su-l")
    levels = {f["level"] for f in doctor(mfa, pam_copy) if f["topic"] in ("PAM su", "PAM su-l")}
    assert levels == {"ok"}
    assert any(f["topic"] == "PAM other" for f in doctor(mfa, pam_copy))
    assert admin(mfa, "pam", "install", "--service", "other", "--pam-dir", str(pam_copy)).returncode == 0
    assert not any(f["topic"] == "PAM other" and f["level"] != "ok" for f in doctor(mfa, pam_copy))
    assert (
        "account"
        not in "".join(
            line for line in (pam_copy / "other").read_text().splitlines() if "pam_mfaguard.py" in line
        ).split()[:1]
    )


# -- doctor: the keyboard-interactive path with no password before the code ------------------------------

ONE_FACTOR = "no password module before it"


def test_doctor_fails_an_sshd_stack_whose_code_line_has_no_password_before_it(mfa: Mfa, pam_copy: Path) -> None:
    installed = installed_sshd(mfa, pam_copy)
    check = auth_line_of(installed, "check=publickey-used")
    after_key = auth_line_of(installed, "[success=done")

    def fails(text: str) -> list[dict[str, str]]:
        findings = sshd_findings(mfa, pam_copy, text)
        assert not any("as well as the code" in f["text"] for f in findings), findings  # there is no password
        return [f for f in findings if f["level"] == "fail" and ONE_FACTOR in f["text"]]

    # What install used to write for a stack without `@include common-auth`: no check, the code line alone.
    no_check = installed.replace(check + "\n", "").replace(after_key + "\n", "").replace("@include common-auth\n", "")
    found = fails(no_check)
    assert found and "keyboard-interactive" in found[0]["text"] and "one factor" in found[0]["text"], found
    assert "@include common-auth" in found[0]["fix"]
    # The check in place, but the password gone from behind it, or common-auth emptied of its password module.
    assert fails(installed.replace("@include common-auth\n", ""))
    (pam_copy / "common-auth").write_text("auth required pam_permit.so\n")
    assert fails(installed)


@pytest.mark.parametrize(
    ("service", "password"),
    [
        ("sshd", "auth optional pam_unix.so nullok"),
        (
            "sshd",
            "auth [success=2 default=ignore] pam_permit.so\nauth required pam_unix.so\nauth required pam_permit.so",
        ),
        ("login", "auth [success=ok default=ignore] pam_unix.so nullok"),
        ("login", "auth sufficient pam_unix.so\nauth optional pam_permit.so"),
    ],
)
def test_doctor_fails_a_password_the_login_can_get_past(service: str, password: str, mfa: Mfa, pam_copy: Path) -> None:
    """A password module that is there but can be jumped over, or whose failure goes on, is no first
    factor either (a `sufficient` one ends the stack on success: the bypass check reports that)."""
    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", service, "--pam-dir", str(pam_copy)).returncode == 0
    installed = (pam_copy / service).read_text()
    findings = [f for f in doctor(mfa, pam_copy) if f["topic"] == f"PAM {service}"]
    assert not any("password" in f["text"] and f["level"] == "fail" for f in findings), findings
    (pam_copy / service).write_text(installed.replace("@include common-auth", password, 1))
    findings = [f for f in doctor(mfa, pam_copy) if f["topic"] == f"PAM {service}"]
    past = [f for f in findings if f["level"] == "fail" and "one factor" in f["text"]]
    if "sufficient" in password:
        assert any("sufficient" in f["text"] for f in findings if f["level"] == "fail"), findings
    else:
        assert past and "without passing the password module" in past[0]["text"], findings


def test_doctor_explains_pam_env_user_readenv_as_a_precaution(mfa: Mfa, pam_copy: Path) -> None:
    installed = installed_sshd(mfa, pam_copy)
    text = "auth required pam_env.so user_readenv=1\n" + installed
    found = [f for f in sshd_findings(mfa, pam_copy, text) if "pam_env" in f["text"]]
    assert found and found[0]["level"] == "fail", found
    assert "only in setcred" in found[0]["text"] and "precaution" in found[0]["text"]


def test_doctor_warns_about_an_mfaguard_line_without_config(mfa: Mfa, pam_copy: Path) -> None:
    """It works (the default path), but the settings it reads are then never in doubt only if named."""
    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)).returncode == 0
    text = (pam_copy / "sudo").read_text()
    (pam_copy / "sudo").write_text(text.replace(f" config={mfa.config}", ""))
    sudo = [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sudo"]
    warned = [f for f in sudo if f["level"] == "warn" and "no config=" in f["text"]]
    assert warned and "/etc/mfaguard/mfaguard.yaml" in warned[0]["text"], sudo
    assert "MFAGUARD_CONFIG" in warned[0]["text"]


# -- every command doctor suggests parses, and the PAM ones work as printed ------------------------------


def suggested_commands(findings: list[dict[str, str]]) -> list[str]:
    """The mfa-admin commands of every fix, each written in backquotes; none outside them."""
    out = []
    for f in findings:
        outside = re.sub(r"`[^`]*`", "", f["fix"])
        assert "mfa-admin" not in outside and not re.search(r"\bpam (un)?install\b", outside), f
        out += [c for c in re.findall(r"`([^`]*)`", f["fix"]) if c.startswith("mfa-admin")]
    return list(dict.fromkeys(out))


def parses(command: str) -> list[str]:
    from mfa_admin.cli import build_parser

    words = shlex.split(command)
    assert words[0] == "mfa-admin"
    try:
        build_parser().parse_args(words[1:])
    except SystemExit as exc:
        raise AssertionError(f"doctor suggested `{command}`, which mfa-admin refuses ({exc})") from None
    return words


def test_every_command_doctor_suggests_parses_and_works(mfa: Mfa, pam_copy: Path) -> None:
    copy_services(pam_copy, "sudo-i", "su", "su-l", "other")
    mfa.enroll("root")
    seen: set[str] = set()

    def repair() -> list[dict[str, str]]:
        """Run doctor, then every PAM command its fixes name, in order, each as printed."""
        findings = doctor(mfa, pam_copy)
        for command in suggested_commands(findings):
            seen.add(command)
            words = parses(command)
            if words[1:2] == ["--config"] and words[3:4] == ["pam"] or words[1:2] == ["pam"]:
                r = subprocess.run([MFA_ADMIN, *words[1:]], capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, (command, r)
        return findings

    def pam_problems() -> list[dict[str, str]]:
        return [f for f in doctor(mfa, pam_copy) if f["topic"].startswith("PAM") and f["level"] != "ok"]

    first = repair()
    assert any("--service su-l" in f["fix"] or "stack takes its auth lines from su" in f["fix"] for f in first)
    assert any(f["topic"] == "PAM other" for f in first)
    assert pam_problems() == []

    # Broken in ways whose fixes are commands: a missing entry file, no publickey check, no account
    # line, mfaguard twice (su-l's own line on top of su's).
    sudo = (pam_copy / "sudo").read_text()
    (pam_copy / "sudo").write_text(sudo.replace(str(ENTRY_FILE), "/nonexistent/pam_module/pam_mfaguard.py"))
    sshd = (pam_copy / "sshd").read_text()
    check = auth_line_of(sshd, "check=publickey-used")
    (pam_copy / "sshd").write_text(
        sshd.replace(check + "\n", "").replace(auth_line_of(sshd, "[success=done") + "\n", "")
    )
    login = (pam_copy / "login").read_text()
    account = next(line for line in login.splitlines() if line.startswith("account") and "pam_mfaguard.py" in line)
    (pam_copy / "login").write_text(login.replace(account + "\n", ""))
    su_line = auth_line_of((pam_copy / "su").read_text(), "pam_mfaguard.py")
    (pam_copy / "su-l").write_text((pam_copy / "su-l").read_text() + su_line + "\n")
    broken = pam_problems()
    assert {f["topic"] for f in broken} >= {"PAM sudo", "PAM sshd", "PAM login", "PAM su-l"}, broken
    repair()
    assert pam_problems() == []

    # Commands that are only parsed here: enrollment and init.
    for user in ("root", "alice", "o'brien"):
        parses(Advice(str(mfa.config)).command("enroll", "totp", user).strip("`"))
    parses(Advice(str(mfa.config)).command("init").strip("`"))
    assert any("uninstall" in c for c in seen) and any("install --service other" in c for c in seen), seen


def test_doctor_fails_pam_rootok_before_mfaguard_where_root_runs_every_login(mfa: Mfa, pam_copy: Path) -> None:
    # The fault: pam_rootok was taken to pass for root alone; it checks the real uid, which is 0 in
    # sshd and login for every user, so `auth sufficient pam_rootok.so` there skipped both factors.
    mfa.enroll("root")
    for service in ("sshd", "sudo"):
        assert admin(mfa, "pam", "install", "--service", service, "--pam-dir", str(pam_copy)).returncode == 0
        text = (pam_copy / service).read_text()
        (pam_copy / service).write_text("auth sufficient pam_rootok.so\n" + text)
    findings = doctor(mfa, pam_copy)
    assert any(f["level"] == "fail" and "pam_rootok" in f["text"] for f in findings if f["topic"] == "PAM sshd")
    # sudo runs with the caller's real uid: there pam_rootok passes for root alone.
    assert not any("pam_rootok" in f["text"] for f in findings if f["topic"] == "PAM sudo")


def test_continuations_are_read_as_linux_pam_reads_them() -> None:
    # The faults: a comment ending in a backslash was joined to the next line (Linux-PAM drops the
    # comment first), and a backslash followed by spaces was not (Linux-PAM trims them first).
    text = (
        "# Debian's lines follow \\\n"
        "auth [success=2 default=ignore] pam_permit.so\n"
        "auth optional pam_echo.so pre \\  \n"
        "auth [success=1 default=ignore] pam_unix.so nullok \\\t\n"
        "auth requisite pam_deny.so # a comment \\\n"
        "auth required pam_permit.so\n"
    )
    assert [line for _, _, line in pam_lines(text)] == [
        "auth [success=2 default=ignore] pam_permit.so",
        "auth optional pam_echo.so pre auth [success=1 default=ignore] pam_unix.so nullok auth requisite pam_deny.so",
        "auth required pam_permit.so",
    ]


@pytest.mark.parametrize("option", ["venv=v", "log=d/rel.log", "config=mfaguard.yaml"])
def test_doctor_fails_a_relative_path_on_an_mfaguard_line(mfa: Mfa, pam_copy: Path, option: str) -> None:
    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)).returncode == 0
    text = (pam_copy / "sudo").read_text()
    line = next(x for x in text.splitlines() if "pam_mfaguard.py" in x)
    (pam_copy / "sudo").write_text(text.replace(line, f"{line} {option}", 1))
    findings = [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sudo"]
    assert any(f["level"] == "fail" and "relative path" in f["text"] for f in findings), findings


def test_install_refuses_a_stack_whose_jump_would_land_on_its_lines(mfa: Mfa, pam_copy: Path) -> None:
    # The fault: a jump over the password include landed, after install, on mfaguard's after-key code
    # line, so a login without a key needed only the code; doctor saw it, install did not.
    mfa.enroll("root")
    before = (pam_copy / "sshd").read_text()
    jumped = before.replace(
        "@include common-auth",
        "auth [success=1 default=ignore] pam_succeed_if.so quiet user = nobody\n@include common-auth",
        1,
    )
    assert jumped != before
    (pam_copy / "sshd").write_text(jumped)
    r = admin(mfa, "pam", "install", "--service", "sshd", "--pam-dir", str(pam_copy))
    assert r.returncode == 5 and "would still be unsafe" in r.stderr, r
    assert (pam_copy / "sshd").read_text() == jumped
    assert not (pam_copy / "sshd.mfaguard-orig").exists()
