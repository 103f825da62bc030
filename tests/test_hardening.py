"""Faults found by a hostile trial of the README, each pinned by a test."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cli_helpers import make_config
from cli_helpers import run_cli as cli

from devicedb.errors import ConfigError, SchemaError, UnsafePathError
from devicedb.models import Context, Result
from devicedb.settings import load_settings, parse_settings
from devicedb.store import Store

if TYPE_CHECKING:
    from conftest import Enroll, Lib, MfaEnv

CTX = Context(service="sshd")


def test_a_code_typed_as_the_user_name_is_masked_in_the_audit_log(store: Store, verifier) -> None:  # type: ignore[no-untyped-def]
    decision = verifier.verify("735162", "1", CTX)
    assert decision.result is Result.NO_DEVICE
    row = store.audit_rows()[-1]
    assert "735162" not in repr(row.as_dict())
    assert row.user is not None and row.user.startswith("######")


def test_a_numeric_user_with_devices_keeps_its_name(store: Store, verifier, enroll: Enroll, lib: type[Lib]) -> None:  # type: ignore[no-untyped-def]
    enroll(store, "104233", lib.secret_for(1))
    verifier.verify("104233", "000000", CTX)
    assert store.audit_rows()[-1].user == "104233"


def test_a_locked_attempt_does_the_work_of_an_unlocked_one(
    mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib], caplog: pytest.LogCaptureFixture
) -> None:
    """The locked path opens and checks the secrets too (its result thrown away), so timing does not
    tell a lock from a wrong code: a broken sealed secret is noticed even while locked."""
    store = mfa_env.open(mfa_env.initialise("lockout:\n  max_failures: 1\n  hard_lock_after: 5\n"))
    verifier = mfa_env.verifier(store)
    enroll(store, "alice", lib.secret_for(1))
    assert verifier.verify("alice", "000000", CTX).result in (Result.BAD_CODE, Result.REPLAY)
    with mfa_env.raw() as raw:
        raw.execute("UPDATE devices SET secret = x'0100' WHERE user = 'alice'")
    with caplog.at_level(logging.ERROR, logger="mfaguard"):
        decision = verifier.verify("alice", lib.code(lib.secret_for(1), mfa_env.clock()), CTX)
    assert decision.result is Result.LOCKED
    assert any("sealed secret" in r.getMessage() for r in caplog.records)
    assert store.lock_state("alice").failures == 0  # nothing counted while locked


def test_a_shared_sticky_folder_is_refused_with_a_move_not_a_chmod(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # noqa: S103 - a /tmp-like folder is what is under test
    settings = parse_settings(f"database:\n  path: {shared}/m.db\n  key_file: {tmp_path}/k/seal.key\n")
    os.chmod(tmp_path, 0o700)
    with pytest.raises(UnsafePathError) as info:
        Store.initialise(settings)
    assert "chmod" not in str(info.value) and "root-owned folder" in str(info.value)


def test_deeply_nested_yaml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_settings("issuer: " + "[" * 5000 + "]" * 5000 + "\n")


def test_inline_radius_secret_needs_a_private_config(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    config = tmp_path / "mfaguard.yaml"
    config.write_text(
        "radius:\n  first_factor: none\n  clients:\n    - name: nas\n      address: 127.0.0.1\n"
        "      secret: a-long-enough-shared-secret\n      mode: otp-only\n"
    )
    os.chmod(config, 0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        load_settings(str(config))
    os.chmod(config, 0o600)
    assert load_settings(str(config)).radius.clients[0].name == "nas"


def test_init_does_not_silently_replace_an_emptied_database(mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise()
    key_before = mfa_env.key_path.read_bytes()
    for suffix in ("-wal", "-shm"):
        Path(str(mfa_env.db_path) + suffix).unlink(missing_ok=True)
    mfa_env.db_path.write_bytes(b"")
    with pytest.raises(SchemaError, match="Restore it from backup"):
        Store.initialise(settings)
    Store.initialise(settings, allow_new_database_with_old_key=True)
    assert mfa_env.key_path.read_bytes() == key_before


def test_cli_verify_empty_code_is_a_usage_error_and_counts_nothing(config: Path) -> None:
    assert cli(config, "enroll", "totp", "alice", "--no-confirm", "--no-qr")[0] == 0
    rc, _, err = cli(config, "verify", "alice", "")
    assert rc == 2 and "no code given" in err
    rc, out, _ = cli(config, "status", "alice", "--json")
    assert '"failures": 0' in out


def test_cli_verify_with_a_locked_database_exits_4_without_a_traceback(config: Path, tmp_path: Path) -> None:
    assert cli(config, "enroll", "totp", "alice", "--no-confirm", "--no-qr")[0] == 0
    text = config.read_text().replace("key_file:", "busy_timeout_ms: 50\n  key_file:")
    config.write_text(text)
    holder = sqlite3.connect(tmp_path / "db" / "m.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        r = subprocess.run(
            [str(Path(sys.executable).parent / "mfa-admin"), "--config", str(config), "verify", "alice", "123456"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.returncode == 4, r
    assert "Traceback" not in r.stderr


def test_cli_output_never_carries_terminal_escapes(config: Path) -> None:
    from devicedb.settings import load_settings as load

    with Store.open(load(str(config))) as store, store.transaction() as tx:
        tx.audit("auth", "alice", Context(service="sshd", remote_host="\x1b]0;pwned\x07\x1b[2JFAKE"), reason="x")
    rc, out, _ = cli(config, "audit", "show")
    assert rc == 0
    assert "\x1b" not in out and "\\x1b" in out


def test_cli_broken_pipe_is_not_an_error(config: Path) -> None:
    from devicedb.settings import load_settings as load

    # Far more output than a pipe holds, so that the writer really meets a closed pipe.
    with Store.open(load(str(config))) as store, store.transaction() as tx:
        for i in range(3000):
            tx.audit("auth", "alice", Context(service="sshd"), reason=f"filler {i}")
    exe = str(Path(sys.executable).parent / "mfa-admin")
    script = f"{exe} --config {config} audit show --json | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}"
    r = subprocess.run(["/bin/bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() in ("0", "141"), r
    assert "Broken pipe" not in r.stderr


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return make_config(tmp_path)
