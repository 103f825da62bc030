"""OpenSSH security keys: enrollment, authorized_keys for sshd, and the SSH_AUTH_INFO_0 factor."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
from cli_helpers import run_cli as cli
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pam_handle import FakePamHandle

from devicedb.errors import DeviceLimitError, DuplicateDeviceError, InvalidInput
from devicedb.kinds import ssh_sk
from devicedb.kinds.ssh_sk import UserKeyFiles
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result

if TYPE_CHECKING:
    from conftest import MfaEnv

CTX = Context(service="sshd-test", remote_host="127.0.0.1")
ED = "sk-ssh-ed25519@openssh.com"
EC = "sk-ecdsa-sha2-nistp256@openssh.com"
NO_FILES = UserKeyFiles()  # the user has no authorized_keys of their own


def no_files() -> UserKeyFiles:
    return NO_FILES


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def p256_point() -> bytes:
    """A fresh uncompressed P-256 point (04 || X || Y), as a security key returns it."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def sk_blob(
    kind: str = ED,
    *,
    key: bytes | None = None,
    curve: bytes = b"nistp256",
    application: bytes | None = b"ssh:",
    extra: bytes = b"",
) -> bytes:
    """A security-key public key blob, laid out as PROTOCOL.u2f says (ssh-keygen writes the same)."""
    if kind == ED:
        body = ssh_string(secrets.token_bytes(32) if key is None else key)
    else:
        body = ssh_string(curve) + ssh_string(p256_point() if key is None else key)
    tail = b"" if application is None else ssh_string(application)
    return ssh_string(kind.encode()) + body + tail + extra


def sk_key(kind: str = ED) -> str:
    """The base64 blob of a security-key public key, as ssh-keygen -t ed25519-sk writes it."""
    return base64.b64encode(sk_blob(kind)).decode()


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
    manager.enroll_ssh_key("alice", f"{EC} {sk_key(EC)}", CTX)
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
    decision = verifier.ssh_key_factor("alice", info, CTX, user_files=no_files)
    assert decision is not None and decision.result is Result.ACCEPTED and decision.device_id == device.id
    row = store.audit_rows()[-1]
    assert row.reason == "accepted: ssh security key" and row.device_id == device.id
    # A plain key, another user's key, or a key not enrolled: not this factor (the code prompt follows).
    plain = base64.b64encode(ssh_string(b"ssh-ed25519") + ssh_string(b"k" * 32)).decode()
    assert verifier.ssh_key_factor("alice", f"publickey ssh-ed25519 {plain}\n", CTX, user_files=no_files) is None
    assert verifier.ssh_key_factor("bob", info, CTX, user_files=no_files) is None
    assert verifier.ssh_key_factor("alice", f"publickey {ED} {sk_key()}\n", CTX, user_files=no_files) is None
    assert verifier.ssh_key_factor("alice", "keyboard-interactive/pam\n", CTX, user_files=no_files) is None
    # A disabled key is not accepted; a locked user is refused even with the key.
    manager.enroll_totp("alice", CTX, pending=False)
    manager.set_enabled("alice", device.id, False, CTX)
    assert verifier.ssh_key_factor("alice", info, CTX, user_files=no_files) is None
    manager.set_enabled("alice", device.id, True, CTX)
    verifier.verify("alice", "000000", CTX)  # one failure locks with max_failures 1
    locked = verifier.ssh_key_factor("alice", info, CTX, user_files=no_files)
    assert locked is not None and locked.result is Result.LOCKED


def fake_home(monkeypatch: pytest.MonkeyPatch, home: Path, user: str = "alice") -> Path:
    """Make ``user``'s passwd home, as the PAM module reads it, the folder ``home``."""
    from pam_module import authorized_keys

    def getpwnam(name: str) -> SimpleNamespace:
        if name != user:
            raise KeyError(name)
        return SimpleNamespace(pw_name=user, pw_dir=str(home))

    monkeypatch.setattr(authorized_keys, "pwd", SimpleNamespace(getpwnam=getpwnam))
    home.mkdir(mode=0o700, exist_ok=True)
    return home


def test_pam_auth_phase_counts_an_enrolled_key_and_prompts_for_a_plain_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pam_module import adapter

    os.chmod(tmp_path, 0o700)
    fake_home(monkeypatch, tmp_path / "home")
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


# -- the wire format, checked as strictly as OpenSSH ------------------------------------------------------

SSH_KEYGEN = shutil.which("ssh-keygen")


def ssh_keygen_reads(folder: Path, kind: str, blob: bytes) -> bool:
    """Whether OpenSSH's own parser (ssh-keygen -l -f) takes the blob as a public key."""
    if SSH_KEYGEN is None:
        pytest.skip("ssh-keygen missing: apt-get install openssh-client")
    pub = folder / f"k-{secrets.token_hex(4)}.pub"
    pub.write_text(f"{kind} {base64.b64encode(blob).decode()} test\n")
    return subprocess.run([SSH_KEYGEN, "-l", "-f", str(pub)], capture_output=True, timeout=30).returncode == 0


def _compressed(point: bytes) -> bytes:
    return bytes([2 + point[-1] % 2]) + point[1:33]


MALFORMED = {
    "ed25519 with 2 trailing bytes": (ED, lambda: sk_blob(ED, extra=b"\0\0"), "stray bytes"),
    "ed25519 with a trailing field": (ED, lambda: sk_blob(ED, extra=ssh_string(b"x")), "exactly 3"),
    "ecdsa with 2 trailing bytes": (EC, lambda: sk_blob(EC, extra=b"\0\0"), "stray bytes"),
    "ecdsa with a trailing field": (EC, lambda: sk_blob(EC, extra=ssh_string(b"")), "exactly 4"),
    "ecdsa point not on the curve": (EC, lambda: sk_blob(EC, key=b"\x04" + b"\x01" * 64), "not on the P-256 curve"),
    "ecdsa compressed point": (EC, lambda: sk_blob(EC, key=_compressed(p256_point())), "not an uncompressed"),
    "ecdsa point at infinity": (EC, lambda: sk_blob(EC, key=b"\x00"), "not an uncompressed"),
    "ecdsa on another curve": (EC, lambda: sk_blob(EC, curve=b"nistp384"), "nistp256"),
    "ed25519 key of 31 bytes": (ED, lambda: sk_blob(ED, key=b"k" * 31), "exactly 32"),
    "ed25519 key of 33 bytes": (ED, lambda: sk_blob(ED, key=b"k" * 33), "exactly 32"),
    "no application": (ED, lambda: sk_blob(ED, application=None), "exactly 3"),
    "application cut short": (ED, lambda: sk_blob(ED)[:-2], "cut short"),
    "application with a NUL": (ED, lambda: sk_blob(ED, application=b"ssh:\0x"), "not accepted"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_enroll_refuses_a_key_blob_openssh_refuses(case: str, tmp_path: Path, mfa_env: MfaEnv) -> None:
    kind, make, message = MALFORMED[case]
    blob = make()
    assert not ssh_keygen_reads(tmp_path, kind, blob), "ssh-keygen takes it: the case is not malformed"
    store = mfa_env.open(mfa_env.initialise())
    before = store.audit_rows()
    with pytest.raises(InvalidInput, match=message):
        DeviceManager(store).enroll_ssh_key("alice", f"{kind} {base64.b64encode(blob).decode()}", CTX)
    assert DeviceManager(store).list_devices("alice") == []
    assert store.audit_rows() == before


@pytest.mark.parametrize("application", [b"https://evil", b"", b"SSH:x", b"web:ssh:"], ids=repr)
def test_enroll_refuses_an_application_other_than_ssh(application: bytes, tmp_path: Path, mfa_env: MfaEnv) -> None:
    """ssh-keygen -l lists such a key, but OpenSSH enrolls only applications starting with "ssh:"."""
    blob = sk_blob(EC, application=application)
    assert ssh_keygen_reads(tmp_path, EC, blob)
    manager = DeviceManager(mfa_env.open(mfa_env.initialise()))
    with pytest.raises(InvalidInput, match="starts with 'ssh:'"):
        manager.enroll_ssh_key("alice", f"{EC} {base64.b64encode(blob).decode()}", CTX)
    assert manager.list_devices("alice") == []


@pytest.mark.parametrize(
    ("kind", "application"), [(ED, b"ssh:"), (EC, b"ssh:"), (EC, b"ssh:work"), (ED, b"ssh://host")], ids=str
)
def test_enroll_accepts_what_ssh_keygen_makes(kind: str, application: bytes, tmp_path: Path, mfa_env: MfaEnv) -> None:
    blob = sk_blob(kind, application=application)
    assert ssh_keygen_reads(tmp_path, kind, blob)
    manager = DeviceManager(mfa_env.open(mfa_env.initialise()))
    device = manager.enroll_ssh_key("alice", f"{kind} {base64.b64encode(blob).decode()} me", CTX)
    assert base64.b64decode(device.params["public_key"]) == blob


def test_the_duplicate_check_sees_the_canonical_key(mfa_env: MfaEnv) -> None:
    """The same key with bytes appended (which slipped past the duplicate check) is refused as
    malformed, and the same blob in a non-canonical base64 spelling is caught as the duplicate."""
    store = mfa_env.open(mfa_env.initialise())
    manager = DeviceManager(store)
    blob = sk_blob(ED)
    text = base64.b64encode(blob).decode()
    manager.enroll_ssh_key("alice", f"{ED} {text}", CTX)
    with pytest.raises(InvalidInput, match="stray bytes"):
        manager.enroll_ssh_key("bob", f"{ED} {base64.b64encode(blob + b'xx').decode()}", CTX)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    assert len(blob) % 3 == 2 and text.endswith("=") and not text.endswith("==")
    loose = text[:-2] + alphabet[alphabet.index(text[-2]) | 1] + "="  # padding bits set: same bytes
    assert loose != text and base64.b64decode(loose) == blob
    with pytest.raises(DuplicateDeviceError):
        manager.enroll_ssh_key("bob", f"{ED} {loose}", CTX)
    assert manager.list_devices("bob") == []
    assert manager.authorized_keys("alice") == [f"{ED} {text}"]


# -- the user's own authorized_keys -------------------------------------------------------------------------


def sk_device(mfa_env: MfaEnv, options: str = "") -> tuple[ssh_sk.Device, str]:
    manager = DeviceManager(mfa_env.open(mfa_env.initialise()))
    blob = sk_key()
    return manager.enroll_ssh_key("alice", f"{options} {ED} {blob}".strip(), CTX), blob


def files(text: str, name: str = "/home/alice/.ssh/authorized_keys") -> UserKeyFiles:
    return UserKeyFiles(((name, text.encode()),))


@pytest.mark.parametrize(
    ("enrolled", "line", "counts"),
    [
        ("", "{key}", True),
        ("", "no-touch-required {key}", False),
        ("", "NO-Touch-Required {key} me@laptop", False),
        ("", "restrict,no-touch-required {key}", False),
        ("", "no-touch-required,touch-required {key}", True),  # sshd: the last one wins
        ("", 'command="echo no-touch-required, x",from="10.0.0.1" {key}', True),
        ("", 'command="echo \\" a",no-touch-required {key}', False),
        ("", "#no-touch-required {key}", True),
        ("", "   # no-touch-required {key}", True),
        ("", "\tno-touch-required\t{key}", False),
        ("", "no-touch-required {key_unpadded}", False),  # a looser spelling of the same blob
        ("", "no-touch-required {key_vt}", False),  # sshd's decoder skips the vertical tab
        ("", 'command="unterminated {key}', False),  # cannot be read as sshd reads it
        ("", "no-touch-required ssh-ed25519 {key}", False),  # the blob under another type name
        ("", "no-touch-required {other}", True),
        ("", "no-touch-required {other_line} comment-{raw}", True),  # the blob only in a comment
        ("verify-required", "{key}", False),
        ("verify-required", "verify-required {key}", True),
        ("verify-required", "verify-required,no-verify-required {key}", False),
        ("verify-required", "verify-required,no-touch-required {key}", False),
        ("no-touch-required", "no-touch-required {key}", True),
        ("no-touch-required,verify-required", "verify-required,no-touch-required {key}", True),
        ("no-touch-required,verify-required", "no-touch-required {key}", False),
    ],
)
def test_a_weaker_copy_in_the_users_file_stops_the_key_counting(
    enrolled: str, line: str, counts: bool, mfa_env: MfaEnv
) -> None:
    device, blob = sk_device(mfa_env, enrolled)
    text = line.format(
        key=f"{ED} {blob}",
        key_unpadded=f"{ED} {blob.rstrip('=')}",
        key_vt=f"{ED} {blob[:20]}\x0b{blob[20:]}",
        other=f"{ED} {sk_key()}",
        other_line=f"{ED} {sk_key()}",
        raw=blob,
    )
    content = f"ssh-ed25519 {base64.b64encode(ssh_string(b'ssh-ed25519') + ssh_string(b'k' * 32)).decode()}\n"
    reason = ssh_sk.user_files_weaken(device, files(content + text + "\n"))
    assert (reason is None) == counts, reason
    if not counts:
        assert "line 2" in reason


def test_both_default_files_are_checked_and_a_problem_means_it_cannot_tell(mfa_env: MfaEnv) -> None:
    device, blob = sk_device(mfa_env)
    assert ssh_sk.user_files_weaken(device, UserKeyFiles()) is None
    second = UserKeyFiles((("a", b"\n"), ("/h/.ssh/authorized_keys2", f"no-touch-required {ED} {blob}".encode())))
    assert "authorized_keys2 line 1" in (ssh_sk.user_files_weaken(device, second) or "")
    assert "cannot be checked (x is a symlink)" in (
        ssh_sk.user_files_weaken(device, UserKeyFiles(problem="x is a symlink")) or ""
    )
    assert "not checked" in (ssh_sk.user_files_weaken(device, None) or "")


def test_the_verifier_does_not_count_a_key_weakened_by_the_users_file(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise())
    verifier = mfa_env.verifier(store)
    blob = sk_key()
    device = DeviceManager(store).enroll_ssh_key("alice", f"verify-required {ED} {blob}", CTX)
    info = f"publickey {ED} {blob}\n"
    weak = files(f"no-touch-required {ED} {blob}\n")
    decision = verifier.ssh_key_factor("alice", info, CTX, user_files=lambda: weak)
    assert decision is not None and not decision.accepted and decision.result is Result.NO_USABLE_DEVICE
    row = store.audit_rows()[-1]
    assert row.device_id == device.id and row.reason is not None
    assert row.reason.startswith("ssh security key not counted: ")
    assert "weaker options (no touch required, no verify-required)" in row.reason
    assert store.lock_state("alice").consecutive_failures == 0  # not a failed attempt either
    # Without the user's files the core cannot tell, and does not count the key.
    unchecked = verifier.ssh_key_factor("alice", info, CTX)
    assert unchecked is not None and not unchecked.accepted
    same = files(f"verify-required {ED} {blob}\n")
    accepted = verifier.ssh_key_factor("alice", info, CTX, user_files=lambda: same)
    assert accepted is not None and accepted.accepted


# -- the PAM module reads the files, safely ----------------------------------------------------------------


def pam_setup(tmp_path: Path, options: str = "verify-required") -> tuple[list[str], str, int]:
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
        manager = DeviceManager(store)
        device = manager.enroll_ssh_key("alice", f"{options} {ED} {blob}".strip(), CTX)
        manager.enroll_totp("alice", CTX, pending=False)
    return ["pam_mfaguard.py", f"config={config}"], blob, device.id


def audit_reasons(argv: list[str]) -> list[str | None]:
    from devicedb.settings import load_settings
    from devicedb.store import Store

    with Store.open(load_settings(argv[1].removeprefix("config="))) as store:
        return [r.reason for r in store.audit_rows() if r.event == "auth"]


def test_pam_same_key_with_no_touch_required_in_the_users_file_gets_the_code_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: the enrolled key is verify-required, and the user puts it into their own
    authorized_keys with no-touch-required, so sshd lets it sign with no touch and no PIN."""
    from pam_module import adapter

    argv, blob, _device = pam_setup(tmp_path)
    home = fake_home(monkeypatch, tmp_path / "home")
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "authorized_keys").write_text(f"no-touch-required {ED} {blob} me@laptop\n")
    env = {"SSH_AUTH_INFO_0": f"publickey {ED} {blob}\n"}
    handle = FakePamHandle("alice", env, ["000000"] * 3)
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_AUTH_ERR
    assert handle.prompts.count(adapter.DEFAULT_PROMPT) == 3
    reasons = audit_reasons(argv)
    assert f"ssh security key not counted: {home}/.ssh/authorized_keys line 1 holds the same key with weaker" in (
        reasons[0] or ""
    )
    assert "accepted: ssh security key" not in reasons
    log = (tmp_path / "l.log").read_text()
    assert "not counted, the code is asked" in log and "weaker options" in log
    # The same key in the file with the enrolled options changes nothing that sshd checks.
    (home / ".ssh" / "authorized_keys").write_text(f"verify-required {ED} {blob}\n")
    handle = FakePamHandle("alice", env, [])
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_SUCCESS and handle.prompts == []


def _symlinked_ssh(home: Path, blob: str) -> None:
    real = home / "elsewhere"
    real.mkdir()
    (real / "authorized_keys").write_text(f"{ED} {blob}\n")
    (home / ".ssh").symlink_to(real)


def _symlinked_file(home: Path, blob: str) -> None:
    (home / ".ssh").mkdir()
    (home / "keys").write_text(f"{ED} {blob}\n")
    (home / ".ssh" / "authorized_keys").symlink_to(home / "keys")


def _fifo(home: Path, blob: str) -> None:
    (home / ".ssh").mkdir()
    os.mkfifo(home / ".ssh" / "authorized_keys2")


def _folder(home: Path, blob: str) -> None:
    (home / ".ssh" / "authorized_keys").mkdir(parents=True)


def _too_large(home: Path, blob: str) -> None:
    (home / ".ssh").mkdir()
    with open(home / ".ssh" / "authorized_keys", "wb") as f:
        f.truncate((1 << 20) + 1)


def _ssh_is_a_file(home: Path, blob: str) -> None:
    (home / ".ssh").write_text("")


UNSAFE = {
    "~/.ssh is a symlink": (_symlinked_ssh, "a symlink is refused"),
    "authorized_keys is a symlink": (_symlinked_file, "a symlink is refused"),
    "authorized_keys2 is a FIFO": (_fifo, "not a regular file"),
    "authorized_keys is a folder": (_folder, "not a regular file"),
    "authorized_keys is over 1 MiB": (_too_large, "larger than"),
    "~/.ssh is a file": (_ssh_is_a_file, "cannot be opened"),
}


@pytest.mark.parametrize("case", list(UNSAFE), ids=list(UNSAFE))
def test_pam_files_that_cannot_be_read_safely_mean_the_key_does_not_count(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pam_module import adapter

    make, message = UNSAFE[case]
    argv, blob, _device = pam_setup(tmp_path, "")
    home = fake_home(monkeypatch, tmp_path / "home")
    make(home, blob)
    handle = FakePamHandle("alice", {"SSH_AUTH_INFO_0": f"publickey {ED} {blob}\n"}, ["000000"])
    done = threading.Event()
    result: list[int] = []

    def run() -> None:
        result.append(adapter.authenticate(handle, 0, argv))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(30), "the PAM module hung on the user's file"
    assert result == [handle.PAM_AUTH_ERR]
    assert adapter.DEFAULT_PROMPT in handle.prompts
    reason = audit_reasons(argv)[0] or ""
    assert reason.startswith("ssh security key not counted: the user's own authorized_keys cannot be checked")
    assert message in reason


def test_pam_no_ssh_folder_or_no_passwd_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pam_module import adapter

    argv, blob, _device = pam_setup(tmp_path, "")
    env = {"SSH_AUTH_INFO_0": f"publickey {ED} {blob}\n"}
    fake_home(monkeypatch, tmp_path / "home")  # an empty home: no ~/.ssh at all
    handle = FakePamHandle("alice", env, [])
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_SUCCESS and handle.prompts == []
    fake_home(monkeypatch, tmp_path / "home", user="somebody-else")  # alice has no passwd entry now
    handle = FakePamHandle("alice", env, ["000000"])
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_AUTH_ERR
    assert any("no passwd entry" in (reason or "") for reason in audit_reasons(argv))
