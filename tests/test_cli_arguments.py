"""mfa-admin's arguments are checked before anything reaches the core: integers SQLite cannot hold,
negative ids and counts, and the FIDO, pam_u2f and user-name checks that come before any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import make_config, run_cli

from devicedb.manage import DeviceManager
from devicedb.models import Context
from devicedb.settings import load_settings
from devicedb.store import Store

HUGE = "99999999999999999999"  # above SQLite's largest INTEGER, 2**63 - 1
TOO_BIG = str(2**63)
NEGATIVE = "-1"
CTX = Context(service="test")

# (command before the value, command after it, the option or argument the error must name)
INTEGER_ARGUMENTS = [
    (["devices", "enable", "alice"], [], "DEVICE"),
    (["devices", "disable", "alice"], [], "DEVICE"),
    (["devices", "remove", "alice"], [], "DEVICE"),
    (["devices", "rename", "alice"], ["new label"], "DEVICE"),
    (["devices", "resync", "alice"], ["123456", "654321"], "DEVICE"),
    (["audit", "show", "--limit"], [], "--limit"),
    (["audit", "export", "--after-id"], [], "--after-id"),
    (["enroll", "totp", "alice", "--no-confirm", "--no-qr", "--digits"], [], "--digits"),
    (["enroll", "totp", "alice", "--no-confirm", "--no-qr", "--period"], [], "--period"),
    (["enroll", "totp-token", "alice", "--digits"], [], "--digits"),
    (["enroll", "totp-token", "alice", "--period"], [], "--period"),
    (["enroll", "hotp", "alice", "--digits"], [], "--digits"),
    (["enroll", "hotp", "alice", "--counter"], [], "--counter"),
    (["enroll", "hotp", "alice", "--look-ahead"], [], "--look-ahead"),
    (["enroll", "hotp", "alice", "--resync-window"], [], "--resync-window"),
]
IDS = [" ".join(before[:2] + [name]) for before, _after, name in INTEGER_ARGUMENTS]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    folder = tmp_path / "inst"
    folder.mkdir()
    return make_config(folder)


def state(config: Path) -> tuple[int, int]:
    with Store.open(load_settings(str(config))) as store:
        return len(store.audit_rows()), len(store.list_devices())


@pytest.mark.parametrize("value", [HUGE, TOO_BIG, NEGATIVE, "-" + HUGE, "١٢", "1_0", " 7"])
@pytest.mark.parametrize(("before", "after", "name"), INTEGER_ARGUMENTS, ids=IDS)
def test_an_integer_out_of_range_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str], before: list[str], after: list[str], name: str, value: str
) -> None:
    with Store.open(load_settings(str(config))) as store:
        DeviceManager(store).enroll_totp("alice", CTX, pending=False)
    kept = state(config)
    capsys.readouterr()
    rc, out, err = run_cli(config, *before, value, *after, stdin="3132333435363738393031323334353637383930\n")
    printed = capsys.readouterr().err + err
    assert rc == 2, printed
    assert "Traceback" not in printed and "OverflowError" not in printed
    assert f"argument {name}" in printed or name in printed, printed
    assert " is not " in printed and "use " in printed, printed  # says what is accepted
    assert state(config) == kept


def test_the_largest_integer_sqlite_holds_reaches_the_core(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top = str(2**63 - 1)
    rc, _out, err = run_cli(config, "devices", "disable", "alice", top)
    assert rc == 5 and "alice" in err, err  # no such device: refused by the core, no crash
    rc, out, err = run_cli(config, "audit", "show", "--limit", top)
    assert rc == 0, err
    rc, out, err = run_cli(config, "audit", "export", "--after-id", top)
    assert rc == 0 and out == "", err
    rc, out, err = run_cli(config, "audit", "export", "--after-id", "0")
    assert rc == 0 and out, err


@pytest.mark.parametrize("command", [["audit", "show"], ["audit", "export"]], ids=" ".join)
@pytest.mark.parametrize("value", [HUGE + "d", "36501d", "9" * 400 + "s", "-5m", "5 m", "1y"])
def test_since_out_of_range_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str], command: list[str], value: str
) -> None:
    rc, _out, err = run_cli(config, *command, f"--since={value}")
    printed = capsys.readouterr().err + err
    assert rc == 2, printed
    assert "argument --since" in printed and "Traceback" not in printed
    assert "30m" in printed or "days" in printed


def test_since_within_range_works(config: Path) -> None:
    for value in ("36500d", "5214w", "1s", "2026-12-01", "1970-01-01T00:00:00Z"):
        rc, _out, err = run_cli(config, "audit", "export", "--since", value)
        assert rc == 0, (value, err)


# -- enroll fido: the arguments first, then the key ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["alice", "--rp-id", ""], "--rp-id '' is not an RP id"),
        (["alice", "--rp-id", "pam://"], "--rp-id 'pam://' is not an RP id"),
        (["alice", "--rp-id", "pam://a b"], "is not an RP id"),
        (["al ice"], "holds white space"),
        ([" alice"], "leading or trailing whitespace"),
        (["alice\x07"], "control or format character"),
        (["alice", "--label", "x" * 5000], "label"),
        (["alice", "--label", ""], "label"),
    ],
    ids=[
        "empty rp id",
        "rp id without host",
        "rp id with space",
        "user with a space",
        "leading space",
        "control char",
        "5000-char label",
        "empty label",
    ],
)
def test_enroll_fido_checks_its_arguments_before_looking_for_a_key(
    config: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    from pam_module import fido

    looked: list[bool] = []
    monkeypatch.setattr(fido, "attached_keys", lambda: looked.append(True) or [])
    kept = state(config)
    rc, _out, err = run_cli(config, "enroll", "fido", *args)
    assert rc == 5, err
    assert message in err and "no FIDO2 key found" not in err, err
    assert looked == [], "the key was looked for before the arguments were checked"
    assert state(config) == kept


def test_enroll_fido_with_good_arguments_then_looks_for_the_key(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pam_module import fido

    monkeypatch.setattr(fido, "attached_keys", lambda: [])
    rc, _out, err = run_cli(config, "enroll", "fido", "root", "--rp-id", "pam://vpn.example.com", "--label", "k")
    assert rc == 5 and "no FIDO2 key found" in err, err


def test_enroll_ssh_key_refuses_a_name_with_white_space_and_a_bad_label_first(config: Path, tmp_path: Path) -> None:
    pub = tmp_path / "missing.pub"  # never read: the name is refused before
    rc, _out, err = run_cli(config, "enroll", "ssh-key", "al ice", "-", stdin="")
    assert rc == 5 and "holds white space" in err, err
    assert not pub.exists()


# -- a name that is no account here: a warning only ----------------------------------------------------------


def _no_such_account() -> str:
    import pwd

    name = "mfaguard-no-such-user"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    return name


@pytest.mark.parametrize(
    "command",
    [
        ["enroll", "totp", "{u}", "--no-confirm", "--no-qr"],
        ["backup-codes", "generate", "{u}"],
        ["unlock", "{u}"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_name_that_is_not_a_system_account_gets_a_warning_not_an_error(config: Path, command: list[str]) -> None:
    name = _no_such_account()
    rc, _out, err = run_cli(config, *[part.format(u=name) for part in command])
    assert rc == 0, err
    assert f"warning: '{name}' is not an account on this system" in err and "RADIUS" in err, err
    rc, _out, err = run_cli(config, *[part.format(u="root") for part in command])
    assert rc == 0 and "not an account" not in err, err


def test_enroll_totp_eof_at_the_prompt_says_no_code_was_entered(config: Path) -> None:
    rc, _out, err = run_cli(config, "enroll", "totp", "root", "--no-qr", stdin="")
    assert rc == 1, err
    assert "no code was entered" in err and "discarded" in err, err
    assert "clock" not in err, err
    assert state(config)[1] == 0
    # After a wrong code, the clock is still the likely culprit.
    rc, _out, err = run_cli(config, "enroll", "totp", "root", "--no-qr", stdin="000000\n")
    assert rc == 1 and "Check the phone's clock" in err, err
    assert os.path.exists(config)


# -- file arguments: a regular file of a sane size, never /dev/zero or a FIFO -------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["enroll", "ssh-key", "root", "{f}"],
        ["tokens", "import", "csv", "{f}"],
        ["tokens", "import", "pskc", "{f}"],
        ["enroll", "hotp", "root", "--secret-file", "{f}"],
    ],
)
@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_file_arguments_refuse_devices_and_fifos(config: Path, tmp_path: Path, args: list[str], kind: str) -> None:
    # The fault: /dev/zero grew the process by gigabytes, and a FIFO hung the command.
    if kind == "zero":
        path = "/dev/zero"
    else:
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    kept = state(config)
    rc, _out, err = run_cli(config, *[a.replace("{f}", path) for a in args])
    assert rc == 2 and "not a regular file" in err, err
    assert state(config) == kept


def test_a_file_argument_larger_than_its_kind_is_refused(config: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.pub"
    big.write_bytes(b"sk-ssh-ed25519@openssh.com " + b"A" * 70000 + b"\n")
    rc, _out, err = run_cli(config, "enroll", "ssh-key", "root", str(big))
    assert rc == 2 and "larger than" in err, err
    rc, _out, err = run_cli(config, "enroll", "ssh-key", "root", "-")
    assert rc != 0


def test_standard_input_is_read_to_a_limit(config: Path) -> None:
    rc, _out, err = run_cli(config, "enroll", "ssh-key", "root", "-", stdin="A" * 200000)
    assert rc == 2 and "longer than" in err, err
