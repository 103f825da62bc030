"""OpenSSH security keys: enrollment, authorized_keys for sshd, and the SSH_AUTH_INFO_0 factor."""

from __future__ import annotations

import base64
import os
import secrets
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cli_helpers import run_cli as cli
from pam_handle import FakePamHandle

from devicedb.errors import DeviceLimitError, DuplicateDeviceError, InvalidInput
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result

if TYPE_CHECKING:
    from conftest import MfaEnv

CTX = Context(service="sshd-test", remote_host="127.0.0.1")
ED = "sk-ssh-ed25519@openssh.com"


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def sk_key(kind: str = ED) -> str:
    """The base64 blob of a security-key public key, as ssh-keygen -t ed25519-sk writes it."""
    body = ssh_string(secrets.token_bytes(32)) if kind == ED else ssh_string(b"nistp256") + ssh_string(b"\x04" * 65)
    return base64.b64encode(ssh_string(kind.encode()) + body + ssh_string(b"ssh:")).decode()


def test_enroll_accepts_only_security_keys(mfa_env: MfaEnv) -> None:
    manager = DeviceManager(mfa_env.open(mfa_env.initialise("max_devices: 2\n")))
    blob = sk_key()
    device = manager.enroll_ssh_key("alice", f"verify-required {ED} {blob} alice@laptop", CTX)
    assert device.kind == "ssh-sk" and device.params["options"] == ["verify-required"]
    assert device.label == "alice@laptop"
    plain = base64.b64encode(ssh_string(b"ssh-ed25519") + ssh_string(secrets.token_bytes(32))).decode()
    for line, message in (
        (f"ssh-ed25519 {plain} x", "not a security key"),
        (f"{ED} not-base64!", "not base64"),
        (f"{ED} {plain}", "does not hold a key of the type"),
        (f'command="/bin/sh" {ED} {sk_key()}', "not accepted"),
        ("", "not a single line"),
    ):
        with pytest.raises(InvalidInput, match=message):
            manager.enroll_ssh_key("alice", line, CTX)
    with pytest.raises(DuplicateDeviceError):
        manager.enroll_ssh_key("bob", f"{ED} {blob}", CTX)
    manager.enroll_ssh_key(
        "alice", f"sk-ecdsa-sha2-nistp256@openssh.com {sk_key('sk-ecdsa-sha2-nistp256@openssh.com')}", CTX
    )
    with pytest.raises(DeviceLimitError):
        manager.enroll_ssh_key("alice", f"{ED} {sk_key()}", CTX)


def test_authorized_keys_serves_only_enabled_security_keys(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise())
    manager = DeviceManager(store)
    one, two = sk_key(), sk_key()
    first = manager.enroll_ssh_key("alice", f"no-touch-required {ED} {one} a", CTX)
    manager.enroll_ssh_key("alice", f"{ED} {two} b", CTX)
    manager.enroll_totp("alice", CTX, pending=False)
    assert manager.authorized_keys("alice") == [f"no-touch-required {ED} {one}", f"{ED} {two}"]
    manager.set_enabled("alice", first.id, False, CTX)
    assert manager.authorized_keys("alice") == [f"{ED} {two}"]
    assert manager.authorized_keys("bob") == []


def test_ssh_auth_info_with_an_enrolled_key_is_the_factor(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise("lockout:\n  max_failures: 1\n  hard_lock_after: 5\n"))
    verifier = mfa_env.verifier(store)
    manager = DeviceManager(store)
    blob = sk_key()
    device = manager.enroll_ssh_key("alice", f"{ED} {blob}", CTX)
    info = f"publickey {ED} {blob}\n"
    decision = verifier.ssh_key_factor("alice", info, CTX)
    assert decision is not None and decision.result is Result.ACCEPTED and decision.device_id == device.id
    row = store.audit_rows()[-1]
    assert row.reason == "accepted: ssh security key" and row.device_id == device.id
    # A plain key, another user's key, or a key not enrolled: not this factor (the code prompt follows).
    plain = base64.b64encode(ssh_string(b"ssh-ed25519") + ssh_string(b"k" * 32)).decode()
    assert verifier.ssh_key_factor("alice", f"publickey ssh-ed25519 {plain}\n", CTX) is None
    assert verifier.ssh_key_factor("bob", info, CTX) is None
    assert verifier.ssh_key_factor("alice", f"publickey {ED} {sk_key()}\n", CTX) is None
    assert verifier.ssh_key_factor("alice", "keyboard-interactive/pam\n", CTX) is None
    # A disabled key is not accepted; a locked user is refused even with the key.
    manager.enroll_totp("alice", CTX, pending=False)
    manager.set_enabled("alice", device.id, False, CTX)
    assert verifier.ssh_key_factor("alice", info, CTX) is None
    manager.set_enabled("alice", device.id, True, CTX)
    verifier.verify("alice", "000000", CTX)  # one failure locks with max_failures 1
    locked = verifier.ssh_key_factor("alice", info, CTX)
    assert locked is not None and locked.result is Result.LOCKED


def test_pam_auth_phase_counts_an_enrolled_key_and_prompts_for_a_plain_one(tmp_path: Path) -> None:
    from pam_module import adapter

    os.chmod(tmp_path, 0o700)
    config = tmp_path / "mfaguard.yaml"
    config.write_text(
        f"database:\n  path: {tmp_path}/db/m.db\n  key_file: {tmp_path}/key/seal.key\n"
        f"logging:\n  file: {tmp_path}/l.log\n"
    )
    os.chmod(config, 0o600)
    from devicedb.settings import load_settings
    from devicedb.store import Store

    settings = load_settings(str(config))
    Store.initialise(settings)
    blob = sk_key()
    with Store.open(settings) as store:
        DeviceManager(store).enroll_ssh_key("alice", f"{ED} {blob}", CTX)
    argv = ["pam_mfaguard.py", f"config={config}"]
    handle = FakePamHandle("alice", {"SSH_AUTH_INFO_0": f"publickey {ED} {blob}\n"}, [])
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_SUCCESS
    assert handle.prompts == []  # no code asked
    assert adapter.acct_mgmt(handle, 0, argv) == handle.PAM_SUCCESS  # the ticket carries it over
    plain = base64.b64encode(ssh_string(b"ssh-ed25519") + ssh_string(b"k" * 32)).decode()
    handle = FakePamHandle("alice", {"SSH_AUTH_INFO_0": f"publickey ssh-ed25519 {plain}\n"}, ["123456"] * 3)
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_AUTH_ERR
    assert handle.prompts.count(adapter.DEFAULT_PROMPT) == 3


def test_cli_enroll_ssh_key_and_authorized_keys(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    config = tmp_path / "mfaguard.yaml"
    config.write_text(f"database:\n  path: {tmp_path}/db/m.db\n  key_file: {tmp_path}/key/seal.key\n")
    os.chmod(config, 0o600)
    assert cli(config, "init")[0] == 0
    blob = sk_key()
    pub = tmp_path / "id_ed25519_sk.pub"
    pub.write_text(f"{ED} {blob} alice@laptop\n")
    rc, out, err = cli(config, "enroll", "ssh-key", "alice", str(pub))
    assert rc == 0, err
    rc, out, _ = cli(config, "authorized-keys", "alice")
    assert rc == 0 and out == f"{ED} {blob}\n"
    plain = tmp_path / "id_ed25519.pub"
    plain.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB9Uu4bq9c3xLk7Yf4o3c8a2qW8m1f9n4GgY5g5V5Q5 x\n")
    rc, _, err = cli(config, "enroll", "ssh-key", "alice", str(plain))
    assert rc == 5 and "not a security key" in err
