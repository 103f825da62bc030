"""mfa-admin enroll hotp and devices resync."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import make_config
from cli_helpers import run_cli as run

from devicedb.kinds import hotp

SEED = b"12345678901234567890"


def test_enroll_hotp_from_stdin_then_verify_and_resync(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    rc, out, err = run(config, "enroll", "hotp", "alice", "--label", "token 42", stdin=SEED.hex() + "\n")
    assert rc == 0, err
    assert "next counter 0" in out
    assert SEED.hex() not in out + err
    assert run(config, "verify", "alice", hotp.code_at(SEED, 6, "sha1", 0))[0] == 0
    rc, out, _ = run(config, "verify", "alice", hotp.code_at(SEED, 6, "sha1", 0))
    assert rc == 1 and "replay" in out
    far = [hotp.code_at(SEED, 6, "sha1", c) for c in (700, 701)]
    rc, out, err = run(config, "devices", "resync", "alice", "1", *far)
    assert rc == 0, err
    assert "next counter 702" in out
    assert run(config, "verify", "alice", hotp.code_at(SEED, 6, "sha1", 702))[0] == 0
    rc, _, err = run(config, "devices", "resync", "alice", "1", far[1], far[0])
    assert rc == 5 and "consecutive" in err


def test_enroll_hotp_rejects_bad_seeds(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert run(config, "enroll", "hotp", "alice", stdin="\n")[0] == 2
    assert run(config, "enroll", "hotp", "alice", stdin="not a seed!\n")[0] == 5
    assert run(config, "enroll", "hotp", "alice", stdin="00" * 9 + "\n")[0] == 5  # under 80 bits
    rc, out, _ = run(config, "devices", "list", "--json")
    assert rc == 0 and out.strip() == "[]"
    # base32 works too, and a short seed is kept but flagged.
    import base64

    rc, _, err = run(config, "enroll", "hotp", "alice", stdin=base64.b32encode(SEED[:10]).decode() + "\n")
    assert rc == 0 and "weak" in err


def test_resync_refuses_a_totp_device(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert run(config, "enroll", "totp", "alice", "--no-confirm", "--no-qr")[0] == 0
    rc, _, err = run(config, "devices", "resync", "alice", "1", "123456", "654321")
    assert rc == 5 and "HOTP" in err


def test_enroll_yubico(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    key = "0682952d3363f225654b58a73b131259"
    args = ["enroll", "yubico", "alice", "--public-id", "ndgtriluugng", "--private-id", "c5fc55c3767f"]
    rc, out, err = run(config, *args, stdin=key + "\n")
    assert rc == 0, err
    assert key not in out + err
    assert run(config, "verify", "alice", "ndgtriluugngkuhguutjdfihfkleuvnjtjiljkbtbngb")[0] == 0
    assert run(config, *args[:-1], "nothex", stdin=key + "\n")[0] == 5
    assert run(config, *args, stdin=key + "\n")[0] == 5  # the same AES key twice


def test_enroll_totp_token_and_resync(tmp_path: Path) -> None:
    import time

    from devicedb.kinds import totp

    config = make_config(tmp_path)
    seed = bytes(range(1, 21))
    rc, out, err = run(config, "enroll", "totp-token", "alice", "--label", "SN 1234", stdin=seed.hex() + "\n")
    assert rc == 0, err
    assert "drift +0 steps" in out
    now = time.time()
    codes = [totp.code_at(seed, 6, "sha1", 30, now + 30 * k) for k in (40, 41)]
    rc, out, err = run(config, "devices", "resync", "alice", "1", *codes)
    assert rc == 0, err
    assert "clock drift +41 steps" in out
    rc, out, _ = run(config, "devices", "list", "alice")
    assert "drift +41 steps" in out
