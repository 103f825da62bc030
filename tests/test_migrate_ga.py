"""Migration from google-authenticator-libpam: secret, options and scratch codes."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cli_helpers import make_config
from cli_helpers import run_cli as cli

from devicedb.errors import InvalidInput
from devicedb.importers import google_authenticator
from devicedb.kinds import hotp, totp

SECRET_80 = bytes(range(10))  # the 80-bit secrets google-authenticator writes by default
SCRATCH = ["12345678", "87654321", "11223344"]


def ga_file(path: Path, *options: str, secret: bytes = SECRET_80, scratch: list[str] = SCRATCH) -> Path:
    lines = [base64.b32encode(secret).decode().rstrip("="), *[f'" {o}' for o in options], *scratch]
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o400)
    return path


def test_parse_options_and_scratch_codes() -> None:
    data = (
        f'{base64.b32encode(SECRET_80).decode()}\n" RATE_LIMIT 3 30 1700000000\n" WINDOW_SIZE 17\n'
        '" DISALLOW_REUSE 56666666\n" TOTP_AUTH\n12345678\n87654321\n'
    )
    ga = google_authenticator.parse(data.encode(), "f")
    assert (ga.kind, ga.step, ga.window, ga.disallow_reuse, ga.rate_limit) == ("totp", 30, 17, True, (3, 30))
    assert ga.scratch_codes == ("12345678", "87654321") and ga.weak
    for bad, message in (
        ("", "line 1"),
        ("!!!\n", "base32"),
        ("GEZDGNBV\n", "at least 80"),
        (base64.b32encode(SECRET_80).decode() + "\nhello\n", "line 2"),
    ):
        with pytest.raises(InvalidInput, match=message):
            google_authenticator.parse(bad.encode(), "f")


def test_totp_file_becomes_a_weak_device_and_backup_codes(config: Path, tmp_path: Path) -> None:
    import time

    path = ga_file(tmp_path / "ga", "RATE_LIMIT 3 30", "WINDOW_SIZE 17", "DISALLOW_REUSE", "TOTP_AUTH")
    rc, out, err = cli(config, "migrate", "google-authenticator", "alice", str(path))
    assert rc == 0, err
    assert "WINDOW_SIZE 17 -> not per device" in out and "RATE_LIMIT 3 30 -> mfaguard's lockout" in out
    assert "flagged weak" in out and "3 scratch code(s) -> backup codes" in out
    # The 80-bit secret keeps working ...
    assert cli(config, "verify", "alice", totp.code_at(SECRET_80, 6, "sha1", 30, time.time()))[0] == 0
    # ... and each scratch code works once.
    assert cli(config, "verify", "alice", SCRATCH[0])[0] == 0
    assert cli(config, "verify", "alice", SCRATCH[0])[0] == 1
    rc, out, _ = cli(config, "status", "alice", "--json")
    assert json.loads(out)["backup_codes_left"] == 2
    # Migrating the same file again is refused: the secret is already enrolled.
    rc, _, err = cli(config, "migrate", "google-authenticator", "alice", str(path))
    assert rc == 5 and "already enrolled" in err


def test_hotp_file_keeps_its_counter(config: Path, tmp_path: Path) -> None:
    path = ga_file(tmp_path / "ga", "HOTP_COUNTER 7", "WINDOW_SIZE 5", scratch=[], secret=bytes(range(20)))
    rc, out, err = cli(config, "migrate", "google-authenticator", "bob", str(path))
    assert rc == 0, err
    assert "next counter 7" in out and "HOTP look-ahead 5" in out
    assert cli(config, "verify", "bob", hotp.code_at(bytes(range(20)), 6, "sha1", 6))[0] == 1  # below the counter
    assert cli(config, "verify", "bob", hotp.code_at(bytes(range(20)), 6, "sha1", 8))[0] == 0


def test_symlinks_and_big_files_are_refused(config: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/etc/shadow")
    rc, _, err = cli(config, "migrate", "google-authenticator", "alice", str(link))
    assert rc == 5 and "symlinks are refused" in err
    big = tmp_path / "big"
    big.write_text("A" * 10000)
    assert cli(config, "migrate", "google-authenticator", "alice", str(big))[0] == 5


def test_all_walks_home_directories(config: Path) -> None:
    rc, out, _ = cli(config, "migrate", "google-authenticator", "--all")
    assert rc == 0 and "file(s) found" in out


def test_report_and_doctor_name_weak_secrets(config: Path, tmp_path: Path) -> None:
    path = ga_file(tmp_path / "ga", "TOTP_AUTH", scratch=[])
    assert cli(config, "migrate", "google-authenticator", "root", str(path))[0] == 0
    rc, out, _ = cli(config, "report", "--json")
    root = next(a for a in json.loads(out)["accounts"] if a["user"] == "root")
    assert root["status"] == "covered" and root["weak_devices"] == [1] and "WEAK" in root["note"]
    rc, out, _ = cli(config, "doctor", "--json", "--pam-dir", str(tmp_path))
    findings = json.loads(out)
    assert any(f["topic"] == "weak secrets" and "root" in f["text"] for f in findings)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return make_config(tmp_path)


def test_a_file_written_or_readable_by_others_is_refused(config: Path, tmp_path: Path) -> None:
    path = ga_file(tmp_path / "ga", "TOTP_AUTH")
    os.chmod(path, 0o644)
    rc, _, err = cli(config, "migrate", "google-authenticator", "alice", str(path))
    assert rc == 5 and "others could read or change" in err
    os.chmod(path, 0o400)
    os.chown(path, 65534, 65534)  # somebody else's file in this account's home
    rc, _, err = cli(config, "migrate", "google-authenticator", "root", str(path))
    assert rc == 5 and "not by the account or root" in err
    rc, out, _ = cli(config, "devices", "list", "--json")
    assert json.loads(out) == []


def test_existing_backup_codes_are_kept_unless_asked(config: Path, tmp_path: Path) -> None:
    assert cli(config, "backup-codes", "generate", "alice")[0] == 0
    path = ga_file(tmp_path / "ga", "TOTP_AUTH")
    rc, out, _ = cli(config, "migrate", "google-authenticator", "alice", str(path))
    assert rc == 0 and "NOT imported" in out
    rc, out, _ = cli(config, "status", "alice", "--json")
    assert json.loads(out)["backup_codes_left"] == 10
    path2 = ga_file(tmp_path / "ga2", "TOTP_AUTH", secret=bytes(range(30, 50)))
    rc, out, _ = cli(config, "migrate", "google-authenticator", "alice", str(path2), "--replace-backup-codes")
    assert rc == 0 and "10 older unused backup codes voided" in out
    rc, out, _ = cli(config, "status", "alice", "--json")
    assert json.loads(out)["backup_codes_left"] == len(SCRATCH)


def test_used_steps_stay_used_and_bad_values_are_refused(config: Path, tmp_path: Path) -> None:
    import time

    step = int(time.time() // 30)
    path = ga_file(tmp_path / "ga", f"DISALLOW_REUSE {step - 1} {step}", "TOTP_AUTH", scratch=[])
    rc, out, err = cli(config, "migrate", "google-authenticator", "alice", str(path))
    assert rc == 0, err
    assert "stay used" in out
    code_now = totp.code_at(SECRET_80, 6, "sha1", 30, step * 30)
    assert cli(config, "verify", "alice", code_now)[0] == 1  # google-authenticator already used it
    for option in ("HOTP_COUNTER 99999999999999999999999", "WINDOW_SIZE 0"):
        bad = ga_file(tmp_path / f"bad{len(option)}", option, secret=bytes(range(60, 80)))
        rc, _, err = cli(config, "migrate", "google-authenticator", "bob", str(bad))
        assert rc == 5, (option, err)
    zero = ga_file(tmp_path / "zero", "TOTP_AUTH", secret=bytes(10))
    assert cli(config, "migrate", "google-authenticator", "carol", str(zero))[0] == 5
