"""The PAM module through the real PAM stack: pamtester and libpam-python."""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from pam_helpers import Mfa, pamtester, totp_code, unique, wait_for_fresh_step

DEFAULT_CONFIG_PATH = Path("/etc/mfaguard/mfaguard.yaml")


def stack(mfa: Mfa, *, options: str = "", after: list[str] | None = None) -> list[str]:
    return [mfa.pam_line("auth", options=options), *(after or []), mfa.pam_line("account")]


def last_auth_reason(mfa: Mfa, user: str) -> str | None:
    rows = [r for r in mfa.audit(user) if r.event == "auth"]
    return rows[-1].reason if rows else None


def test_right_code_passes_wrong_code_fails(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    secret = mfa.enroll("root")
    service = pam_service(stack(mfa, options="tries=1"))
    wait_for_fresh_step()
    wrong = f"{(int(totp_code(secret)) + 1) % 1_000_000:06d}"
    r = pamtester(service, "root", [wrong], "authenticate")
    assert r.rc != 0, r
    assert "Verification failed." in r.text
    r = pamtester(service, "root", [totp_code(secret)], "authenticate", "acct_mgmt")
    assert r.rc == 0, r
    assert "successfully authenticated" in r.text and "account management done" in r.text
    rows = [r for r in mfa.audit("root") if r.event == "auth"]
    assert [row.reason for row in rows] == ["bad code", "accepted"]
    assert all(row.service == service for row in rows)


def test_replay_fails(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    secret = mfa.enroll("root")
    service = pam_service(stack(mfa, options="tries=1"))
    wait_for_fresh_step()
    code = totp_code(secret)
    assert pamtester(service, "root", [code]).rc == 0
    r = pamtester(service, "root", [code])
    assert r.rc != 0, r
    assert last_auth_reason(mfa, "root") == "replay: code already used"


def test_lockout_threshold_is_enforced(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    mfa.write_config("lockout:\n  max_failures: 3\n  lock_seconds: 600\n")
    secret = mfa.enroll("root")
    service = pam_service(stack(mfa))
    wait_for_fresh_step()
    right = totp_code(secret)
    wrong = [f"{(int(right) + i) % 1_000_000:06d}" for i in (1, 2, 3)]
    r = pamtester(service, "root", wrong)
    assert r.rc != 0
    assert r.text.count("Verification failed.") == 3
    r = pamtester(service, "root", [right, right, right])
    assert r.rc != 0, r
    # The locked answer looks like any other failure to the user ...
    assert r.text.count("Verification failed.") == 3
    assert "lock" not in r.text.lower()
    # ... and the audit log has the real reason.
    assert last_auth_reason(mfa, "root") == "locked"
    assert any(row.event == "lock" for row in mfa.audit("root"))


def test_user_with_no_device_fails_and_looks_like_any_other_failure(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    mfa.enroll("root")
    service = pam_service(stack(mfa))
    nobody = pamtester(service, "nobody", ["123456", "234567", "345678"])
    assert nobody.rc != 0, nobody
    assert last_auth_reason(mfa, "nobody") == "no device enrolled"
    enrolled = pamtester(service, "root", ["123456", "234567", "345678"])
    # As many prompts and failure messages as for an enrolled user with wrong codes.
    assert nobody.text.count("Verification code: ") == enrolled.text.count("Verification code: ") == 3
    assert nobody.text.count("Verification failed.") == enrolled.text.count("Verification failed.") == 3


def test_disabled_devices_are_not_no_device(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    secret = mfa.enroll("root")
    with mfa.store() as store:
        from devicedb.manage import DeviceManager
        from devicedb.models import Context

        device = store.list_devices("root")[0]
        DeviceManager(store).set_enabled("root", device.id, False, Context(service="test"), force=True)
    # Even with grace on for root, a user whose devices exist but are disabled fails.
    mfa.write_config("enforcement:\n  grace:\n    until: 2999-01-01\n    users: [root]\n")
    service = pam_service(stack(mfa, options="tries=1", after=["auth required pam_permit.so"]))
    r = pamtester(service, "root", [totp_code(secret)])
    assert r.rc != 0, r
    assert last_auth_reason(mfa, "root").startswith("no usable device")


def test_exempt_user_gets_ignore_and_the_stack_decides(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    mfa.write_config("enforcement:\n  exempt_users: [root]\n")
    # mfaguard IGNOREs, so pam_deny decides: denied. If mfaguard had said SUCCESS, the
    # result would still be a denial, so the permit stack below tells the two apart.
    deny = pam_service([mfa.pam_line("auth"), "auth required pam_deny.so"])
    r = pamtester(deny, "root", [])
    assert r.rc != 0, r
    assert "Verification code" not in r.text  # exempt: no prompt at all
    # With only mfaguard in the stack, IGNORE alone is not success: PAM fails the stack.
    alone = pam_service([mfa.pam_line("auth")])
    assert pamtester(alone, "root", []).rc != 0
    permit = pam_service([mfa.pam_line("auth"), "auth required pam_permit.so"])
    assert pamtester(permit, "root", []).rc == 0
    assert last_auth_reason(mfa, "root").startswith("exempt")


def test_empty_whitespace_and_eof_answers_fail(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    mfa.enroll("root")
    service = pam_service([mfa.pam_line("auth"), "auth required pam_permit.so"])
    for answers in ([""], ["   "], []):
        r = pamtester(service, "root", answers)
        assert r.rc != 0, (answers, r)
        assert last_auth_reason(mfa, "root") == "empty answer"
    # None of these counted as a guess.
    with mfa.store() as store:
        assert store.lock_state("root").failures == 0


def test_missing_config_fails(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    missing = mfa.root / "absent.yaml"
    line = mfa.pam_line("auth").replace(f"config={mfa.config}", f"config={missing}")
    service = pam_service([line, "auth required pam_permit.so"])
    r = pamtester(service, "root", ["123456"])
    assert r.rc != 0, r
    assert "config file not found" in mfa.log.read_text()


def test_unreadable_database_fails(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    secret = mfa.enroll("root")
    db = mfa.root / "lib" / "mfaguard.db"
    service = pam_service([mfa.pam_line("auth"), "auth required pam_permit.so"])
    wait_for_fresh_step()
    # A corrupt database file (not SQLite at all):
    os.rename(db, db.with_suffix(".bak"))
    for suffix in ("-wal", "-shm"):
        (db.parent / (db.name + suffix)).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    os.chmod(db, 0o600)
    r = pamtester(service, "root", [totp_code(secret)])
    assert r.rc != 0, r
    # An unsafe database file (world-writable) is refused the same way:
    os.replace(db.with_suffix(".bak"), db)
    os.chmod(db, 0o666)  # noqa: S103 - the unsafe mode under test
    r = pamtester(service, "root", [totp_code(secret)])
    assert r.rc != 0, r
    assert "writable by group or others" in mfa.log.read_text()
    os.chmod(db, 0o600)
    assert pamtester(service, "root", [totp_code(secret)]).rc == 0


def test_internal_error_under_pam_permit_denies(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    """auth required pam_permit.so + mfaguard: an internal error in mfaguard must deny."""
    secret = mfa.enroll("root")
    with sqlite3.connect(mfa.root / "lib" / "mfaguard.db") as conn:
        # Break the devices table under the core: every read of it raises.
        conn.execute("ALTER TABLE devices RENAME TO devices_gone")
    service = pam_service(["auth required pam_permit.so", mfa.pam_line("auth", options="tries=1")])
    r = pamtester(service, "root", [totp_code(secret)])
    assert r.rc != 0, r
    assert "Traceback" in mfa.log.read_text() or "error" in (last_auth_reason(mfa, "root") or "")
    assert (last_auth_reason(mfa, "root") or "").startswith("error")


def test_unknown_pam_option_fails_closed(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    secret = mfa.enroll("root")
    service = pam_service([mfa.pam_line("auth", options="nosuchoption=1"), "auth required pam_permit.so"])
    assert pamtester(service, "root", [totp_code(secret)]).rc != 0


def test_tries_and_prompt_options(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    secret = mfa.enroll("root")
    service = pam_service([mfa.pam_line("auth", options="tries=2 [prompt=Your mfaguard code: ]")])
    wait_for_fresh_step()
    right = totp_code(secret)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    r = pamtester(service, "root", [wrong, right])
    assert r.rc == 0, r
    assert r.text.count("Your mfaguard code: ") == 2
    r = pamtester(service, "root", [wrong, wrong, right])
    assert r.rc != 0
    assert r.text.count("Your mfaguard code: ") == 2


def test_code_never_reaches_pam_env_or_log(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    secret = mfa.enroll("root")
    service = pam_service(stack(mfa))
    wait_for_fresh_step()
    code = totp_code(secret)
    r = pamtester(service, "root", [code], "authenticate", "acct_mgmt")
    assert r.rc == 0, r
    log_text = mfa.log.read_text()
    assert code not in log_text
    for row in mfa.audit():
        assert code not in repr(row)
    assert "accepted" in [row.reason for row in mfa.audit("root")]


def test_account_phase_denies_without_auth(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    mfa.enroll("root")
    service = pam_service(stack(mfa))
    r = pamtester(service, "root", [], "acct_mgmt")
    assert r.rc != 0, r
    assert "second factor is required" in r.text
    assert last_auth_reason(mfa, "root") == "account: this login did not pass the second factor"


def test_hotp_token_through_pam(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    """A hardware token kind plugs in through the core: no change in the PAM module."""
    from devicedb.kinds import hotp
    from devicedb.manage import DeviceManager
    from devicedb.models import Context

    seed = b"12345678901234567890"
    with mfa.store() as store:
        DeviceManager(store).enroll_hotp("root", Context(service="test"), secret=seed)
    service = pam_service(stack(mfa, options="tries=1"))
    first = hotp.code_at(seed, 6, "sha1", 0)
    assert pamtester(service, "root", [first], "authenticate", "acct_mgmt").rc == 0
    assert pamtester(service, "root", [first]).rc != 0
    assert last_auth_reason(mfa, "root") == "replay: code already used"
    assert pamtester(service, "root", [hotp.code_at(seed, 6, "sha1", 3)]).rc == 0


def test_yubico_otp_through_pam(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    from devicedb.manage import DeviceManager
    from devicedb.models import Context

    with mfa.store() as store:
        DeviceManager(store).enroll_yubico(
            "root",
            Context(service="test"),
            public_id="ndgtriluugng",
            private_id=bytes.fromhex("c5fc55c3767f"),
            aes_key=bytes.fromhex("0682952d3363f225654b58a73b131259"),
        )
    service = pam_service(stack(mfa, options="tries=1"))
    second = "ndgtriluugnghggtkhvrbbrrgtdfeivgklbkviteggcu"  # (13, 1)
    first = "ndgtriluugngkuhguutjdfihfkleuvnjtjiljkbtbngb"  # (13, 0)
    assert pamtester(service, "root", [second], "authenticate", "acct_mgmt").rc == 0
    assert pamtester(service, "root", [first]).rc != 0
    assert last_auth_reason(mfa, "root") == "replay: code already used"


def test_a_duplicated_option_fails_closed(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    secret = mfa.enroll("root")
    line = mfa.pam_line("auth", options="tries=1 tries=2")
    service = pam_service([line, "auth required pam_permit.so"])
    assert pamtester(service, "root", [totp_code(secret)]).rc != 0
    assert "given twice" in mfa.log.read_text()


def test_code_that_others_can_change_is_refused(mfa: Mfa, tmp_path: Path, pam_service: Callable[..., str]) -> None:
    """A copy of the module whose files anybody may rewrite must not run as root."""
    import shutil

    from pam_helpers import ENTRY_FILE

    tree = tmp_path / "tree"
    for package in ("pam_module", "devicedb"):
        shutil.copytree(ENTRY_FILE.parents[1] / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(tree, 0o755)  # noqa: S103 - root-owned, not writable by others
    secret = mfa.enroll("root")
    line = mfa.pam_line("auth", options="tries=1").replace(str(ENTRY_FILE), str(tree / "pam_module/pam_mfaguard.py"))
    service = pam_service([line, "auth required pam_permit.so"])
    wait_for_fresh_step()
    assert pamtester(service, "root", [totp_code(secret)]).rc == 0  # a root-owned copy runs
    os.chmod(tree / "devicedb" / "verifier.py", 0o666)  # noqa: S103 - the unsafe mode under test
    assert pamtester(service, "root", [totp_code(secret, 1)]).rc != 0
    assert "writable by group or others" in mfa.log.read_text()


def test_imported_dependency_or_bytecode_that_others_can_change_is_refused(
    mfa: Mfa, tmp_path: Path, pam_service: Callable[..., str]
) -> None:
    """Not only mfaguard's own files: every module loaded from its tree or venv, .pyc files included."""
    import shutil

    from pam_helpers import ENTRY_FILE

    tree = tmp_path / "tree"
    for package in ("pam_module", "devicedb"):
        shutil.copytree(ENTRY_FILE.parents[1] / package, tree / package)
    venv = tmp_path / "venv"
    lib = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    copied = venv / "lib" / lib.parent.name / "site-packages"
    shutil.copytree(lib, copied, symlinks=True, ignore=shutil.ignore_patterns("__editable__*"))
    for folder in (tree, venv):
        os.chmod(folder, 0o755)  # noqa: S103 - root-owned, not writable by others
    secret = mfa.enroll("root")
    line = (
        mfa.pam_line("auth", options="tries=1")
        .replace(str(ENTRY_FILE), str(tree / "pam_module/pam_mfaguard.py"))
        .replace(f"venv={sys.prefix}", f"venv={venv}")
    )
    service = pam_service([line, "auth required pam_permit.so"])
    wait_for_fresh_step()
    assert pamtester(service, "root", [totp_code(secret)]).rc == 0, mfa.log.read_text()[-2000:]
    target = copied / "pyotp" / "otp.py"
    os.chmod(target, 0o666)  # noqa: S103 - the unsafe mode under test
    assert pamtester(service, "root", [totp_code(secret, 1)]).rc != 0
    assert "refusing to import code that others can change" in mfa.log.read_text()
    os.chmod(target, 0o644)
    pyc = next((tree / "devicedb" / "__pycache__").glob("verifier.*.pyc"))
    os.chmod(pyc, 0o666)  # noqa: S103 - a planted .pyc would run as root
    assert pamtester(service, "root", [totp_code(secret, 1)]).rc != 0


# -- the caller's environment: under sudo and su it is the invoking user's ---------------------------------


def test_a_line_without_config_never_reads_mfaguard_config(mfa: Mfa, pam_service: Callable[..., str]) -> None:
    """`MFAGUARD_CONFIG=/etc/.pwd.lock sudo ...` once chose the settings (all defaults). A line without
    config= reads /etc/mfaguard/mfaguard.yaml, whatever the environment says."""
    user = unique("mfgtenv")
    secret = mfa.enroll(user)
    with_config = mfa.pam_line("auth", options="tries=1")
    without = with_config.replace(f" config={mfa.config}", "")
    assert "config=" not in without
    service = pam_service([without])
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MFAGUARD_CONFIG": str(mfa.config)}
    wait_for_fresh_step()
    code = totp_code(secret)
    r = pamtester(service, user, [code], env=env)
    assert r.rc != 0, r
    assert mfa.audit(user) == [] or "accepted" not in [row.reason for row in mfa.audit(user)]
    if not DEFAULT_CONFIG_PATH.exists():
        assert f"{DEFAULT_CONFIG_PATH}: config file not found" in mfa.log.read_text()
    # The same code through a line that names the file: it is the PAM line that counts.
    assert pamtester(pam_service([with_config]), user, [code], env=env).rc == 0


def test_python_variables_of_the_caller_are_ignored(mfa: Mfa, tmp_path: Path, pam_service: Callable[..., str]) -> None:
    """pam_python's interpreter is isolated: PYTHONPATH (a sitecustomize.py that would run as root),
    PYTHONHOME, PYTHONSTARTUP, PYTHONWARNINGS and the user site do not reach it; nor do HOME and TMPDIR
    change anything mfaguard does."""
    planted = tmp_path / "planted"
    planted.mkdir()
    marker = tmp_path / "ran-as-root"
    for name in ("sitecustomize.py", "usercustomize.py", "startup.py"):
        (planted / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    secret = mfa.enroll("root")
    service = pam_service([mfa.pam_line("auth", options="tries=1")])
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(planted),
        "PYTHONHOME": str(planted),
        "PYTHONSTARTUP": str(planted / "startup.py"),
        "PYTHONINSPECT": "1",
        "PYTHONWARNINGS": "error",
        "PYTHONUSERBASE": str(planted),
        "HOME": str(planted),
        "TMPDIR": str(planted),
        "MFAGUARD_CONFIG": "/etc/.pwd.lock",
    }
    wait_for_fresh_step()
    r = pamtester(service, "root", [totp_code(secret)], env=env)
    assert r.rc == 0, (r, mfa.log.read_text()[-2000:])
    assert not marker.exists()
    assert sorted(p.name for p in planted.iterdir()) == ["sitecustomize.py", "startup.py", "usercustomize.py"]
