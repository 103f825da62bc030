"""Modes challenge and append: the first factor through python-pam (pam_unix, a test user), State rules,
pam_radius_auth driven by pamtester, and one replay ledger shared with the other front ends."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from radius_helpers import (
    REPO,
    SECRET,
    Daemon,
    PamUser,
    RadiusEnv,
    access_request,
    check_reply,
    clear_of_step_boundary,
    client,
    need_binary,
    need_root,
    radclient,
    reply_message,
    state_of,
)

from radius_server import protocol as p


@pytest.fixture(scope="module")
def challenge(renv: RadiusEnv, pam_user: PamUser) -> Daemon:
    entry = client("challenge", require_message_authenticator=False, reply={"Filter-Id": "vpn"})
    return renv.radiusd([entry], first_factor=pam_user.service, extra={"state_lifetime": 10})


@pytest.fixture(scope="module")
def append(renv: RadiusEnv, pam_user: PamUser) -> Daemon:
    return renv.radiusd([client("append")], first_factor=pam_user.service)


@pytest.fixture
def user(renv: RadiusEnv, pam_user: PamUser) -> Any:
    """The system test user with a fresh TOTP device (the old one removed), so each test starts clean."""
    from devicedb.manage import DeviceManager
    from devicedb.models import Context

    with renv.store() as store:
        manager = DeviceManager(store)
        for device in manager.list_devices(pam_user.name):
            manager.remove(pam_user.name, device.id, Context(service="test"))
        manager.unlock(pam_user.name, Context(service="test"))
    return renv.enroll(user=pam_user.name)


def ask(
    udp: Any, port: int, user: str, password: str, extra: list[tuple[int, bytes]] | None = None
) -> tuple[int, bytes]:
    packet, _ = access_request(user, password, extra=extra)
    reply = udp(port).ask(packet, timeout=5)
    code = check_reply(reply, packet)
    assert reply is not None
    return code, reply


# ---------------------------------------------------------------------------
# challenge


def test_challenge_round_trip_with_radclient(challenge: Daemon, user: Any, pam_user: PamUser) -> None:
    clear_of_step_boundary(margin=8)
    out = radclient(challenge.port, f'User-Name = "{user.user}", User-Password = "{pam_user.password}"')
    assert "Received Access-Challenge" in out, out
    state = re.search(r"State = (0x[0-9a-f]+)", out)
    assert state is not None and len(state.group(1)) >= 2 + 32  # at least 16 bytes
    second = f'User-Name = "{user.user}", User-Password = "{user.code()}", State = {state.group(1)}'
    out = radclient(challenge.port, second)
    assert "Received Access-Accept" in out and 'Filter-Id = "vpn"' in out, out
    out = radclient(challenge.port, second)  # the State was used once
    assert "Received Access-Reject" in out, out


def test_wrong_password_gets_no_challenge_and_consumes_no_code(
    challenge: Daemon, user: Any, udp: Any, renv: RadiusEnv
) -> None:
    before = renv.audit(user.user)
    code, reply = ask(udp, challenge.port, user.user, "not-the-password")
    assert code == p.ACCESS_REJECT and reply_message(reply) == "Verification failed."
    after = renv.audit(user.user)
    # One audit row says so (never the password); no code was tried and no counter moved.
    assert [r["reason"] for r in after[len(before) :]] == ["first factor failed"]
    assert "not-the-password" not in repr(after)
    with renv.store() as store:
        assert store.lock_state(user.user).failures == 0


def test_code_in_place_of_the_password_never_skips_the_first_factor(challenge: Daemon, user: Any, udp: Any) -> None:
    clear_of_step_boundary()
    code, _ = ask(udp, challenge.port, user.user, user.code())
    assert code == p.ACCESS_REJECT


def test_state_is_bound_to_the_user_and_used_once(
    challenge: Daemon, user: Any, pam_user: PamUser, udp: Any, renv: RadiusEnv
) -> None:
    clear_of_step_boundary(margin=8)
    code, reply = ask(udp, challenge.port, user.user, pam_user.password)
    assert code == p.ACCESS_CHALLENGE and "one-time code" in reply_message(reply)
    state = state_of(reply)
    other = renv.enroll()
    code, _ = ask(udp, challenge.port, other.user, other.code(), extra=[(p.STATE, state)])
    assert code == p.ACCESS_REJECT  # a State issued to another user
    code, _ = ask(udp, challenge.port, user.user, user.code(), extra=[(p.STATE, state)])
    assert code == p.ACCESS_REJECT  # ... and it is gone now
    code, _ = ask(udp, challenge.port, user.user, user.code(), extra=[(p.STATE, os.urandom(32))])
    assert code == p.ACCESS_REJECT  # unknown State
    # nothing above consumed the code
    code, reply = ask(udp, challenge.port, user.user, pam_user.password)
    code, _ = ask(udp, challenge.port, user.user, user.code(), extra=[(p.STATE, state_of(reply))])
    assert code == p.ACCESS_ACCEPT


def test_three_code_attempts_per_state(challenge: Daemon, user: Any, pam_user: PamUser, udp: Any) -> None:
    clear_of_step_boundary(margin=8)
    code, reply = ask(udp, challenge.port, user.user, pam_user.password)
    for attempt in range(3):
        old = state_of(reply)
        code, reply = ask(udp, challenge.port, user.user, user.wrong(), extra=[(p.STATE, old)])
        if attempt < 2:
            assert code == p.ACCESS_CHALLENGE and state_of(reply) != old
        else:
            assert code == p.ACCESS_REJECT
    code, _ = ask(udp, challenge.port, user.user, user.code(), extra=[(p.STATE, old)])
    assert code == p.ACCESS_REJECT


@pytest.mark.slow
def test_expired_state_is_rejected(challenge: Daemon, user: Any, pam_user: PamUser, udp: Any) -> None:
    code, reply = ask(udp, challenge.port, user.user, pam_user.password)
    assert code == p.ACCESS_CHALLENGE
    time.sleep(10.5)  # state_lifetime: 10 in this server's config
    clear_of_step_boundary()
    code, _ = ask(udp, challenge.port, user.user, user.code(), extra=[(p.STATE, state_of(reply))])
    assert code == p.ACCESS_REJECT


def test_slow_first_factor_does_not_stall_other_users(
    challenge: Daemon, user: Any, pam_user: PamUser, renv: RadiusEnv, udp: Any
) -> None:
    # A wrong password for a user without nodelay would wait; here a flood of first-factor
    # requests runs in the thread pool while a Status-Server is answered at once.
    clients = [udp(challenge.port) for _ in range(6)]
    for c in clients:
        packet, _ = access_request(user.user, pam_user.password)
        c.send(packet)
    status = p.build_request(p.STATUS_SERVER, 1, os.urandom(16), SECRET.encode(), [])
    started = time.monotonic()
    s = udp(challenge.port)
    assert check_reply(s.ask(status), status) == p.ACCESS_ACCEPT
    assert time.monotonic() - started < 1.0
    for c in clients:
        assert c.recv(timeout=5) is not None


# ---------------------------------------------------------------------------
# pam_radius_auth through pamtester, answering the challenge prompt like a VPN client


@pytest.fixture
def pam_radius_service(challenge: Daemon, tmp_path: Path) -> Iterator[str]:
    need_binary("pamtester")
    module = next(
        (
            m
            for m in ("/lib/x86_64-linux-gnu/security/pam_radius_auth.so", "/lib/security/pam_radius_auth.so")
            if os.path.exists(m)
        ),
        None,
    )
    from radius_helpers import need

    need(module is not None, "needs libpam-radius-auth (run scripts/setup-env as root)")
    conf = tmp_path / "pam_radius_auth.conf"
    conf.write_text(f"127.0.0.1:{challenge.port} {SECRET} 5\n")
    os.chmod(conf, 0o600)
    service = f"mfaguard-test-pamradius-{secrets.token_hex(3)}"
    pam_file = Path("/etc/pam.d") / service
    pam_file.write_text(f"auth required pam_radius_auth.so conf={conf}\naccount required pam_permit.so\n")
    try:
        yield service
    finally:
        pam_file.unlink(missing_ok=True)


def pamtester(service: str, user: str, answers: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pamtester", "-v", service, user, "authenticate"],
        input="".join(a + "\n" for a in answers),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pam_radius_auth_answers_the_challenge(
    pam_radius_service: str, user: Any, pam_user: PamUser, renv: RadiusEnv
) -> None:
    clear_of_step_boundary(margin=10)
    code = user.code()
    done = pamtester(pam_radius_service, user.user, [pam_user.password, code])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Enter the one-time code" in done.stdout + done.stderr
    again = pamtester(pam_radius_service, user.user, [pam_user.password, code, code, code])
    assert again.returncode != 0  # replay
    wrong = pamtester(pam_radius_service, user.user, ["bad password"])
    assert wrong.returncode != 0


# ---------------------------------------------------------------------------
# append


def test_append_accept_then_wrong_code_then_replay(
    append: Daemon, user: Any, pam_user: PamUser, renv: RadiusEnv
) -> None:
    clear_of_step_boundary()
    before = {r["id"] for r in renv.audit(user.user)}
    code = user.code()
    ma = ", Message-Authenticator = 0x00"
    out = radclient(append.port, f'User-Name = "{user.user}", User-Password = "{pam_user.password}{code}"' + ma)
    assert "Received Access-Accept" in out, out
    out = radclient(append.port, f'User-Name = "{user.user}", User-Password = "{pam_user.password}{user.wrong()}"' + ma)
    assert "Received Access-Reject" in out, out
    out = radclient(append.port, f'User-Name = "{user.user}", User-Password = "{pam_user.password}{code}"' + ma)
    assert "Received Access-Reject" in out, out
    reasons = [r["reason"] for r in renv.audit(user.user) if r["event"] == "auth" and r["id"] not in before]
    assert reasons.count("accepted") == 1 and "bad code" in reasons and "replay: code already used" in reasons


def test_append_wrong_password_consumes_no_code(append: Daemon, user: Any, pam_user: PamUser, udp: Any) -> None:
    clear_of_step_boundary()
    code, _ = ask(udp, append.port, user.user, "wrong-password" + user.code())
    assert code == p.ACCESS_REJECT
    code, _ = ask(udp, append.port, user.user, user.code())  # the code alone is not enough
    assert code == p.ACCESS_REJECT
    code, _ = ask(udp, append.port, user.user, pam_user.password + user.code())
    assert code == p.ACCESS_ACCEPT


def test_append_user_without_device_is_rejected(append: Daemon, pam_user: PamUser, udp: Any, renv: RadiusEnv) -> None:
    from devicedb.manage import DeviceManager
    from devicedb.models import Context

    with renv.store() as store:
        manager = DeviceManager(store)
        for device in manager.list_devices(pam_user.name):
            manager.remove(pam_user.name, device.id, Context(service="test"))
    code, _ = ask(udp, append.port, pam_user.name, pam_user.password + "123456")
    assert code == p.ACCESS_REJECT
    assert any(r["reason"] == "no device enrolled" for r in renv.audit(pam_user.name))


# ---------------------------------------------------------------------------
# one replay ledger across front ends


def _admin_verify(renv: RadiusEnv, config: Path, user: str, code: str) -> int:
    exe = REPO / ".venv" / "bin" / "mfa-admin"
    cmd = [str(exe)] if exe.exists() else ["mfa-admin"]
    return subprocess.run([*cmd, "--config", str(config), "verify", user, code], capture_output=True).returncode


def test_code_used_through_radius_is_a_replay_elsewhere_and_back(
    append: Daemon, user: Any, pam_user: PamUser, udp: Any, renv: RadiusEnv
) -> None:
    clear_of_step_boundary(margin=8)
    config = renv.write_config({"clients": []})
    code = user.code()
    assert ask(udp, append.port, user.user, pam_user.password + code)[0] == p.ACCESS_ACCEPT
    assert _admin_verify(renv, config, user.user, code) == 1
    following = user.code(30)
    assert _admin_verify(renv, config, user.user, following) == 0
    assert ask(udp, append.port, user.user, pam_user.password + following)[0] == p.ACCESS_REJECT


def test_one_code_ledger_shared_with_the_pam_module(
    append: Daemon, user: Any, pam_user: PamUser, udp: Any, renv: RadiusEnv, tmp_path: Path
) -> None:
    import sys

    from radius_helpers import need

    entry = REPO / "pam_module" / "pam_mfaguard.py"
    pam_python = next((m for m in ("/lib/security/pam_python.so",) if os.path.exists(m)), None)
    need(entry.exists(), "needs pam_module/pam_mfaguard.py (the PAM front end)")
    need(pam_python is not None, "needs libpam-python")
    need_binary("pamtester")
    config = renv.write_config({"clients": []})
    service = f"mfaguard-test-radpam-{secrets.token_hex(3)}"
    pam_file = Path("/etc/pam.d") / service
    log = tmp_path / "pam.log"
    pam_file.write_text(f"auth required {pam_python} {entry} config={config} venv={sys.prefix} log={log}\n")
    try:
        clear_of_step_boundary(margin=8)
        code = user.code()
        assert ask(udp, append.port, user.user, pam_user.password + code)[0] == p.ACCESS_ACCEPT
        assert pamtester(service, user.user, [code]).returncode != 0  # used through RADIUS: a replay for PAM
        following = user.code(30)
        done = pamtester(service, user.user, [following])
        assert done.returncode == 0, done.stdout + done.stderr + (log.read_text() if log.exists() else "")
        assert ask(udp, append.port, user.user, pam_user.password + following)[0] == p.ACCESS_REJECT
    finally:
        pam_file.unlink(missing_ok=True)


def test_append_runs_the_first_factor_even_for_a_user_without_device(renv: RadiusEnv, udp: Any, tmp_path: Any) -> None:
    """Otherwise the time to answer (no PAM failure delay) would tell who has a device."""
    need_root()
    marker = tmp_path / "first-factor-ran"
    service = f"mfaguard-test-ff-mark-{secrets.token_hex(3)}"
    path = Path("/etc/pam.d") / service
    try:
        path.write_text(f"auth optional pam_exec.so quiet /usr/bin/touch {marker}\nauth required pam_unix.so\n")
        daemon = renv.radiusd([client("append")], first_factor=service)
        code, _ = ask(udp, daemon.port, f"ghost{secrets.token_hex(3)}", "some-password123456")
        assert code == p.ACCESS_REJECT
        assert marker.exists()
    finally:
        path.unlink(missing_ok=True)
