"""sshd's publickey check (`check=publickey-used`) through the stand-in pam_python handle.

It answers PAM_SUCCESS only inside sshd and only when SSH_AUTH_INFO_0 shows a completed publickey
method; everything else, errors included, is PAM_IGNORE (the stack then asks for the password)."""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pam_handle import FakePamHandle

from pam_module import publickey_check

ARGV = ["pam_mfaguard.py", "check=publickey-used", "venv=/opt/mfaguard/.venv"]


class Handle(FakePamHandle):
    PAM_PERM_DENIED = 6


def key_line(kind: str = "ssh-ed25519", blob_kind: str | None = None) -> str:
    blob = b"".join(len(p).to_bytes(4, "big") + p for p in ((blob_kind or kind).encode(), secrets.token_bytes(32)))
    return f"publickey {kind} {base64.b64encode(blob).decode()}"


@pytest.fixture(autouse=True)
def own_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The check's log (errors without log= included) goes to this test's folder, never /var/log."""
    fallback = tmp_path / "fallback" / "mfaguard.log"
    monkeypatch.setattr(publickey_check, "FALLBACK_LOG", str(fallback))
    _drop_handlers()
    yield fallback
    _drop_handlers()


def _drop_handlers() -> None:
    for handler in list(publickey_check.log.handlers):
        if isinstance(handler, logging.StreamHandler) and not type(handler).__module__.startswith("_pytest"):
            publickey_check.log.removeHandler(handler)
            handler.close()
    publickey_check._log_ready.clear()


@pytest.fixture
def in_sshd(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if pam_python ran inside sshd (/proc/self/exe is /usr/sbin/sshd there)."""
    monkeypatch.setattr(publickey_check, "running_program", lambda: "sshd")


def check(env: dict[str, Any], argv: list[str] | None = None) -> int:
    handle = Handle("alice", env, [])
    result = publickey_check.authenticate(handle, 0, argv or ARGV)
    assert handle.prompts == []  # the check never talks to the user
    return result


def test_no_environment_variable(in_sshd: None) -> None:
    assert check({}) == Handle.PAM_IGNORE


def test_only_keyboard_interactive_or_nothing_done_yet(in_sshd: None) -> None:
    assert check({"SSH_AUTH_INFO_0": ""}) == Handle.PAM_IGNORE  # what sshd sets before any method succeeded
    assert check({"SSH_AUTH_INFO_0": "keyboard-interactive/pam\n"}) == Handle.PAM_IGNORE
    assert check({"SSH_AUTH_INFO_0": "password\nkeyboard-interactive/pam\n"}) == Handle.PAM_IGNORE


def test_a_completed_publickey_method(in_sshd: None) -> None:
    assert check({"SSH_AUTH_INFO_0": key_line() + "\n"}) == Handle.PAM_SUCCESS
    two = f"{key_line()}\n{key_line('ecdsa-sha2-nistp256')}\n"
    assert check({"SSH_AUTH_INFO_0": two}) == Handle.PAM_SUCCESS
    sk = key_line("sk-ssh-ed25519@openssh.com")
    assert check({"SSH_AUTH_INFO_0": f"keyboard-interactive/pam\n{sk}\n"}) == Handle.PAM_SUCCESS
    cert = key_line("ssh-ed25519-cert-v01@openssh.com") + ' ID "alice@corp" (serial 7) CA ssh-ed25519 SHA256:abc'
    assert check({"SSH_AUTH_INFO_0": cert + "\n"}) == Handle.PAM_SUCCESS


@pytest.mark.parametrize(
    "value",
    [
        "publickey",  # no key, no newline
        "publickey\n",
        "publickey ssh-ed25519\n",
        "publickey ssh-ed25519 AAAA\n",  # not a key blob
        "publickey ssh-ed25519 !!!notbase64!!!\n",
        "publickey ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa").decode() + "\n",  # blob of another type
        "PUBLICKEY " + key_line()[len("publickey ") :] + "\n",
        " " + key_line() + "\n",
        key_line(),  # sshd ends every line with a newline
        key_line() + "\n\n",  # an empty line
        key_line() + "\x00\n",
        key_line() + "\nkeyboard-interactive/pam\x1b[2J\n",  # a control character on another line
        "garbage here\n" + key_line() + "\n",  # not one of sshd's method names
        "publickey-ish " + key_line()[len("publickey ") :] + "\n",
        "hostbased ssh-ed25519 AAAA client user alice\n",  # another method, not publickey
        "publickey ssh-ed25519 " + "A" * 70_000 + "\n",
    ],
)
def test_garbage_is_not_a_key_login(in_sshd: None, value: str) -> None:
    assert check({"SSH_AUTH_INFO_0": value}) == Handle.PAM_IGNORE


@pytest.mark.parametrize("value", [None, 7, b"publickey ssh-ed25519 AAAA\n", ["publickey"]])
def test_a_value_that_is_not_text(in_sshd: None, value: object) -> None:
    assert check({"SSH_AUTH_INFO_0": value}) == Handle.PAM_IGNORE


def test_outside_sshd_a_key_line_counts_for_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"SSH_AUTH_INFO_0": key_line() + "\n"}
    for program in ("sudo", "login", "su", "pamtester", "python3.11", "sshd-evil", ""):
        monkeypatch.setattr(publickey_check, "running_program", lambda p=program: p)
        assert check(env) == Handle.PAM_IGNORE, program
    monkeypatch.setattr(publickey_check, "running_program", lambda: "sshd-session")  # OpenSSH 9.8 and later
    assert check(env) == Handle.PAM_SUCCESS


def test_this_test_process_is_not_sshd() -> None:
    assert publickey_check.running_program() not in publickey_check.SSHD_PROGRAMS
    assert check({"SSH_AUTH_INFO_0": key_line() + "\n"}) == Handle.PAM_IGNORE


def test_an_unreadable_environment(in_sshd: None) -> None:
    class Broken(Handle):
        @property
        def env(self) -> Any:
            raise RuntimeError("no environment")

        @env.setter
        def env(self, value: Any) -> None:
            pass

    assert publickey_check.authenticate(Broken("alice", {}, []), 0, ARGV) == Handle.PAM_IGNORE


def test_an_error_inside_the_check_is_ignore(in_sshd: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_value: object) -> bool:
        raise ValueError("unexpected")

    monkeypatch.setattr(publickey_check, "publickey_completed", boom)
    assert check({"SSH_AUTH_INFO_0": key_line() + "\n"}) == Handle.PAM_IGNORE


@pytest.mark.parametrize(
    "argv",
    [
        ["e.py", "check=password-used"],
        ["e.py", "check=publickey-used", "check=publickey-used"],
        ["e.py", "check=publickey-used", "config=/etc/mfaguard/mfaguard.yaml"],  # a check line reads no settings
        ["e.py", "check=publickey-used", "tries=3"],
        ["e.py", "check=publickey-used", "log=relative.log"],
        ["e.py", "check=publickey-used", "nonsense"],
        ["e.py", "check"],
    ],
)
def test_bad_options_are_ignore(in_sshd: None, argv: list[str], own_log: Path) -> None:
    assert check({"SSH_AUTH_INFO_0": key_line() + "\n"}, argv) == Handle.PAM_IGNORE
    assert "the password is asked" in own_log.read_text()  # the reason is logged


def test_decisions_go_to_the_log_file(in_sshd: None, tmp_path: Path) -> None:
    log = tmp_path / "log" / "mfaguard.log"
    assert check({"SSH_AUTH_INFO_0": key_line() + "\n"}, [*ARGV, f"log={log}"]) == Handle.PAM_SUCCESS
    assert check({}, [*ARGV, f"log={log}"]) == Handle.PAM_IGNORE
    text = log.read_text()
    assert "a key was used; the password is not asked, the code is" in text
    assert "no publickey method in SSH_AUTH_INFO_0; the password is asked" in text
    assert "AAAA" not in text  # no key material in the log


def test_setcred_and_account(own_log: Path) -> None:
    handle = Handle("alice", {"SSH_AUTH_INFO_0": key_line() + "\n"}, [])
    assert publickey_check.setcred(handle, 0, ARGV) == Handle.PAM_IGNORE  # grants nothing
    assert publickey_check.acct_mgmt(handle, 0, ARGV) == Handle.PAM_PERM_DENIED  # not an account check
    assert "works only in the auth stack" in own_log.read_text()
