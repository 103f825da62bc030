"""Hardware tokens through the real RADIUS server and radclient: an HOTP token and a Yubico OTP
authenticate and a replay fails, with no change in the server (the kinds plug in through the core)."""

from __future__ import annotations

import secrets

import pytest
from radius_helpers import Daemon, RadiusEnv, client, radclient

from devicedb.kinds import hotp
from devicedb.manage import DeviceManager
from devicedb.models import Context

CTX = Context(service="test")


@pytest.fixture(scope="module")
def server(renv: RadiusEnv) -> Daemon:
    return renv.radiusd([client("otp-only")])


def login(port: int, user: str, code: str) -> str:
    return radclient(port, f'User-Name = "{user}", User-Password = "{code}", Message-Authenticator = 0x00')


def test_hotp_token_accept_then_replay(renv: RadiusEnv, server: Daemon) -> None:
    user = f"h{secrets.token_hex(4)}"
    seed = secrets.token_bytes(20)
    with renv.store() as store:
        DeviceManager(store).enroll_hotp(user, CTX, secret=seed)
    first = hotp.code_at(seed, 6, "sha1", 0)
    assert "Received Access-Accept" in login(server.port, user, first)
    assert "Received Access-Reject" in login(server.port, user, first)
    assert "Received Access-Accept" in login(server.port, user, hotp.code_at(seed, 6, "sha1", 2))
    reasons = [r["reason"] for r in renv.audit(user) if r["event"] == "auth"]
    assert reasons == ["accepted", "replay: code already used", "accepted"]


def test_yubico_otp_accept_then_replay(renv: RadiusEnv, server: Daemon) -> None:
    user = f"y{secrets.token_hex(4)}"
    with renv.store() as store:
        DeviceManager(store).enroll_yubico(
            user,
            CTX,
            public_id="ndgtriluugng",
            private_id=bytes.fromhex("c5fc55c3767f"),
            aes_key=bytes.fromhex("0682952d3363f225654b58a73b131259"),
        )
    otp = "ndgtriluugnghggtkhvrbbrrgtdfeivgklbkviteggcu"  # use counter 13, session use 1
    older = "ndgtriluugngkuhguutjdfihfkleuvnjtjiljkbtbngb"  # use counter 13, session use 0
    assert "Received Access-Accept" in login(server.port, user, otp)
    assert "Received Access-Reject" in login(server.port, user, otp)
    assert "Received Access-Reject" in login(server.port, user, older)
    reasons = [r["reason"] for r in renv.audit(user) if r["event"] == "auth"]
    assert reasons == ["accepted", "replay: code already used", "replay: code already used"]


def test_security_key_only_user_is_told_no_radius_device(renv: RadiusEnv, server: Daemon) -> None:
    import base64
    import struct

    def ssh_string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    user = f"k{secrets.token_hex(4)}"
    kind = b"sk-ssh-ed25519@openssh.com"
    blob = base64.b64encode(ssh_string(kind) + ssh_string(secrets.token_bytes(32)) + ssh_string(b"ssh:")).decode()
    with renv.store() as store:
        DeviceManager(store).enroll_ssh_key(user, f"{kind.decode()} {blob}", CTX)
    out = login(server.port, user, "123456")
    assert "Received Access-Reject" in out and "No RADIUS-capable device is enrolled" in out, out
    assert [r["reason"] for r in renv.audit(user) if r["event"] == "auth"] == [
        "only security keys are enrolled: no device takes a code"
    ]
