"""The PAM module takes nothing from the process environment: under sudo and su that environment is
the invoking user's (sudo is setuid root and runs PAM with the caller's variables), so a setting read
from it would be the caller's to choose. The settings file is the PAM line's config=, else the
default path; never $MFAGUARD_CONFIG. Driven through the stand-in pam_python handle, with the
variables set in this process's environment, as pam_python would see them."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import pyotp
import pytest
from pam_handle import FakePamHandle

from devicedb import settings as settings_module
from devicedb.manage import DeviceManager
from devicedb.models import Context
from devicedb.settings import load_settings
from devicedb.store import Store
from pam_module import adapter, publickey_check

CTX = Context(service="test")


class Handle(FakePamHandle):
    PAM_PERM_DENIED = 6


def install(folder: Path, extra_yaml: str = "") -> Path:
    """A private mfaguard installation (settings, database, key, log) in one 0700 folder."""
    folder.mkdir(mode=0o700, parents=True)
    config = folder / "mfaguard.yaml"
    config.write_text(
        f"database:\n  path: {folder}/db/m.db\n  key_file: {folder}/key/seal.key\n"
        f"logging:\n  file: {folder}/log/mfaguard.log\n{extra_yaml}"
    )
    os.chmod(config, 0o600)
    Store.initialise(load_settings(str(config)))
    return config


def enroll(config: Path, user: str) -> str:
    """Enroll a TOTP device; returns the current code."""
    secret = secrets.token_bytes(20)
    with Store.open(load_settings(str(config))) as store:
        DeviceManager(store).enroll_totp(user, CTX, secret=secret, pending=False)
    return pyotp.TOTP(base64.b32encode(secret).decode()).at(time.time())


def reasons(config: Path, user: str) -> list[str]:
    with Store.open(load_settings(str(config))) as store:
        return [row.reason for row in store.audit_rows(user=user) if row.event == "auth"]


@pytest.fixture(autouse=True)
def own_logs() -> Iterator[None]:
    yield
    for log in (adapter.log, publickey_check.log):
        for handler in list(log.handlers):
            if isinstance(handler, logging.StreamHandler) and not type(handler).__module__.startswith("_pytest"):
                log.removeHandler(handler)
                handler.close()
    adapter._log_ready.clear()
    publickey_check._log_ready.clear()


def test_settings_never_come_from_mfaguard_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial: `MFAGUARD_CONFIG=/etc/.pwd.lock sudo -S id -un` (an empty root-owned file, so all
    defaults) turned off `fido.required_for_services`. A line without config= reads the default path."""
    os.chmod(tmp_path, 0o700)
    callers = install(tmp_path / "caller")  # what the caller would like: no FIDO rule, a code they know
    code = enroll(callers, "alice")
    default = install(tmp_path / "default", "fido:\n  required_for_services: [sshd-test]\n")
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", str(default))
    monkeypatch.setenv("MFAGUARD_CONFIG", str(callers))

    handle = Handle("alice", {}, [code])
    assert adapter.authenticate(handle, 0, ["pam_mfaguard.py"]) == handle.PAM_AUTH_ERR
    assert adapter.DEFAULT_PROMPT not in handle.prompts  # the default file: only a FIDO2 key, no code asked
    assert reasons(callers, "alice") == []  # the caller's file was never opened
    assert reasons(default, "alice") != []
    assert adapter.acct_mgmt(Handle("alice", {}, []), 0, ["pam_mfaguard.py"]) == Handle.PAM_PERM_DENIED

    # With config= on the line that file counts, whatever the environment says.
    handle = Handle("alice", {}, [code])
    monkeypatch.setenv("MFAGUARD_CONFIG", str(default))
    assert adapter.authenticate(handle, 0, ["pam_mfaguard.py", f"config={callers}"]) == handle.PAM_SUCCESS


def test_a_missing_default_file_fails_even_with_mfaguard_config_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.chmod(tmp_path, 0o700)
    callers = install(tmp_path / "caller")
    code = enroll(callers, "alice")
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    monkeypatch.setenv("MFAGUARD_CONFIG", str(callers))
    with pytest.raises(settings_module.ConfigError, match="absent.yaml: config file not found"):
        adapter.authenticate(Handle("alice", {}, [code]), 0, ["pam_mfaguard.py"])
    assert reasons(callers, "alice") == []


class Watched(MutableMapping[str, str]):
    """os.environ that records every key read, listed or written."""

    def __init__(self, real: MutableMapping[str, str]) -> None:
        self.real = real
        self.touched: list[str] = []

    def __getitem__(self, key: str) -> str:
        self.touched.append(key)
        return self.real[key]

    def __setitem__(self, key: str, value: str) -> None:
        self.touched.append(f"set {key}")
        self.real[key] = value

    def __delitem__(self, key: str) -> None:
        self.touched.append(f"del {key}")
        del self.real[key]

    def __iter__(self) -> Iterator[str]:
        self.touched.append("(all)")
        return iter(self.real)

    def __len__(self) -> int:
        self.touched.append("(all)")
        return len(self.real)


def test_no_pam_path_reads_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Auth (exempt, rejected, accepted), account and setcred, and the publickey check: not one
    os.environ lookup (HOME, TMPDIR, MFAGUARD_CONFIG or any other) on the way."""
    os.chmod(tmp_path, 0o700)
    config = install(tmp_path / "mfa", "enforcement:\n  exempt_users: [bob]\n")
    code = enroll(config, "alice")
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", str(config))
    argv = ["pam_mfaguard.py", f"log={tmp_path}/mfa/log/pam.log"]  # no config=: the default path
    for name, value in (("MFAGUARD_CONFIG", "/etc/.pwd.lock"), ("HOME", str(tmp_path)), ("TMPDIR", str(tmp_path))):
        monkeypatch.setenv(name, value)
    watched = Watched(os.environ)
    monkeypatch.setattr(os, "environ", watched)

    exempt = Handle("bob", {}, [])
    assert adapter.authenticate(exempt, 0, argv) == exempt.PAM_IGNORE
    wrong = Handle("alice", {}, [f"{(int(code) + 1) % 1_000_000:06d}"])
    assert adapter.authenticate(wrong, 0, [*argv, "tries=1"]) == wrong.PAM_AUTH_ERR
    right = Handle("alice", {}, [code])
    assert adapter.authenticate(right, 0, [*argv, f"config={config}"]) == right.PAM_SUCCESS
    assert adapter.acct_mgmt(right, 0, argv) == right.PAM_SUCCESS
    assert adapter.setcred(right, 0, argv) == right.PAM_SUCCESS
    check = Handle("alice", {"SSH_AUTH_INFO_0": "publickey ssh-ed25519 AAAA\n"}, [])
    check_argv = ["pam_mfaguard.py", "check=publickey-used", f"log={tmp_path}/mfa/log/check.log"]
    assert publickey_check.authenticate(check, 0, check_argv) == check.PAM_IGNORE  # not inside sshd
    monkeypatch.undo()
    assert watched.touched == []
