"""`mfa-admin pam install|uninstall` and `mfa-admin doctor` on copies of Debian's real PAM files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pam_helpers import PAM_D, Mfa, SystemUser, pamtester, require, totp_code, wait_for_fresh_step

MFA_ADMIN = str(Path(sys.executable).parent / "mfa-admin")


@pytest.fixture
def pam_copy(tmp_path: Path) -> Path:
    """A copy of the host's PAM folder: the files `pam install` edits, for real, but not in /etc."""
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
        shutil.copy(source, folder / name)
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
    original = (pam_copy / "sudo").read_bytes()
    r = admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy))
    assert r.returncode == 0, r
    lines = (pam_copy / "sudo").read_text().splitlines()
    auth_at = next(i for i, line in enumerate(lines) if line.startswith("auth") and "pam_mfaguard.py" in line)
    assert lines.index("@include common-auth") < auth_at
    acct_at = next(i for i, line in enumerate(lines) if line.startswith("account") and "pam_mfaguard.py" in line)
    assert lines.index("@include common-account") < acct_at
    assert (pam_copy / "sudo.mfaguard-orig").read_bytes() == original
    again = admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy))
    assert again.returncode == 5 and "already" in again.stderr
    r = admin(mfa, "pam", "uninstall", "--service", "sudo", "--pam-dir", str(pam_copy))
    assert r.returncode == 0, r
    assert (pam_copy / "sudo").read_bytes() == original
    assert not (pam_copy / "sudo.mfaguard-orig").exists()


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
    return json.loads(r.stdout)


def test_doctor_finds_missing_and_bypassable_stacks(mfa: Mfa, pam_copy: Path) -> None:
    findings = doctor(mfa, pam_copy)
    sudo = [f for f in findings if f["topic"] == "PAM sudo"]
    assert {f["level"] for f in sudo} == {"fail"}
    assert all("mfa-admin pam install --service sudo" in f["fix"] for f in sudo)
    assert any(f["topic"] == "coverage" and "root" in f["text"] and f["level"] == "fail" for f in findings)

    mfa.enroll("root")
    assert admin(mfa, "pam", "install", "--service", "sudo", "--pam-dir", str(pam_copy)).returncode == 0
    sudo = [f for f in doctor(mfa, pam_copy) if f["topic"] == "PAM sudo"]
    assert [f["level"] for f in sudo] == ["ok", "ok"]
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
