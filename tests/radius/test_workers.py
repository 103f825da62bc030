"""radius.workers: several processes on one socket, each user's requests served by one of them.

The kernel wakes whichever worker it likes for a datagram; a worker that reads another's request
hands it over. If that hand-over were missing, a retransmission read by the other worker would be
verified a second time (a replay Reject after the Accept), and an Access-Challenge's State would
be unknown to the worker that reads the answer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import Any

import pytest
from radius_helpers import (
    Daemon,
    PamUser,
    RadiusEnv,
    access_request,
    check_reply,
    clear_of_step_boundary,
    client,
    free_udp_port,
    state_of,
)
from test_operations import run

from devicedb.manage import DeviceManager
from devicedb.models import Context
from radius_server import protocol as p
from radius_server.workers import Inbox, encode_handover, owner_of

WORKERS = 3


def start_workers(renv: RadiusEnv, clients: list[dict[str, Any]], first_factor: str = "none") -> Daemon:
    daemon = renv.radiusd(clients, first_factor=first_factor, extra={"workers": WORKERS})
    deadline = time.monotonic() + 20
    while daemon.text().count("listening on") < WORKERS:
        assert time.monotonic() < deadline, daemon.text()
        assert daemon.proc.poll() is None, daemon.text()
        time.sleep(0.05)
    return daemon


def worker_pids(daemon: Daemon) -> dict[int, int]:
    found: dict[int, int] = {}
    for index, pid in re.findall(r"started worker (\d+) \(pid (\d+)\)", daemon.text()):
        found[int(index)] = int(pid)  # a restarted worker's newer pid wins
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_users_are_spread_over_the_workers_and_all_accepted(renv: RadiusEnv, udp: Any) -> None:
    daemon = start_workers(renv, [client("otp-only")])
    clear_of_step_boundary()
    users = [renv.enroll() for _ in range(12)]
    assert len({owner_of(u.user.encode(), WORKERS) for u in users}) > 1
    for u in users:
        request, _ = access_request(u.user, u.code())
        assert check_reply(udp(daemon.port).ask(request), request) == p.ACCESS_ACCEPT
        replay, _ = access_request(u.user, u.code())
        assert check_reply(udp(daemon.port).ask(replay), replay) == p.ACCESS_REJECT


def test_retransmissions_get_the_one_cached_reply_whichever_worker_reads_them(renv: RadiusEnv, udp: Any) -> None:
    daemon = start_workers(renv, [client("otp-only")])
    clear_of_step_boundary()
    for _ in range(6):
        u = renv.enroll()
        c = udp(daemon.port)
        request, _ = access_request(u.user, u.code())
        replies = [c.ask(request) for _ in range(4)]
        assert check_reply(replies[0], request) == p.ACCESS_ACCEPT
        assert all(r == replies[0] for r in replies), "a retransmission was verified again"
        assert [r["reason"] for r in renv.audit(u.user) if r["event"] == "auth"] == ["accepted"]


def test_challenge_answered_from_another_source_port_finds_its_state(
    renv: RadiusEnv, pam_user: PamUser, udp: Any
) -> None:
    daemon = start_workers(renv, [client("challenge")], first_factor=pam_user.service)
    with renv.store() as store:
        manager = DeviceManager(store)
        for device in manager.list_devices(pam_user.name):
            manager.remove(pam_user.name, device.id, Context(service="test"))
        manager.unlock(pam_user.name, Context(service="test"))
    # One device per round, so that each round's code is fresh within one time step.
    devices = [renv.enroll(user=pam_user.name) for _ in range(6)]
    clear_of_step_boundary(margin=10)
    for device in devices:
        first, _ = access_request(pam_user.name, pam_user.password)
        reply = udp(daemon.port).ask(first, timeout=5)
        assert check_reply(reply, first) == p.ACCESS_CHALLENGE
        assert reply is not None
        # The answer leaves from a new socket, as many NAS do: any worker may read it.
        answer, _ = access_request(pam_user.name, device.code(), extra=[(p.STATE, state_of(reply))])
        assert check_reply(udp(daemon.port).ask(answer, timeout=5), answer) == p.ACCESS_ACCEPT


def test_a_killed_worker_is_started_again_and_sigterm_stops_them_all(renv: RadiusEnv, udp: Any) -> None:
    daemon = start_workers(renv, [client("otp-only")])
    before = worker_pids(daemon)
    assert sorted(before) == list(range(WORKERS))
    os.kill(before[1], signal.SIGKILL)
    daemon.wait_for("starting it again")
    deadline = time.monotonic() + 20
    while daemon.text().count("listening on") < WORKERS + 1:
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.05)
    after = worker_pids(daemon)
    assert after[1] != before[1] and after[0] == before[0]
    clear_of_step_boundary()
    for _ in range(9):
        u = renv.enroll()
        request, _ = access_request(u.user, u.code())
        assert check_reply(udp(daemon.port).ask(request), request) == p.ACCESS_ACCEPT
    assert daemon.stop() == 0
    assert not any(alive(pid) for pid in after.values())


def test_a_second_copy_is_refused_while_workers_hold_the_port(renv: RadiusEnv) -> None:
    daemon = start_workers(renv, [client("otp-only")])
    config = renv.write_config({"listen": [f"127.0.0.1:{daemon.port}"], "first_factor": "none", "clients": []})
    done = run(config)
    assert done.returncode == 5 and "already in use" in done.stderr


def test_an_unusable_database_stops_the_start_before_any_worker(renv: RadiusEnv) -> None:
    port = free_udp_port()
    config = renv.write_config(
        {"listen": [f"127.0.0.1:{port}"], "first_factor": "none", "clients": [client("otp-only")], "workers": 2}
    )
    os.chmod(renv.db, 0o666)  # noqa: S103 - unsafe on purpose: refused
    try:
        done = run(config)
    finally:
        os.chmod(renv.db, 0o600)
    assert done.returncode == 4, done.stderr
    assert "started worker" not in done.stderr


def test_handover_framing_survives_a_stream_cut_anywhere() -> None:
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(read_end, False)
        messages = [(i % 2, (f"10.0.0.{i}", 1000 + i), bytes([i]) * (20 + i)) for i in range(5)]
        stream = b"".join(encode_handover(s, h, port, d) or b"" for s, (h, port), d in messages)
        inbox = Inbox(read_end)
        got = []
        for cut in (7, 40, 41, len(stream)):  # pieces that end inside headers and inside datagrams
            os.write(write_end, stream[:cut])
            stream = stream[cut:]
            got.extend(inbox.read())
        os.write(write_end, stream)
        got.extend(inbox.read())
        assert got == messages
        assert encode_handover(0, "127.0.0.1", 1, bytes(4096)) is None  # beyond an atomic pipe write
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("name", [b"alice", b"bob", "ünïcode".encode(), b""])
def test_owner_is_stable_and_in_range(name: bytes) -> None:
    assert owner_of(name, 3) == owner_of(name, 3) and 0 <= owner_of(name, 3) < 3


def _exempt_config(renv: RadiusEnv, port: int, exempt: list[str]) -> str:
    radius = {"listen": [f"127.0.0.1:{port}"], "first_factor": "none", "clients": [client("otp-only")]}
    radius["workers"] = WORKERS
    return renv.config_text(radius, extra="enforcement: " + json.dumps({"exempt_users": exempt}) + "\n")


def test_a_worker_started_after_a_reload_serves_the_reloaded_configuration(renv: RadiusEnv, udp: Any) -> None:
    # The fault: a restarted worker came back with the settings of the start, undoing a SIGHUP; a user
    # whose exemption had been removed got an Accept without a code again.
    port = free_udp_port()
    exempt = renv.enroll()
    config = renv.write_config({"clients": []})
    config.write_text(_exempt_config(renv, port, [exempt.user]))
    daemon = renv.start(config, wait=False)
    daemon.port = port
    deadline = time.monotonic() + 20
    while daemon.text().count("listening on") < WORKERS:
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
        time.sleep(0.05)
    c = udp(port)
    request, _ = access_request(exempt.user, exempt.wrong())
    assert check_reply(c.ask(request), request) == p.ACCESS_ACCEPT  # exempt: no code needed
    config.write_text(_exempt_config(renv, port, []))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("master reloaded")
    deadline = time.monotonic() + 20
    while daemon.text().count("reloaded ") < WORKERS + 1:
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.05)
    owner = owner_of(exempt.user.encode(), WORKERS)
    os.kill(worker_pids(daemon)[owner], signal.SIGKILL)
    daemon.wait_for("starting it again")
    while daemon.text().count("listening on") < WORKERS + 1:
        assert time.monotonic() < deadline + 20, daemon.text()
        time.sleep(0.05)
    again, _ = access_request(exempt.user, exempt.wrong())
    assert check_reply(c.ask(again), again) == p.ACCESS_REJECT, daemon.text()


def wait_until_sighup_ignored(pid: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as status:
            ignored = next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))
        if ignored & (1 << (signal.SIGHUP - 1)):
            return
        time.sleep(0.002)
    raise AssertionError("mfa-radiusd never set SIGHUP aside")


def test_sighup_at_any_moment_of_a_start_or_a_restart_stops_nothing(renv: RadiusEnv, udp: Any) -> None:
    # The fault: SIGHUP's default action ended a worker (or the master) started a moment before.
    port = free_udp_port()
    radius = {"listen": [f"127.0.0.1:{port}"], "first_factor": "none", "clients": [client("otp-only")]}
    config = renv.write_config({**radius, "workers": WORKERS})
    daemon = renv.start(config, wait=False)
    daemon.port = port
    wait_until_sighup_ignored(daemon.proc.pid)  # the interpreter's own start-up comes before any handler
    for _ in range(40):  # during the master's start and the workers' starts
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    deadline = time.monotonic() + 20
    while daemon.text().count("listening on") < WORKERS:
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
        time.sleep(0.05)
    os.kill(worker_pids(daemon)[0], signal.SIGKILL)
    daemon.wait_for("starting it again")
    for _ in range(40):  # during the restarted worker's start
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    time.sleep(1)
    assert daemon.proc.poll() is None, daemon.text()
    assert "workers keep exiting" not in daemon.text()
    clear_of_step_boundary()
    for _ in range(6):
        u = renv.enroll()
        request, _ = access_request(u.user, u.code())
        assert check_reply(udp(port).ask(request), request) == p.ACCESS_ACCEPT
    single = renv.write_config({"listen": [f"127.0.0.1:{free_udp_port()}"], "first_factor": "none", "clients": []})
    one = renv.start(single, wait=False)
    wait_until_sighup_ignored(one.proc.pid)
    for _ in range(30):
        one.proc.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    one.wait_for("listening on")
    assert one.proc.poll() is None


def test_a_request_too_large_to_hand_over_is_dropped_not_verified_twice(renv: RadiusEnv, udp: Any) -> None:
    # The fault: such a request was served by whichever worker read it, each with its own cache, so its
    # retransmissions were verified again (a replay Reject, a failure counted) by the other workers.
    daemon = start_workers(renv, [client("otp-only")])
    clear_of_step_boundary()

    def vsa(size: int) -> tuple[int, bytes]:  # a Vendor-Specific attribute (unknown vendor) of `size` bytes
        return (26, (9).to_bytes(4, "big") + bytes([1, size - 6]) + b"x" * (size - 8))

    for _ in range(3):
        u = renv.enroll()
        small, _ = access_request(u.user, u.code())
        room = 4085 - len(small)
        big, _ = access_request(u.user, u.code(), extra=[vsa(253)] * (room // 253) + [vsa(room % 253 or 253)])
        assert 4050 < len(big) <= 4096, len(big)
        c = udp(daemon.port)
        replies = [c.ask(big, timeout=0.5) for _ in range(6)]
        # Read by the owner it is served once and its copies get the cached reply; read by another worker
        # it is dropped. Never two different answers, and never a second verification.
        answered = [r for r in replies if r is not None]
        assert all(r == answered[0] for r in answered)
        rows = [r["reason"] for r in renv.audit(u.user) if r["event"] == "auth"]
        assert rows in ([], ["accepted"]), rows
