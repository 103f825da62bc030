"""Fixtures for the PAM front end's system tests: the real PAM stack, pamtester, sshd and sudo.

These tests need root and Debian's libpam-python, pamtester, openssh-server and sudo
(scripts/setup-env installs them). Without them a developer's run skips with the reason;
with CI=true it fails instead. Everything a test creates (PAM service files, sudoers
files, users, processes) is removed by the fixture that created it; processes are
stopped by their own PID only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pam_helpers import PAM_D, PAM_PYTHON, Mfa, SystemUser, require, unique


@pytest.fixture(scope="session")
def pam_stack() -> None:
    require(os.geteuid() == 0, "PAM system tests need root")
    require(os.path.exists(PAM_PYTHON), f"{PAM_PYTHON} missing: apt-get install libpam-python")
    require(shutil.which("pamtester") is not None, "pamtester missing: apt-get install pamtester")


@pytest.fixture
def mfa(tmp_path: Path, pam_stack: None) -> Mfa:
    return Mfa(tmp_path / "mfa")


@pytest.fixture
def pam_service() -> Iterator[Callable[[list[str], str], str]]:
    """Write /etc/pam.d/<unique name> with the given lines; removed afterwards."""
    created: list[Path] = []

    def make(lines: list[str], prefix: str = "mfaguard-test-") -> str:
        name = unique(prefix)
        path = PAM_D / name
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o644)
        created.append(path)
        return name

    yield make
    for path in created:
        path.unlink(missing_ok=True)


@pytest.fixture
def system_user() -> Iterator[Callable[[], SystemUser]]:
    """Create local users with a password and a home; each is deleted afterwards."""
    made: list[SystemUser] = []

    def make() -> SystemUser:
        name = unique("mfgt")
        password = secrets.token_urlsafe(12)
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        made.append(SystemUser(name, password, Path("/home") / name))
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        return made[-1]

    yield make
    for user in made:
        subprocess.run(["pkill", "-KILL", "-u", user.name], check=False)
        subprocess.run(["userdel", "-r", "-f", user.name], check=False, capture_output=True)
