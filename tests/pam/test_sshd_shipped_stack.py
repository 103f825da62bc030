"""The SHIPPED sshd stack (config/pam.d/sshd) and sshd fragment (config/sshd_config.d/mfaguard.conf)
behind a real sshd on 127.0.0.1, driven by paramiko.

The PAM file is config/pam.d/sshd itself with only its paths replaced and `@include common-auth`
pointed at a test password stack shaped like Debian's common-auth (pam_unix, for a test user
whose password chpasswd set). So the publickey check, the code line after it, the password and
the code line after the password are all as shipped, and sshd runs with
`AuthenticationMethods publickey,keyboard-interactive keyboard-interactive` from the fragment.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from pam_helpers import (
    ENTRY_FILE,
    PAM_D,
    REPO,
    Mfa,
    SystemUser,
    free_port,
    require,
    totp_code,
    wait_for_fresh_step,
)

from pam_module.publickey_check import publickey_completed

pytestmark = pytest.mark.slow

SSHD = "/usr/sbin/sshd"
SHIPPED_PAM = REPO / "config" / "pam.d" / "sshd"
FRAGMENT = REPO / "config" / "sshd_config.d" / "mfaguard.conf"
PASSWORD_PROMPT = "Password: "
CODE_PROMPT = "Verification code: "
# Debian's common-auth, without the optional pam_cap line.
PASSWORD_STACK = (
    "auth [success=1 default=ignore] pam_unix.so nullok\nauth requisite pam_deny.so\nauth required pam_permit.so\n"
)


@dataclass
class Sshd:
    port: int
    service: str
    pam_file: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def shipped_pam_stack(mfa: Mfa, password_service: str) -> str:
    """config/pam.d/sshd with this test's paths and its password stack in place of common-auth."""
    text = SHIPPED_PAM.read_text()
    for shipped, here in (
        ("/opt/mfaguard/pam_module/pam_mfaguard.py", str(ENTRY_FILE)),
        ("venv=/opt/mfaguard/.venv", f"venv={sys.prefix}"),
        ("config=/etc/mfaguard/mfaguard.yaml", f"config={mfa.config} log={mfa.log}"),
        ("check=publickey-used", f"check=publickey-used log={mfa.log}"),
        ("\n@include common-auth\n", f"\n@include {password_service}\n"),
    ):
        assert shipped in text, f"{SHIPPED_PAM} no longer holds {shipped.strip()!r}"
        text = text.replace(shipped, here)
    return text


@pytest.fixture
def sshd(tmp_path: Path, mfa: Mfa) -> Iterator[Callable[..., Sshd]]:
    """Start sshd instances on 127.0.0.1 (free ports) running the shipped PAM stack and fragment.
    Each runs through a symlink named after its own PAM service. The sshd processes (by PID), the
    PAM files and /run/sshd (if we made it) are removed afterwards."""
    require(os.path.exists(SSHD), f"{SSHD} missing: apt-get install openssh-server")
    processes: list[subprocess.Popen[bytes]] = []
    pam_files: list[Path] = []
    created_run_sshd = False
    if not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755)
        created_run_sshd = True

    def start(
        *, extra_sshd: str = "", first_auth_lines: str = "", pam_text: Callable[[str], str] | None = None
    ) -> Sshd:
        """``pam_text``, given the password stack's service name, writes the PAM file instead of the
        shipped one."""
        tag = secrets.token_hex(3)
        service = f"mfaguard-test-sshd-shipped-{tag}"
        password_service = f"mfaguard-test-password-{tag}"
        folder = tmp_path / service
        folder.mkdir(mode=0o700)
        for name, text in (
            (password_service, PASSWORD_STACK),
            (
                service,
                first_auth_lines
                + (pam_text(password_service) if pam_text else shipped_pam_stack(mfa, password_service)),
            ),
        ):
            path = PAM_D / name
            pam_files.append(path)
            path.write_text(text)
            os.chmod(path, 0o644)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "hostkey")], check=True)
        port = free_port()
        config = folder / "sshd_config"
        # sshd keeps the first value it reads for an option: `extra_sshd` first, then the shipped fragment.
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder}/hostkey\nPidFile {folder}/sshd.pid\n"
            "PubkeyAuthentication yes\nPermitRootLogin no\nStrictModes yes\nLogLevel VERBOSE\n"
            f"MaxAuthTries 6\nUseDNS no\n{extra_sshd}\n{FRAGMENT.read_text()}"
        )
        link = folder / service
        link.symlink_to(SSHD)
        log = folder / "sshd.log"
        process = subprocess.Popen(
            [str(link), "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log.open("wb")
        )
        processes.append(process)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"sshd exited: {log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return Sshd(port, service, PAM_D / service, log)
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"sshd did not listen: {log.read_text()}")

    yield start
    for process in processes:
        process.terminate()  # our own PID only
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for path in pam_files:
        path.unlink(missing_ok=True)
    if created_run_sshd:
        shutil.rmtree("/run/sshd", ignore_errors=True)


@dataclass
class Login:
    output: str | None  # the command's output, None if the login was refused
    prompts: list[str]  # every keyboard-interactive prompt sshd sent, in order


def ssh_login(
    port: int,
    user: str,
    answers: dict[str, str],
    *,
    key: paramiko.PKey | None = None,
    command: str = "id -un",
    environment: dict[str, str] | None = None,
) -> Login:
    """paramiko: publickey first if a key is given, then keyboard-interactive answering each prompt
    from `answers` (by a case-insensitive part of the prompt; an unknown prompt gets an empty answer),
    then `command` with `environment` sent as SSH env requests."""
    prompts: list[str] = []

    def handler(title: str, instructions: str, asked: list[tuple[str, bool]]) -> list[str]:
        out = []
        for prompt, _echo in asked:
            prompts.append(prompt)
            out.append(next((v for k, v in answers.items() if k.lower() in prompt.lower()), ""))
        return out

    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.start_client(timeout=15)
        if key is not None:
            remaining = transport.auth_publickey(user, key)
            assert remaining == ["keyboard-interactive"], remaining  # a partial success: the code is still due
        try:
            transport.auth_interactive(user, handler)
        except paramiko.AuthenticationException:
            return Login(None, prompts)
        channel = transport.open_session(timeout=15)
        if environment:
            channel.update_environment(environment)
        channel.exec_command(command)
        output = channel.makefile("r").read().decode()
        channel.recv_exit_status()
        return Login(output.strip(), prompts)
    finally:
        transport.close()


def make_user_key(tmp_path: Path, user: SystemUser) -> paramiko.Ed25519Key:
    key_file = tmp_path / f"{user.name}_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)], check=True)
    ssh_dir = user.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(key_file.with_suffix(".pub").read_text())
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    shutil.chown(ssh_dir, user.name, user.name)
    shutil.chown(ssh_dir / "authorized_keys", user.name, user.name)
    return paramiko.Ed25519Key.from_private_key_file(str(key_file))


def other(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def auth_reasons(mfa: Mfa, user: str, service: str) -> list[str]:
    return [r.reason for r in mfa.audit(user) if r.event == "auth" and r.service == service]


def test_key_then_only_the_code(
    tmp_path: Path, mfa: Mfa, sshd: Callable[..., Sshd], system_user: Callable[[], SystemUser]
) -> None:
    user = system_user()
    secret = mfa.enroll(user.name)
    key = make_user_key(tmp_path, user)
    server = sshd()
    wait_for_fresh_step(10)
    right = totp_code(secret)

    refused = ssh_login(server.port, user.name, {"verification code": other(right), "password": user.password}, key=key)
    assert refused.output is None
    assert all("password" not in p.lower() for p in refused.prompts), refused.prompts
    assert refused.prompts[0] == CODE_PROMPT and len(refused.prompts) == 3  # tries=3, then the stack ends

    login = ssh_login(server.port, user.name, {"verification code": right, "password": user.password}, key=key)
    assert login.output == user.name, server.log_text()
    assert login.prompts == [CODE_PROMPT]  # the key, then the code: no Unix password
    log = server.log_text()
    assert re.search(rf"Partial publickey for {user.name} from 127\.0\.0\.1 .*ED25519 ", log), log
    assert f"Accepted keyboard-interactive/pam for {user.name}" in log
    assert auth_reasons(mfa, user.name, server.service) == ["bad code"] * 3 + ["accepted"]
    assert "a key was used; the password is not asked" in mfa.log.read_text()


def test_password_then_code_without_a_key(
    mfa: Mfa, sshd: Callable[..., Sshd], system_user: Callable[[], SystemUser]
) -> None:
    user = system_user()
    secret = mfa.enroll(user.name)
    server = sshd()
    wait_for_fresh_step(12)
    right = totp_code(secret)

    # A wrong password ends the stack before the code prompt (the password is @included, not a
    # substack): the code is neither asked nor used up, nor is a failure counted against the user.
    wrong_password = ssh_login(server.port, user.name, {"password": "not-" + user.password, "verification code": right})
    assert wrong_password.output is None
    assert wrong_password.prompts == [PASSWORD_PROMPT]
    assert auth_reasons(mfa, user.name, server.service) == []

    wrong_code = ssh_login(server.port, user.name, {"password": user.password, "verification code": other(right)})
    assert wrong_code.output is None
    assert wrong_code.prompts[:2] == [PASSWORD_PROMPT, CODE_PROMPT]

    login = ssh_login(server.port, user.name, {"password": user.password, "verification code": right})
    assert login.output == user.name, server.log_text()
    assert login.prompts == [PASSWORD_PROMPT, CODE_PROMPT]
    assert auth_reasons(mfa, user.name, server.service)[-1] == "accepted"
    assert "no publickey method in SSH_AUTH_INFO_0; the password is asked" in mfa.log.read_text()


def test_exempt_user_with_a_key_goes_on_to_the_password(
    tmp_path: Path, mfa: Mfa, sshd: Callable[..., Sshd], system_user: Callable[[], SystemUser]
) -> None:
    """The code line after the key answers PAM_IGNORE for an exempt user: that neither logs in on the
    key alone nor refuses, the stack goes on to the password (and the code line after it ignores too)."""
    user = system_user()
    mfa.write_config(f"enforcement:\n  exempt_users: [{user.name}]\n")
    key = make_user_key(tmp_path, user)
    server = sshd()
    refused = ssh_login(server.port, user.name, {"password": "not-" + user.password}, key=key)
    assert refused.output is None and refused.prompts == [PASSWORD_PROMPT]
    login = ssh_login(server.port, user.name, {"password": user.password}, key=key)
    assert login.output == user.name, server.log_text()
    assert login.prompts == [PASSWORD_PROMPT]


def forged_auth_info() -> str:
    """What SSH_AUTH_INFO_0 holds after a publickey login with some ed25519 key (not the user's)."""
    blob = b"".join(len(part).to_bytes(4, "big") + part for part in (b"ssh-ed25519", secrets.token_bytes(32)))
    return f"publickey ssh-ed25519 {base64.b64encode(blob).decode()}\n"


def test_a_user_cannot_forge_ssh_auth_info(
    mfa: Mfa, sshd: Callable[..., Sshd], system_user: Callable[[], SystemUser]
) -> None:
    """Two ways a user can put variables into an SSH login's environment, both tried with a value the
    check would take for a key login (publickey_completed is True for it):

    - ~/.pam_environment, read by `pam_env user_readenv=1`, here in the auth stack before the check
      (doctor fails that line, but it is tried anyway). pam_env's auth function does nothing; it reads
      the file in pam_setcred, after authentication has been decided, and sshd sets SSH_AUTH_INFO_0
      itself right before it runs the auth stack.
    - SSH env requests, with `AcceptEnv SSH_AUTH_INFO_0`: they are channel requests, which sshd takes
      only after authentication, and they go into the session's environment, not PAM's.

    Either way the login without a key is still asked for the password."""
    forged = forged_auth_info()
    assert publickey_completed(forged)
    user = system_user()
    secret = mfa.enroll(user.name)
    env_file = user.home / ".pam_environment"
    env_file.write_text(f'SSH_AUTH_INFO_0 DEFAULT="{forged.strip()}"\nMFAGUARD_TEST_MARK DEFAULT=read\n')
    shutil.chown(env_file, user.name, user.name)
    server = sshd(
        extra_sshd="AcceptEnv SSH_AUTH_INFO_0 MFAGUARD_TEST_SENT\n",
        first_auth_lines="auth required pam_env.so user_readenv=1\n",
    )
    wait_for_fresh_step(10)
    right = totp_code(secret)

    no_password = ssh_login(server.port, user.name, {"verification code": right})
    assert no_password.output is None
    assert no_password.prompts == [PASSWORD_PROMPT]  # the forged value did not skip the password

    login = ssh_login(
        server.port,
        user.name,
        {"password": user.password, "verification code": right},
        command='printf \'%s|%s|\' "$MFAGUARD_TEST_MARK" "$MFAGUARD_TEST_SENT"',
        environment={"SSH_AUTH_INFO_0": forged, "MFAGUARD_TEST_SENT": "sent"},
    )
    assert login.prompts == [PASSWORD_PROMPT, CODE_PROMPT]
    # Both paths were open (pam_env read the file, sshd accepted the env request), only too late.
    assert login.output == "read|sent|", server.log_text()
    assert "no publickey method in SSH_AUTH_INFO_0" in mfa.log.read_text()


def test_no_channel_request_before_authentication(
    mfa: Mfa, sshd: Callable[..., Sshd], system_user: Callable[[], SystemUser]
) -> None:
    """An env request needs a session channel; sshd opens none before the user is authenticated."""
    user = system_user()
    server = sshd(extra_sshd="AcceptEnv SSH_AUTH_INFO_0\n")
    transport = paramiko.Transport(("127.0.0.1", server.port))
    try:
        transport.start_client(timeout=15)
        with pytest.raises(paramiko.SSHException):
            channel = transport.open_session(timeout=10)
            channel.update_environment({"SSH_AUTH_INFO_0": forged_auth_info()})
    finally:
        transport.close()
    assert user.name  # the user exists; nothing authenticated it


def test_pam_install_around_auth_include_behind_a_real_sshd(
    tmp_path: Path, mfa: Mfa, sshd: Callable[..., Sshd], system_user: Callable[[], SystemUser]
) -> None:
    """`mfa-admin pam install --service sshd` on Debian's stack with the password written as
    `auth include common-auth`: it used to add no publickey check (a key login was asked for the
    password too). Now the check goes in front of the include: a key, then only the code; no key, the
    password, then the code."""
    pam_dir = tmp_path / "pam.d"
    pam_dir.mkdir()
    for name in ("sshd", "common-auth", "common-account"):
        kept = PAM_D / f"{name}.mfaguard-orig"
        require((PAM_D / name).is_file(), f"{PAM_D / name} missing: apt-get install openssh-server")
        shutil.copy(kept if kept.is_file() else PAM_D / name, pam_dir / name)
    debian = (pam_dir / "sshd").read_text()
    require("\n@include common-auth\n" in debian, "Debian's sshd stack includes common-auth")
    (pam_dir / "sshd").write_text(debian.replace("\n@include common-auth\n", "\nauth include common-auth\n"))
    mfa.enroll("root")
    admin = str(Path(sys.executable).parent / "mfa-admin")
    r = subprocess.run(
        [admin, "--config", str(mfa.config), "pam", "install", "--service", "sshd", "--pam-dir", str(pam_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r
    installed = (pam_dir / "sshd").read_text()
    assert "check=publickey-used" in installed
    user, other_user = system_user(), system_user()
    secret, other_secret = mfa.enroll(user.name), mfa.enroll(other_user.name)
    key = make_user_key(tmp_path, user)
    server = sshd(pam_text=lambda password: installed.replace("auth include common-auth", f"auth include {password}"))
    wait_for_fresh_step(12)
    right, other_code = totp_code(secret), totp_code(other_secret)
    login = ssh_login(server.port, user.name, {"verification code": right, "password": user.password}, key=key)
    assert login.output == user.name, server.log_text()
    assert login.prompts == [CODE_PROMPT]
    login = ssh_login(server.port, other_user.name, {"password": other_user.password, "verification code": other_code})
    assert login.output == other_user.name, server.log_text()
    assert login.prompts == [PASSWORD_PROMPT, CODE_PROMPT]
