"""OpenSSH security keys against a real sshd on 127.0.0.1, end to end.

The client is asyncssh, which signs sk-ecdsa-sha2-nistp256@openssh.com through the fido2
package's CTAP2 client (``asyncssh.sk``: ``Ctap2.make_credential`` / ``Ctap2.get_assertions``).
No USB or HID device can exist here (no /dev/uhid), so the one thing these tests replace is
the USB transport: ``asyncssh.sk.CtapHidDevice.list_devices`` yields
``tests/soft_authenticator.SoftAuthenticator``, a CTAP2 authenticator behind fido2's
``CtapDevice``. Key generation (CTAP2 makeCredential for application ``ssh:``), signing
(getAssertion over the SSH session's data, with its flags and counter), the SSH protocol and
sshd's verification of the security-key signature (its user-presence and user-verification
flags included) are all real, and so are ``mfa-admin enroll ssh-key``, ``mfa-admin
authorized-keys %u`` run by sshd as its AuthorizedKeysCommand, ``mfa-admin devices
disable|enable``, the PAM module under pam_python and the SSH_AUTH_INFO_0 sshd hands to it.

sshd runs the shipped ``config/sshd_config.d/mfaguard.conf``, with its AuthorizedKeysCommand
lines uncommented and pointed at this venv and the test's settings file.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pam_helpers import PAM_D, REPO, Mfa, SystemUser, free_port, require, totp_code, wait_for_fresh_step
from soft_authenticator import SoftAuthenticator

try:
    import asyncssh
    import asyncssh.sk as asyncssh_sk
except ImportError:  # the test extra installs it; `require` below fails under CI without it
    asyncssh = None
    asyncssh_sk = None

pytestmark = pytest.mark.slow

SSHD = "/usr/sbin/sshd"
MFA_ADMIN = Path(sys.prefix) / "bin" / "mfa-admin"
FRAGMENT = REPO / "config" / "sshd_config.d" / "mfaguard.conf"
SK_ECDSA = "sk-ecdsa-sha2-nistp256@openssh.com"
CODE_PROMPT = "Verification code: "
SK_FACTOR = "accepted: ssh security key"


# -- the security key: asyncssh's real fido2 code over a software authenticator -------------------------


@pytest.fixture
def soft_key(monkeypatch: pytest.MonkeyPatch) -> SoftAuthenticator:
    """A SoftAuthenticator that asyncssh finds where it would enumerate USB HID security keys.

    Only the transport is replaced: asyncssh.sk still drives it through fido2's Ctap2 class."""
    require(asyncssh is not None, "asyncssh missing: scripts/setup-env --test (the test extra) installs it")
    require(asyncssh_sk.sk_available, "asyncssh's security-key support did not load (fido2 missing)")
    require(not asyncssh_sk.sk_use_webauthn, "asyncssh would use the Windows WebAuthn API here")
    authenticator = SoftAuthenticator()

    class SoftHid:
        """Stands in for fido2.hid.CtapHidDevice inside asyncssh.sk: the 'attached' keys."""

        @staticmethod
        def list_devices() -> Iterator[SoftAuthenticator]:
            return iter([authenticator])

    monkeypatch.setattr(asyncssh_sk, "CtapHidDevice", SoftHid)
    return authenticator


def make_sk_key(folder: Path, name: str, *, touch_required: bool = True, options: str = "") -> tuple[Any, Path]:
    """A new sk-ecdsa key made on the soft authenticator for application "ssh:", and its .pub file
    (with authorized_keys options in front, as `mfa-admin enroll ssh-key` accepts them)."""
    key = asyncssh.generate_private_key(SK_ECDSA, comment=name, application="ssh:", touch_required=touch_required)
    pub = folder / f"{name}.pub"
    pub.write_text((f"{options} " if options else "") + key.export_public_key().decode())
    return key, pub


# -- mfa-admin, the real command --------------------------------------------------------------------------


def mfa_admin(mfa: Mfa, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MFA_ADMIN), "--config", str(mfa.config), *args], capture_output=True, text=True, timeout=60
    )


def enroll_sk(mfa: Mfa, user: str, pub: Path) -> int:
    r = mfa_admin(mfa, "enroll", "ssh-key", user, str(pub))
    assert r.returncode == 0, r
    match = re.search(r"Device (\d+) ", r.stdout)
    assert match, r.stdout
    return int(match.group(1))


def authorized_keys(mfa: Mfa, user: str) -> list[str]:
    r = mfa_admin(mfa, "authorized-keys", user)
    assert r.returncode == 0, r
    return r.stdout.splitlines()


def key_blob(pub: Path) -> str:
    words = pub.read_text().split()
    return words[words.index(SK_ECDSA) + 1]


# -- sshd with the shipped fragment ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def command_path() -> Iterator[Path]:
    """Where sshd runs the AuthorizedKeysCommand from: a root-owned 0755 folder under /run holding a
    wrapper that execs the venv's real mfa-admin. sshd refuses a command with any folder above it that
    is not root-owned or is group- or world-writable, and a checkout (CI's included) may live under /tmp."""
    require(os.geteuid() == 0, "needs root (sshd, PAM files, test users)")
    folder = Path(tempfile.mkdtemp(prefix="mfaguard-test-akc-", dir="/run"))
    try:
        os.chmod(folder, 0o755)  # noqa: S103 - sshd needs to traverse it; root-owned, not writable
        wrapper = folder / "mfa-admin"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(str(MFA_ADMIN))} "$@"\n')
        os.chmod(wrapper, 0o755)  # noqa: S103 - executable, not writable
        yield wrapper
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def shipped_fragment(mfa: Mfa, command: Path) -> str:
    """config/sshd_config.d/mfaguard.conf with its AuthorizedKeysCommand lines turned on for this test."""
    text = FRAGMENT.read_text()
    for line in ("#AuthorizedKeysCommand ", "#AuthorizedKeysCommandUser "):
        assert f"\n{line}" in text, f"{FRAGMENT} no longer has a commented {line.strip('# ')} line"
        text = text.replace(f"\n{line}", f"\n{line[1:]}")
    for shipped, here in (
        ("/opt/mfaguard/.venv/bin/mfa-admin", str(command)),
        ("/etc/mfaguard/mfaguard.yaml", str(mfa.config)),
    ):
        assert shipped in text, f"{FRAGMENT}: expected {shipped} in its AuthorizedKeysCommand line"
        text = text.replace(shipped, here)
    return text


@dataclass
class Sshd:
    port: int
    service: str
    config: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def sshd(tmp_path: Path, mfa: Mfa, command_path: Path) -> Iterator[Callable[..., Sshd]]:
    """Start real sshd instances on 127.0.0.1 (free ports), each through a symlink named after its own
    PAM service: the key is the first factor, mfaguard's auth line the second, mfaguard's account line
    after pam_unix. sshd, its PAM file and /run/sshd (if we made it) are removed afterwards."""
    require(os.path.exists(SSHD), f"{SSHD} missing: apt-get install openssh-server")
    require(MFA_ADMIN.is_file(), f"{MFA_ADMIN} missing: scripts/setup-env installs mfaguard into the venv")
    processes: list[subprocess.Popen[bytes]] = []
    pam_files: list[Path] = []
    created_run_sshd = False
    if not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755)
        created_run_sshd = True

    def start(extra: str = "") -> Sshd:
        service = f"mfaguard-test-sshd-sk-{secrets.token_hex(3)}"
        folder = tmp_path / service
        folder.mkdir(mode=0o700)
        pam_file = PAM_D / service
        pam_files.append(pam_file)
        pam_file.write_text(
            "\n".join(
                [
                    mfa.pam_line("auth"),
                    "account required pam_unix.so",
                    mfa.pam_line("account"),
                    "session required pam_permit.so",
                    "password required pam_deny.so",
                ]
            )
            + "\n"
        )
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "hostkey")], check=True)
        port = free_port()
        config = folder / "sshd_config"
        # sshd keeps the first value it reads for an option: `extra` overrides, then the shipped fragment.
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder}/hostkey\nPidFile {folder}/sshd.pid\n"
            "PubkeyAuthentication yes\nPermitRootLogin no\nStrictModes yes\nLogLevel VERBOSE\n"
            f"MaxAuthTries 6\nUseDNS no\n{extra}\n{shipped_fragment(mfa, command_path)}"
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
                    return Sshd(port, service, config, log)
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
    for pam_file in pam_files:
        pam_file.unlink(missing_ok=True)
    if created_run_sshd:
        shutil.rmtree("/run/sshd", ignore_errors=True)


# -- the client ----------------------------------------------------------------------------------------


@dataclass
class Login:
    output: str | None  # `id -un` on the server, None if the login was refused
    prompts: list[str]  # every keyboard-interactive prompt the server sent


def ssh_login(port: int, user: str, key: Any, answers: dict[str, str] | None = None) -> Login:
    """asyncssh: publickey with `key`, then keyboard-interactive answering prompts from `answers`
    (each answer is given once; a prompt it has no answer left for aborts the login), then `id -un`.
    No agent, no config files."""
    prompts: list[str] = []
    left = dict(answers or {})

    class Client(asyncssh.SSHClient):  # type: ignore[misc]
        def password_auth_requested(self) -> None:
            return None

        def kbdint_auth_requested(self) -> str:
            return ""

        def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str, challenge: list[tuple[str, bool]]
        ) -> list[str] | None:
            out = []
            for prompt, _echo in challenge:
                prompts.append(prompt)
                matches = [k for k in left if k.lower() in prompt.lower()]
                if not matches:
                    return None
                out.append(left.pop(matches[0]))
            return out

    async def run() -> str:
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            username=user,
            client_factory=Client,
            client_keys=[key],
            known_hosts=None,
            agent_path=None,
            config=None,
            preferred_auth="publickey,keyboard-interactive",
            login_timeout=30,
        ) as conn:
            result = await conn.run("id -un", check=True, timeout=30)
            return str(result.stdout).strip()

    try:
        return Login(asyncio.run(asyncio.wait_for(run(), 60)), prompts)
    except asyncssh.PermissionDenied:
        return Login(None, prompts)
    except asyncssh.ProtocolError as exc:
        # Wrong codes: asyncssh keeps answering keyboard-interactive until sshd's MaxAuthTries.
        if "Too many authentication failures" not in str(exc):
            raise
        return Login(None, prompts)


def auth_rows(mfa: Mfa, user: str, service: str) -> list[Any]:
    return [r for r in mfa.audit(user) if r.event == "auth" and r.service == service]


# -- the tests -------------------------------------------------------------------------------------------


def test_enrolled_sk_key_logs_in_without_a_code_and_a_disabled_one_is_refused(
    tmp_path: Path,
    mfa: Mfa,
    sshd: Callable[..., Sshd],
    system_user: Callable[[], SystemUser],
    soft_key: SoftAuthenticator,
) -> None:
    user = system_user()
    mfa.enroll(user.name)  # a TOTP app too: the user is not left without a device when the key is disabled
    key, pub = make_sk_key(tmp_path, "laptop-key")
    device = enroll_sk(mfa, user.name, pub)
    assert authorized_keys(mfa, user.name) == [f"{SK_ECDSA} {key_blob(pub)}"]
    server = sshd()
    signed_before = soft_key.sign_count

    login = ssh_login(server.port, user.name, key)
    assert login.output == user.name, server.log_text()
    assert login.prompts == []  # no code asked: the security key was the second factor
    assert soft_key.sign_count > signed_before  # the signature came from the authenticator
    log = server.log_text()
    assert re.search(rf"Partial publickey for {user.name} from 127\.0\.0\.1 .*ECDSA-SK", log), log
    assert f"Accepted keyboard-interactive/pam for {user.name}" in log
    rows = auth_rows(mfa, user.name, server.service)
    assert [(r.reason, r.device_id) for r in rows] == [(SK_FACTOR, device)]
    assert rows[0].source == "127.0.0.1" and rows[0].detail.get("kind") == "ssh-sk"

    r = mfa_admin(mfa, "devices", "disable", user.name, str(device))
    assert r.returncode == 0, r
    assert authorized_keys(mfa, user.name) == []
    # sshd no longer accepts the key; the login falls to keyboard-interactive alone, which wants the code.
    refused = ssh_login(server.port, user.name, key)
    assert refused.output is None
    assert refused.prompts == [CODE_PROMPT]
    log = server.log_text()
    assert len(re.findall(rf"Partial publickey for {user.name} ", log)) == 1, log
    assert re.search(rf"Failed publickey for {user.name} from 127\.0\.0\.1 .*ECDSA-SK", log), log
    assert SK_FACTOR not in [r.reason for r in auth_rows(mfa, user.name, server.service)[1:]]

    r = mfa_admin(mfa, "devices", "enable", user.name, str(device))
    assert r.returncode == 0, r
    again = ssh_login(server.port, user.name, key)
    assert again.output == user.name and again.prompts == []


def test_plain_key_from_the_users_authorized_keys_still_needs_the_code(
    tmp_path: Path,
    mfa: Mfa,
    sshd: Callable[..., Sshd],
    system_user: Callable[[], SystemUser],
    soft_key: SoftAuthenticator,
) -> None:
    user = system_user()
    secret = mfa.enroll(user.name)
    _sk, sk_pub = make_sk_key(tmp_path, "enrolled-but-not-used")
    enroll_sk(mfa, user.name, sk_pub)  # SSH_AUTH_INFO_0 will name the plain key, not this one
    plain = asyncssh.generate_private_key("ssh-ed25519")
    ssh_dir = user.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(plain.export_public_key().decode())
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    shutil.chown(ssh_dir, user.name, user.name)
    shutil.chown(ssh_dir / "authorized_keys", user.name, user.name)
    server = sshd()
    wait_for_fresh_step(10)
    right = totp_code(secret)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"

    refused = ssh_login(server.port, user.name, plain, {"verification code": wrong})
    assert refused.output is None
    assert refused.prompts == [CODE_PROMPT, f"Verification failed.\n{CODE_PROMPT}"]  # the 2nd one goes unanswered
    login = ssh_login(server.port, user.name, plain, {"verification code": right})
    assert login.output == user.name, server.log_text()
    assert login.prompts == [CODE_PROMPT]
    log = server.log_text()
    assert re.search(rf"Partial publickey for {user.name} from 127\.0\.0\.1 .*ED25519 ", log), log
    reasons = [r.reason for r in auth_rows(mfa, user.name, server.service)]
    assert "bad code" in reasons and reasons[-1] == "accepted"
    assert SK_FACTOR not in reasons


@pytest.mark.parametrize("expose", ["yes", "no"])
def test_ssh_auth_info_reaches_pam_whatever_expose_auth_info_says(
    expose: str,
    tmp_path: Path,
    mfa: Mfa,
    sshd: Callable[..., Sshd],
    system_user: Callable[[], SystemUser],
    soft_key: SoftAuthenticator,
) -> None:
    """sshd puts SSH_AUTH_INFO_0 into the PAM environment with ExposeAuthInfo off as well (it only
    governs the session's $SSH_USER_AUTH file), so the shipped fragment does not need the option."""
    user = system_user()
    key, pub = make_sk_key(tmp_path, "k")
    device = enroll_sk(mfa, user.name, pub)
    server = sshd(f"ExposeAuthInfo {expose}")
    effective = subprocess.run([SSHD, "-T", "-f", str(server.config)], capture_output=True, text=True, check=True)
    assert f"exposeauthinfo {expose}" in effective.stdout.splitlines()
    login = ssh_login(server.port, user.name, key)
    assert login.output == user.name, server.log_text()
    assert login.prompts == []
    assert [(r.reason, r.device_id) for r in auth_rows(mfa, user.name, server.service)] == [(SK_FACTOR, device)]


def test_a_signature_without_touch_is_refused_unless_the_key_was_enrolled_no_touch_required(
    tmp_path: Path,
    mfa: Mfa,
    sshd: Callable[..., Sshd],
    system_user: Callable[[], SystemUser],
    soft_key: SoftAuthenticator,
) -> None:
    user = system_user()
    mfa.enroll(user.name)
    touch_key, touch_pub = make_sk_key(tmp_path, "touch")
    enroll_sk(mfa, user.name, touch_pub)
    quiet_key, quiet_pub = make_sk_key(tmp_path, "quiet", touch_required=False, options="no-touch-required")
    quiet = enroll_sk(mfa, user.name, quiet_pub)
    assert f"no-touch-required {SK_ECDSA} {key_blob(quiet_pub)}" in authorized_keys(mfa, user.name)
    server = sshd()
    soft_key.user_present = False  # every signature from now on lacks the UP flag

    refused = ssh_login(server.port, user.name, touch_key)
    assert refused.output is None
    assert refused.prompts == [CODE_PROMPT]  # the key did not count; keyboard-interactive alone asks the code
    log = server.log_text()
    assert "user presence (authenticator touch) requirement not met" in log, log
    assert not re.search(rf"Partial publickey for {user.name} ", log), log

    login = ssh_login(server.port, user.name, quiet_key)
    assert login.output == user.name, server.log_text()
    assert login.prompts == []
    rows = auth_rows(mfa, user.name, server.service)
    assert [(r.reason, r.device_id) for r in rows if r.reason == SK_FACTOR] == [(SK_FACTOR, quiet)]


def test_verify_required_key_needs_user_verification(
    tmp_path: Path,
    mfa: Mfa,
    sshd: Callable[..., Sshd],
    system_user: Callable[[], SystemUser],
    soft_key: SoftAuthenticator,
) -> None:
    user = system_user()
    mfa.enroll(user.name)
    key, pub = make_sk_key(tmp_path, "pin", options="verify-required")
    device = enroll_sk(mfa, user.name, pub)
    server = sshd()
    soft_key.user_verified = False
    refused = ssh_login(server.port, user.name, key)
    assert refused.output is None and refused.prompts == [CODE_PROMPT]
    assert "user verification requirement not met" in server.log_text(), server.log_text()
    soft_key.user_verified = True
    login = ssh_login(server.port, user.name, key)
    assert login.output == user.name and login.prompts == []
    assert [r.device_id for r in auth_rows(mfa, user.name, server.service) if r.reason == SK_FACTOR] == [device]


def test_the_users_own_no_touch_required_copy_of_an_enrolled_key_does_not_count(
    tmp_path: Path,
    mfa: Mfa,
    sshd: Callable[..., Sshd],
    system_user: Callable[[], SystemUser],
    soft_key: SoftAuthenticator,
) -> None:
    """The attack: a key enrolled touch-required (the default), put by its user into their own
    ~/.ssh/authorized_keys with no-touch-required. sshd reads that file too and applies its line's
    options, so it accepts a signature made without a touch; SSH_AUTH_INFO_0 names the key all the
    same. mfaguard reads the user's file, sees the weaker copy, and asks for the code."""
    user = system_user()
    secret = mfa.enroll(user.name)
    key, pub = make_sk_key(tmp_path, "enrolled-touch")
    device = enroll_sk(mfa, user.name, pub)
    ssh_dir = user.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text("no-touch-required " + key.export_public_key().decode())
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    shutil.chown(ssh_dir, user.name, user.name)
    shutil.chown(ssh_dir / "authorized_keys", user.name, user.name)
    server = sshd()
    soft_key.user_present = False  # no touch

    refused = ssh_login(server.port, user.name, key)
    assert refused.output is None, "logged in with no touch and no code"
    assert refused.prompts == [CODE_PROMPT]
    log = server.log_text()
    assert re.search(rf"Partial publickey for {user.name} from 127\.0\.0\.1 .*ECDSA-SK", log), log
    rows = auth_rows(mfa, user.name, server.service)
    assert SK_FACTOR not in [r.reason for r in rows]
    assert rows[0].device_id == device
    assert rows[0].reason == (
        f"ssh security key not counted: {user.home}/.ssh/authorized_keys line 1 holds the same key "
        "with weaker options (no touch required)"
    )
    wait_for_fresh_step(10)
    login = ssh_login(server.port, user.name, key, {"verification code": totp_code(secret)})
    assert login.output == user.name, server.log_text()
    assert login.prompts == [CODE_PROMPT]
