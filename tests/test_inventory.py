"""Token inventory: PSKC (RFC 6030) and CSV imports, all or nothing; assign, unassign, revoke."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cli_helpers import run_cli

from devicedb.errors import DeviceLimitError, DuplicateDeviceError, InvalidInput
from devicedb.importers import csvfile, pskc
from devicedb.inventory import Inventory
from devicedb.kinds import hotp, totp
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result

if TYPE_CHECKING:
    from conftest import MfaEnv

DATA = Path(__file__).parent / "data" / "pskc"
RFC_SECRET = b"12345678901234567890"
PRESHARED = bytes.fromhex("12345678901234567890123456789012")
CTX = Context(service="test")


def read(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("rfc6030-plain.pskc", {}),
        ("rfc6030-preshared.pskc", {"key": PRESHARED}),
        ("rfc6030-pbe.pskc", {"password": "qwerty"}),
    ],
)
def test_rfc6030_examples_give_the_rfc_secret(name: str, kw: dict[str, object]) -> None:
    (record,) = pskc.parse(read(name), **kw)  # type: ignore[arg-type]
    assert record.secret == RFC_SECRET
    assert (record.serial, record.kind, record.digits, record.counter) == ("987654321", "hotp", 8, 0)


def test_wrong_key_password_or_missing_key_are_errors() -> None:
    with pytest.raises(InvalidInput, match="MAC does not match|does not decrypt"):
        pskc.parse(read("rfc6030-preshared.pskc"), key=bytes(16))
    with pytest.raises(InvalidInput, match="--key-file"):
        pskc.parse(read("rfc6030-preshared.pskc"))
    with pytest.raises(InvalidInput, match="MAC does not match|does not decrypt"):
        pskc.parse(read("rfc6030-pbe.pskc"), password="QWERTY")
    with pytest.raises(InvalidInput, match="--password"):
        pskc.parse(read("rfc6030-pbe.pskc"))


def test_a_broken_mac_is_refused() -> None:
    data = read("rfc6030-preshared.pskc").replace(b"Su+NvtQfmvfJzF6bmQiJqoLRExc=", b"Su+NvtQfmvfJzF7bmQiJqoLRExc=")
    with pytest.raises(InvalidInput, match="KeyPackage 1: the seed's MAC does not match"):
        pskc.parse(data, key=PRESHARED)


def test_doctype_and_malformed_xml_are_refused() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><KeyContainer>&a;</KeyContainer>'
    with pytest.raises(InvalidInput, match="document type"):
        pskc.parse(bomb)
    with pytest.raises(InvalidInput, match="well-formed"):
        pskc.parse(b"<KeyContainer><KeyPackage>")
    with pytest.raises(InvalidInput, match="KeyContainer"):
        pskc.parse(b"<Other/>")


def two_packages(second_algorithm: str) -> bytes:
    plain = read("rfc6030-plain.pskc").decode()
    package = plain[plain.index("<KeyPackage>") : plain.index("</KeyPackage>") + len("</KeyPackage>")]
    second = (
        package.replace("987654321", "987654322")
        .replace("MTIzNDU2Nzg5MDEyMzQ1Njc4OTA=", "MDk4NzY1NDMyMTA5ODc2NTQzMjE=")
        .replace("urn:ietf:params:xml:ns:keyprov:pskc:hotp", second_algorithm)
    )
    return plain.replace("</KeyContainer>", second + "\n</KeyContainer>").encode()


def test_one_bad_key_package_imports_nothing(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise())
    inventory = Inventory(store)
    assert len(pskc.parse(two_packages("urn:ietf:params:xml:ns:keyprov:pskc:hotp"))) == 2
    with pytest.raises(InvalidInput, match="KeyPackage 2: algorithm"):
        inventory.import_tokens(pskc.parse(two_packages("urn:example:unknown")), "pskc:test", CTX)
    assert inventory.list() == []


def test_import_is_all_or_nothing_and_refuses_duplicates(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise())
    inventory = Inventory(store)
    records = pskc.parse(two_packages("urn:ietf:params:xml:ns:keyprov:pskc:hotp"))
    assert inventory.import_tokens(records, "pskc:a", CTX) == 2
    # The same serial again, with a fresh seed, is refused, and the good line with it is not stored.
    again = csvfile.parse(
        b"SN-NEW,"
        + os.urandom(20).hex().encode()
        + b",hotp,6,0\n987654321,"
        + os.urandom(20).hex().encode()
        + b",hotp,6,0\n"
    )
    with pytest.raises(DuplicateDeviceError, match="line 2: serial 987654321"):
        inventory.import_tokens(again, "csv:b", CTX)
    assert [t.serial for t in inventory.list()] == ["987654321", "987654322"]
    # The same seed under another serial is refused too.
    same_seed = csvfile.parse(b"SN-COPY," + RFC_SECRET.hex().encode() + b",hotp,6,0\n")
    with pytest.raises(DuplicateDeviceError, match="already imported or enrolled"):
        inventory.import_tokens(same_seed, "csv:c", CTX)
    # Seeds are sealed: the raw seed is nowhere in the database file.
    assert RFC_SECRET not in mfa_env.db_bytes()


def test_csv_errors_name_the_line() -> None:
    good = "serial,seed,type,digits,period\nSN1,3132333435363738393031323334353637383930,hotp,6,0\n"
    assert [r.serial for r in csvfile.parse(good.encode())] == ["SN1"]
    for bad, message in (
        ("SN1,not-a-seed!,hotp,6,0\n", "line 1: the seed is neither hex nor base32"),
        ("SN1,3132333435363738393031323334353637383930,hotp,7,0\n", "line 1: 7 digits"),
        ("\n# comment\nSN1,3132333435363738393031323334353637383930,totp,6,45\n", "line 3: period 45"),
        ("SN1,3132333435363738393031323334353637383930,hotp,6\n", "line 1: 4 fields"),
        ("SN1,31323334,hotp,6,0\n", "line 1: the seed is 32 bits"),
        ("SN1,3132333435363738393031323334353637383930,sms,6,0\n", "line 1: type 'sms'"),
    ):
        with pytest.raises(InvalidInput, match=message):
            csvfile.parse(bad.encode())


def test_assign_unassign_and_revoke(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise("max_devices: 2\n"))
    inventory = Inventory(store)
    totp_seed = os.urandom(20)
    lines = (
        f"HOTP-1,{RFC_SECRET.hex()},hotp,8,0\n"
        f"TOTP-1,{totp_seed.hex()},totp,6,30\n"
        f"HOTP-2,{os.urandom(20).hex()},hotp,6,5\n"
    )
    inventory.import_tokens(csvfile.parse(lines.encode()), "csv:test", CTX)
    assert {t.serial for t in inventory.list("unassigned")} == {"HOTP-1", "TOTP-1", "HOTP-2"}

    inventory.assign("HOTP-1", "alice", CTX)
    inventory.assign("TOTP-1", "alice", CTX)
    with pytest.raises(DeviceLimitError):
        inventory.assign("HOTP-2", "alice", CTX)  # the device limit applies
    assert [t.serial for t in inventory.list("unassigned")] == ["HOTP-2"]
    with pytest.raises(InvalidInput, match="assigned to alice"):
        inventory.assign("HOTP-1", "bob", CTX)

    verifier = mfa_env.verifier(store)
    assert verifier.verify("alice", hotp.code_at(RFC_SECRET, 8, "sha1", 0), CTX).result is Result.ACCEPTED
    now = mfa_env.clock()
    assert verifier.verify("alice", totp.code_at(totp_seed, 6, "sha1", 30, now), CTX).result is Result.ACCEPTED
    devices = DeviceManager(store).list_devices("alice")
    assert {d.params.get("serial") for d in devices} == {"HOTP-1", "TOTP-1"}

    inventory.unassign("TOTP-1", CTX)
    assert [d.params.get("serial") for d in DeviceManager(store).list_devices("alice")] == ["HOTP-1"]
    inventory.assign("TOTP-1", "bob", CTX)  # back in stock, then handed out again
    inventory.revoke("HOTP-1", CTX)
    assert DeviceManager(store).list_devices("alice") == []
    with pytest.raises(InvalidInput, match="revoked"):
        inventory.assign("HOTP-1", "carol", CTX)
    events = [r.event for r in store.audit_rows()]
    for event in ("tokens_imported", "token_assigned", "token_unassigned", "token_revoked"):
        assert event in events
    assert store.verify_audit().ok


def test_cli_tokens(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    config = tmp_path / "mfaguard.yaml"
    config.write_text(f"database:\n  path: {tmp_path}/db/m.db\n  key_file: {tmp_path}/key/seal.key\n")
    os.chmod(config, 0o600)
    assert run_cli(config, "init")[0] == 0
    keyfile = tmp_path / "transport.key"
    keyfile.write_text(PRESHARED.hex() + "\n")
    rc, out, err = run_cli(
        config, "tokens", "import", "pskc", str(DATA / "rfc6030-preshared.pskc"), "--key-file", str(keyfile)
    )
    assert rc == 0, err
    assert "imported 1 token" in out
    rc, _, err = run_cli(
        config, "tokens", "import", "pskc", str(DATA / "rfc6030-pbe.pskc"), "--password", stdin="qwerty\n"
    )
    assert rc == 5 and "already in the inventory" in err  # same serial as the file before
    rc, out, _ = run_cli(config, "tokens", "list", "--unassigned", "--json")
    assert rc == 0 and '"serial": "987654321"' in out and RFC_SECRET.hex() not in out
    assert run_cli(config, "tokens", "assign", "987654321", "alice")[0] == 0
    assert run_cli(config, "verify", "alice", hotp.code_at(RFC_SECRET, 8, "sha1", 0))[0] == 0
    assert run_cli(config, "tokens", "assign", "nope", "alice")[0] == 5
    assert run_cli(config, "tokens", "import", "csv", str(tmp_path / "missing.csv"))[0] == 2


YUBICO_LOG = (
    "LOGGING START,12/03/26 10:00\n"
    "Yubico OTP,12/03/26 10:01,1,ndgtriluugng,c5fc55c3767f,0682952d3363f225654b58a73b131259,,,0,0,0,0,0,0,0,0,0,0\n"
    "OATH-HOTP,12/03/26 10:02,2,cccccccccccb,,3132333435363738393031323334353637383930,,,0,0,0,8,0,0,0,0,0,0\n"
)


def test_yubikey_personalization_log_imports_both_kinds(mfa_env: MfaEnv) -> None:
    records = csvfile.parse(YUBICO_LOG.encode())
    assert [(r.serial, r.kind, r.digits) for r in records] == [
        ("ndgtriluugng", "yubico", 6),
        ("cccccccccccb", "hotp", 8),
    ]
    store = mfa_env.open(mfa_env.initialise())
    inventory = Inventory(store)
    inventory.import_tokens(records, "csv:log", CTX)
    # The private id is sealed with the key, not stored in the clear.
    assert b"c5fc55c3767f" not in mfa_env.db_bytes() and bytes.fromhex("c5fc55c3767f") not in mfa_env.db_bytes()
    inventory.assign("ndgtriluugng", "alice", CTX)
    inventory.assign("cccccccccccb", "bob", CTX)
    verifier = mfa_env.verifier(store)
    otp = "ndgtriluugngkuhguutjdfihfkleuvnjtjiljkbtbngb"
    assert verifier.verify("alice", otp, CTX).result is Result.ACCEPTED
    assert verifier.verify("alice", otp, CTX).result is Result.REPLAY
    assert verifier.verify("bob", hotp.code_at(RFC_SECRET, 8, "sha1", 0), CTX).result is Result.ACCEPTED


def test_yubikey_log_lines_without_codes_are_refused() -> None:
    with pytest.raises(InvalidInput, match="line 1: a Static Password slot has no one-time codes"):
        csvfile.parse(b"Static Password,12/03/26 10:00,1,,d5a3d50327dc,0e8e37b0e38b314a56748c030f58d21d,,,0,0,0,0\n")
    with pytest.raises(InvalidInput, match="line 1: no public id"):
        csvfile.parse(b"OATH-HOTP,12/03/26 10:02,2,,,3132333435363738393031323334353637383930,,,0,0,0,6\n")


def test_a_token_handed_out_again_keeps_its_used_codes_used(mfa_env: MfaEnv) -> None:
    """Unassign and assign (or a device removed by hand) must not reset the replay state."""
    store = mfa_env.open(mfa_env.initialise())
    inventory = Inventory(store)
    totp_seed = os.urandom(20)
    lines = f"H-1,{RFC_SECRET.hex()},hotp,6,0\nT-1,{totp_seed.hex()},totp,6,30\n"
    inventory.import_tokens(csvfile.parse(lines.encode()), "csv:test", CTX)
    verifier = mfa_env.verifier(store)
    now = mfa_env.clock()
    inventory.assign("H-1", "alice", CTX)
    inventory.assign("T-1", "alice", CTX)
    assert verifier.verify("alice", hotp.code_at(RFC_SECRET, 6, "sha1", 3), CTX).accepted
    totp_code = totp.code_at(totp_seed, 6, "sha1", 30, now)
    assert verifier.verify("alice", totp_code, CTX).accepted
    inventory.unassign("H-1", CTX)
    inventory.unassign("T-1", CTX)
    inventory.assign("H-1", "bob", CTX)
    inventory.assign("T-1", "bob", CTX)
    assert verifier.verify("bob", hotp.code_at(RFC_SECRET, 6, "sha1", 2), CTX).result is Result.REPLAY
    assert verifier.verify("bob", hotp.code_at(RFC_SECRET, 6, "sha1", 3), CTX).result is Result.REPLAY
    assert verifier.verify("bob", totp_code, CTX).result is Result.REPLAY
    assert verifier.verify("bob", hotp.code_at(RFC_SECRET, 6, "sha1", 4), CTX).accepted
    # The same when the device is removed by hand first.
    device = next(d for d in DeviceManager(store).list_devices("bob") if d.kind == "hotp")
    DeviceManager(store).remove("bob", device.id, CTX)
    inventory.unassign("H-1", CTX)
    inventory.assign("H-1", "carol", CTX)
    assert verifier.verify("carol", hotp.code_at(RFC_SECRET, 6, "sha1", 4), CTX).result is Result.REPLAY


def test_hostile_seed_files_are_refused() -> None:
    plain = read("rfc6030-plain.pskc")
    utf16 = plain.decode().replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        pskc.parse(utf16)
    with pytest.raises(InvalidInput, match="document type"):
        pskc.parse(plain.replace(b"<KeyContainer", b"<!doctype x><KeyContainer", 1))
    preshared = read("rfc6030-preshared.pskc").decode()
    start = preshared.index("<xenc:EncryptionMethod", preshared.index("<MACKey>"))
    end = preshared.index("</MACKey>")
    plain_mac = preshared[:start] + "<PlainValue>AAECAwQFBgcICQoLDA0ODxAREhM=</PlainValue>\n" + preshared[end:]
    with pytest.raises(InvalidInput, match="MACKey is not encrypted"):
        pskc.parse(plain_mac.encode(), key=PRESHARED)
    with pytest.raises(InvalidInput, match="line 1: period-or-counter '1_000'"):
        csvfile.parse(b"SN1,3132333435363738393031323334353637383930,hotp,6,1_000\n")
    with pytest.raises(InvalidInput, match="all zero bytes"):
        csvfile.parse(b"SN1," + b"00" * 20 + b",hotp,6,0\n")
