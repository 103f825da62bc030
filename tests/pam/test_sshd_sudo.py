"""The PAM module behind a real sshd on 127.0.0.1 and behind real sudo.

sshd takes its PAM service name from the basename it was started as, so each
server runs through a symlink named after its own test service.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from pam_helpers import (
    ENTRY_FILE,
    PAM_D,
    SUDOERS_D,
    Mfa,
    SystemUser,
    free_port,
    require,
    totp_code,
    wait_for_fresh_step,
)

pytestmark = pytest.mark.slow

SSHD = "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def sshd_binary() -> str:
    require(os.path.exists(SSHD), f"{SSHD} missing: apt-get install openssh-server")
    return SSHD


@dataclass
class Sshd:
    port: int
    service: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def sshd(tmp_path: Path, mfa: Mfa, sshd_binary: str) -> Iterator[Callable[[str, list[str]], Sshd]]:
    """Start sshd instances with a given AuthenticationMethods and PAM auth lines."""
    started: list[Sshd] = []
    created_run_sshd = False
    if not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755)
        created_run_sshd = True
    pam_files: list[Path] = []

    def start(methods: str, auth_lines: list[str]) -> Sshd:
        service = f"mfaguard-test-sshd-{secrets.token_hex(3)}"
        folder = tmp_path / service
        folder.mkdir(mode=0o700)
        pam_file = PAM_D / service
        pam_file.write_text(
            "\n".join(
                [
                    *auth_lines,
                    "account required pam_unix.so",
                    mfa.pam_line("account"),
                    "session required pam_permit.so",
                    "password required pam_deny.so",
                ]
            )
            + "\n"
        )
        pam_files.append(pam_file)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "hostkey")], check=True)
        port = free_port()
        config = folder / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder}/hostkey\nPidFile {folder}/sshd.pid\n"
            "UsePAM yes\nKbdInteractiveAuthentication yes\nPasswordAuthentication no\nPubkeyAuthentication yes\n"
            f"AuthenticationMethods {methods}\nPermitRootLogin no\nStrictModes yes\nLogLevel VERBOSE\n"
            "MaxAuthTries 6\nUseDNS no\n"
        )
        link = folder / service
        link.symlink_to(SSHD)
        log = folder / "sshd.log"
        process = subprocess.Popen(
            [str(link), "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log.open("wb")
        )
        server = Sshd(port, service, process, log)
        started.append(server)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"sshd exited: {log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return server
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"sshd did not listen: {log.read_text()}")

    yield start
    for server in started:
        server.process.terminate()  # our own PID only
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    for pam_file in pam_files:
        pam_file.unlink(missing_ok=True)
    if created_run_sshd:
        shutil.rmtree("/run/sshd", ignore_errors=True)


def ssh_login(
    port: int, user: str, answers: dict[str, str], key: paramiko.PKey | None = None, command: str = "id -un"
) -> str:
    """Log in with paramiko (publickey first if a key is given, then keyboard-interactive) and run a command."""
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.start_client(timeout=15)
        remaining = transport.auth_publickey(user, key) if key is not None else ["keyboard-interactive"]
        if remaining:

            def handler(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
                out = []
                for prompt, _echo in prompts:
                    matches = [v for k, v in answers.items() if k.lower() in prompt.lower()]
                    if not matches:
                        raise AssertionError(f"unexpected prompt {prompt!r}")
                    out.append(matches[0])
                return out

            transport.auth_interactive(user, handler)
        channel = transport.open_session(timeout=15)
        channel.exec_command(command)
        output = channel.makefile("r").read().decode()
        channel.recv_exit_status()
        return output.strip()
    finally:
        transport.close()


def pam_auth_lines(mfa: Mfa, *, password: bool) -> list[str]:
    return (["auth required pam_unix.so"] if password else []) + [mfa.pam_line("auth")]


def test_password_and_code_log_in_wrong_code_does_not(
    mfa: Mfa, sshd: Callable[[str, list[str]], Sshd], system_user: Callable[[], SystemUser]
) -> None:
    user = system_user()
    secret = mfa.enroll(user.name)
    server = sshd("keyboard-interactive", pam_auth_lines(mfa, password=True))
    wait_for_fresh_step(8)
    right = totp_code(secret)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(server.port, user.name, {"password": user.password, "verification code": wrong})
    assert ssh_login(server.port, user.name, {"password": user.password, "verification code": right}) == user.name
    rows = [r for r in mfa.audit(user.name) if r.event == "auth"]
    assert "accepted" in [r.reason for r in rows]
    assert "bad code" in [r.reason for r in rows]
    accepted = next(r for r in rows if r.reason == "accepted")
    assert accepted.service == server.service
    assert accepted.source == "127.0.0.1"


def test_publickey_and_code_work_publickey_only_is_denied(
    tmp_path: Path, mfa: Mfa, sshd: Callable[[str, list[str]], Sshd], system_user: Callable[[], SystemUser]
) -> None:
    user = system_user()
    secret = mfa.enroll(user.name)
    key = paramiko.Ed25519Key.from_private_key_file(str(make_user_key(tmp_path, user)))
    both = sshd("publickey,keyboard-interactive", pam_auth_lines(mfa, password=False))
    only_key = sshd("publickey", pam_auth_lines(mfa, password=False))
    wait_for_fresh_step(8)
    assert ssh_login(both.port, user.name, {"verification code": totp_code(secret)}, key=key) == user.name
    # publickey alone never reaches the mfaguard prompt: the account phase must refuse it.
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(only_key.port, user.name, {}, key=key)
    reasons = [r.reason for r in mfa.audit(user.name) if r.service == only_key.service]
    assert "account: this login did not pass the second factor" in reasons


def make_user_key(tmp_path: Path, user: SystemUser) -> Path:
    key_file = tmp_path / f"{user.name}_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)], check=True)
    ssh_dir = user.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(key_file.with_suffix(".pub").read_text())
    os.chmod(authorized, 0o600)
    shutil.chown(ssh_dir, user.name, user.name)
    shutil.chown(authorized, user.name, user.name)
    return key_file


@pytest.fixture
def sudo_for(mfa: Mfa) -> Iterator[Callable[[SystemUser], str]]:
    """A test PAM stack for sudo, selected for one user by a sudoers.d line. Both removed afterwards."""
    require(shutil.which("sudo") is not None, "sudo missing: apt-get install sudo")
    require(shutil.which("visudo") is not None, "visudo missing: apt-get install sudo")
    made: list[Path] = []

    def setup(user: SystemUser) -> str:
        service = f"mfaguard-test-sudo-{secrets.token_hex(3)}"
        pam_file = PAM_D / service
        pam_file.write_text(
            "\n".join(
                [
                    "auth required pam_unix.so",
                    mfa.pam_line("auth"),
                    "account required pam_unix.so",
                    mfa.pam_line("account"),
                    "session required pam_permit.so",
                ]
            )
            + "\n"
        )
        made.append(pam_file)
        sudoers = SUDOERS_D / service
        candidate = sudoers.with_name(f".{service}.tmp")
        candidate.write_text(
            f"Defaults:{user.name} pam_service={service}\n"
            f"Defaults:{user.name} timestamp_timeout=0\n"
            f"Defaults:{user.name} !lecture\n"
            f"{user.name} ALL=(root) /usr/bin/id\n"
        )
        made.append(candidate)
        os.chmod(candidate, 0o440)
        subprocess.run(["visudo", "-c", "-q", "-f", str(candidate)], check=True)
        os.replace(candidate, sudoers)
        made.append(sudoers)
        return service

    yield setup
    for path in made:
        path.unlink(missing_ok=True)


def run_sudo(user: SystemUser, answers: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user.name, "--", "sudo", "-S", "-k", "-p", "password for sudo: ", "/usr/bin/id", "-u"],
        input="".join(a + "\n" for a in answers),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
    )


def test_sudo_needs_password_and_code(
    mfa: Mfa, sudo_for: Callable[[SystemUser], str], system_user: Callable[[], SystemUser]
) -> None:
    user = system_user()
    secret = mfa.enroll(user.name)
    service = sudo_for(user)
    wait_for_fresh_step()
    right = totp_code(secret)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    r = run_sudo(user, [user.password, wrong, wrong, wrong])
    assert r.returncode != 0, r
    assert r.stdout.strip() != "0"
    r = run_sudo(user, [user.password, right])
    assert r.returncode == 0, r
    assert r.stdout.strip() == "0"
    accepted = [row for row in mfa.audit(user.name) if row.reason == "accepted"]
    assert accepted and accepted[-1].service == service
    # The invoking user's devices count, and the audit row names who ran sudo.
    assert accepted[-1].user == user.name
    assert accepted[-1].detail.get("ruser") == user.name


def test_code_used_over_ssh_is_rejected_by_sudo(
    mfa: Mfa,
    sshd: Callable[[str, list[str]], Sshd],
    sudo_for: Callable[[SystemUser], str],
    system_user: Callable[[], SystemUser],
) -> None:
    user = system_user()
    secret = mfa.enroll(user.name)
    server = sshd("keyboard-interactive", pam_auth_lines(mfa, password=True))
    sudo_for(user)
    wait_for_fresh_step(10)
    code = totp_code(secret)
    assert ssh_login(server.port, user.name, {"password": user.password, "verification code": code}) == user.name
    r = run_sudo(user, [user.password, code])
    assert r.returncode != 0, r
    reasons = [row.reason for row in mfa.audit(user.name) if row.event == "auth"]
    assert reasons.count("accepted") == 1
    assert "replay: code already used" in reasons[reasons.index("accepted") :]


def test_entry_file_is_the_one_under_test() -> None:
    assert ENTRY_FILE.is_file()
