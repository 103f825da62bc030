"""What the hostile trial found in mfa-radiusd's surroundings: the port, the log file, log floods."""

from __future__ import annotations

import logging
import os
import socket
import stat
from typing import Any

import pytest
from radius_helpers import RadiusEnv, client

from radius_server.server import MAX_LOG_LINES_PER_MINUTE, RateLimitedLog


@pytest.mark.parametrize("workers", [1, 2])
def test_no_other_socket_can_bind_the_listening_port(renv: RadiusEnv, workers: int) -> None:
    # The fault: uvloop turned SO_REUSEADDR on for our socket, so any local user binding the same
    # address with SO_REUSEADDR received the NAS's requests instead of mfa-radiusd.
    daemon = renv.radiusd([client("otp-only")], extra={"workers": workers})
    if workers > 1:
        daemon.wait_for("worker 1 of 2")
    for reuse in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
        thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            thief.setsockopt(socket.SOL_SOCKET, reuse, 1)
            with pytest.raises(OSError) as refused:
                thief.bind(("127.0.0.1", daemon.port))
            assert refused.value.errno == 98  # EADDRINUSE
        finally:
            thief.close()


def test_log_file_is_private_and_never_followed_through_a_symlink(renv: RadiusEnv, tmp_path: Any) -> None:
    log_dir = renv.root / "log"
    log_file = log_dir / "mfaguard.log"
    if log_file.exists():
        log_file.unlink()
    daemon = renv.radiusd([client("otp-only")])
    assert stat.S_IMODE(os.stat(log_file).st_mode) == 0o600
    daemon.stop()
    log_file.unlink()
    target = tmp_path / "elsewhere.log"
    target.write_text("")
    log_file.symlink_to(target)
    try:
        daemon = renv.radiusd([client("otp-only")])
        assert "cannot write the log file" in daemon.text()
        assert target.read_text() == ""
    finally:
        log_file.unlink()


def test_dropped_packet_lines_are_capped_in_all_not_only_per_source(caplog: pytest.LogCaptureFixture) -> None:
    # The fault: one line a minute per source address, and spoofed addresses cost nothing.
    ratelog = RateLimitedLog()
    with caplog.at_level(logging.WARNING, logger="mfa-radiusd"):
        for i in range(5000):
            ratelog.warning(f"unknown:10.{i // 256}.{i % 256}.1", "dropped a packet from %s", f"10.0.0.{i}")
    assert len(caplog.records) == MAX_LOG_LINES_PER_MINUTE


def test_a_raising_requirement_rejects_its_request_and_the_database_thread_lives_on() -> None:
    # Verifier.requirement never raises by contract; were it to, the otp job ran outside any guard and
    # the exception would end the database thread, leaving every later request unanswered. The real
    # core cannot be made to raise here, so a stand-in raises for one user.
    import asyncio

    from devicedb.models import Decision, Requirement, RequirementDecision, Result
    from radius_server.server import DatabaseThread

    class Core:
        def requirement(self, user: bytes, context: object) -> RequirementDecision:
            if user == b"broken":
                raise RuntimeError("the core broke")
            return RequirementDecision(Requirement.REQUIRED, "second factor required", user.decode())

        def verify_batch(self, attempts: list[tuple[bytes, str, object]]) -> list[Decision]:
            return [Decision(Result.ACCEPTED, "accepted", u.decode()) for u, _, _ in attempts]

        def close(self) -> None:
            pass

    async def run() -> tuple[BaseException | None, Decision]:
        db = DatabaseThread(asyncio.get_running_loop(), Core())  # type: ignore[arg-type]
        try:
            broken = db.submit("otp", b"broken", "123456", None)
            try:
                await asyncio.wait_for(broken, 5)
                failure = None
            except RuntimeError as exc:
                failure = exc
            fine = await asyncio.wait_for(db.submit("otp", b"alice", "123456", None), 5)
            return failure, fine
        finally:
            db.stop()

    failure, fine = asyncio.run(run())
    assert isinstance(failure, RuntimeError)
    assert fine.accepted and fine.user == "alice"
