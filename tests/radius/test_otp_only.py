"""mfa-radiusd in otp-only mode: radclient/radtest, Status-Server, BlastRADIUS, retransmissions, malformed input."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import time
from typing import Any

import pytest
from radius_helpers import (
    SECRET,
    SECRET_B,
    Daemon,
    RadiusEnv,
    access_request,
    check_reply,
    clear_of_step_boundary,
    client,
    free_udp_port,
    need_binary,
    radclient,
    reply_attrs,
    reply_message,
)

from radius_server import protocol as p


@pytest.fixture(scope="module")
def server(renv: RadiusEnv) -> Daemon:
    return renv.radiusd([client("otp-only", reply={"Class": "vpn-users", "Session-Timeout": 3600})])


def accepted(out: str) -> bool:
    return "Received Access-Accept" in out


def rejected(out: str) -> bool:
    return "Received Access-Reject" in out


def test_radclient_accept_then_wrong_code_then_replay(renv: RadiusEnv, server: Daemon) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    good = f'User-Name = "{u.user}", User-Password = "{u.code()}", Message-Authenticator = 0x00'
    out = radclient(server.port, good + ', NAS-Identifier = "vpn-gw-1", Calling-Station-Id = "192.0.2.7"')
    assert accepted(out), out
    assert "Class = 0x76706e2d7573657273" in out and "Session-Timeout = 3600" in out, out
    out = radclient(server.port, f'User-Name = "{u.user}", User-Password = "{u.wrong()}", Message-Authenticator = 0x00')
    assert rejected(out) and "Verification failed." in out, out
    out = radclient(server.port, good)
    assert rejected(out) and "Verification failed." in out, out
    reasons = [r["reason"] for r in renv.audit(u.user) if r["event"] == "auth"]
    assert "accepted" in reasons and "bad code" in reasons and "replay: code already used" in reasons
    row = next(r for r in renv.audit(u.user) if r["reason"] == "accepted")
    assert row["service"] == "radius" and row["source"] == "192.0.2.7"
    assert row["detail"]["nas"] == "vpn-gw-1" and row["detail"]["client"] == "local"


def test_radtest_accept(renv: RadiusEnv, server: Daemon) -> None:
    exe = need_binary("radtest")
    clear_of_step_boundary()
    u = renv.enroll()
    out = subprocess.run(
        [exe, u.user, u.code(), f"127.0.0.1:{server.port}", "0", SECRET], capture_output=True, timeout=30, text=True
    ).stdout
    assert accepted(out), out


def test_status_server(server: Daemon) -> None:
    out = radclient(server.port, "Message-Authenticator = 0x00", command="status")
    assert accepted(out) and "mfa-radiusd is up" in out, out


def test_status_server_without_message_authenticator_is_dropped(server: Daemon, udp: Any) -> None:
    c = udp(server.port)
    packet = p.build_request(p.STATUS_SERVER, 5, os.urandom(16), SECRET_B, [], message_authenticator=False)
    assert c.ask(packet, timeout=1) is None


# ---------------------------------------------------------------------------
# BlastRADIUS (CVE-2024-3596)


def test_missing_message_authenticator_is_dropped_with_an_audit_row(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    packet, _ = access_request(u.user, u.code(), ma=False)
    assert c.ask(packet, timeout=1.5) is None
    rows = [r for r in renv.audit() if r["reason"] == "dropped: Message-Authenticator missing"]
    assert any(r["detail"].get("claimed_user") == u.user for r in rows)
    assert "Message-Authenticator missing" in (renv.root / "log" / "mfaguard.log").read_text()  # logging.file
    # No code was consumed: the same code still works with a valid request.
    good, _ = access_request(u.user, u.code())
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT


def test_flipped_bit_in_message_authenticator_is_dropped(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    packet, _ = access_request(u.user, u.code())
    bad = bytearray(packet)
    bad[-1] ^= 0x01
    assert c.ask(bytes(bad), timeout=1.5) is None
    assert any(r["reason"] == "dropped: Message-Authenticator invalid" for r in renv.audit())
    good, _ = access_request(u.user, u.code())
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT


def test_message_authenticator_last_behind_proxy_states_is_accepted(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    auth = os.urandom(16)
    attrs = [
        (p.PROXY_STATE, b"first-proxy"),
        (p.USER_NAME, u.user.encode()),
        (p.USER_PASSWORD, p.encode_password(u.code().encode(), SECRET_B, auth)),
        (p.PROXY_STATE, b"second-proxy"),
    ]
    packet = p.build_request(p.ACCESS_REQUEST, 9, auth, SECRET_B, attrs)
    assert packet[-18] == p.MESSAGE_AUTHENTICATOR  # last attribute
    reply = c.ask(packet)
    assert check_reply(reply, packet) == p.ACCESS_ACCEPT
    assert reply is not None
    proxies = [v for t, v in reply_attrs(reply) if t == p.PROXY_STATE]
    assert proxies == [b"first-proxy", b"second-proxy"]


def test_length_mismatch_of_18_bytes_is_dropped(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    packet, _ = access_request(u.user, u.code())
    # Header claims 18 bytes less than the datagram: the MA would sit outside the packet.
    short = packet[:2] + struct.pack("!H", len(packet) - 18) + packet[4:]
    assert c.ask(short, timeout=1.5) is None
    longer = packet[:2] + struct.pack("!H", len(packet) + 18) + packet[4:]
    assert c.ask(longer, timeout=1.5) is None
    good, _ = access_request(u.user, u.code())
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT


def test_two_message_authenticators_are_dropped(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    auth = os.urandom(16)
    packet, _ = access_request(u.user, u.code(), authenticator=auth, extra=[(p.MESSAGE_AUTHENTICATOR, bytes(16))])
    assert c.ask(packet, timeout=1.5) is None
    assert any(r["reason"] == "dropped: more than one Message-Authenticator" for r in renv.audit())
    good, _ = access_request(u.user, u.code())
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT


def test_unknown_client_address_is_dropped(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port, source="127.0.0.9")
    packet, _ = access_request(u.user, u.code())
    assert c.ask(packet, timeout=1.5) is None
    assert "127.0.0.9: not a configured client" in server.text()
    good, _ = access_request(u.user, u.code())
    assert check_reply(udp(server.port).ask(good), good) == p.ACCESS_ACCEPT


# ---------------------------------------------------------------------------
# Retransmissions (RFC 5080)


def test_retransmission_while_in_flight_and_after_answer_gets_identical_reply(
    renv: RadiusEnv, server: Daemon, udp: Any
) -> None:
    clear_of_step_boundary(margin=8)
    u = renv.enroll()
    c = udp(server.port)
    packet, _ = access_request(u.user, u.code())
    c.send(packet)
    c.send(packet)  # +0 ms: the first is still in flight
    first = c.recv()
    assert check_reply(first, packet) == p.ACCESS_ACCEPT
    assert c.recv(timeout=1.0) is None  # exactly one reply for the two sends
    time.sleep(2)
    c.send(packet)  # +2 s
    assert c.recv() == first
    accepted = [r for r in renv.audit(u.user) if r["event"] == "auth"]
    assert [r["reason"] for r in accepted] == ["accepted"]  # verified once


@pytest.mark.slow
def test_retransmission_after_20_seconds_gets_the_cached_reply(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary(margin=8)
    u = renv.enroll()
    c = udp(server.port)
    packet, _ = access_request(u.user, u.code())
    first = c.ask(packet)
    assert check_reply(first, packet) == p.ACCESS_ACCEPT
    time.sleep(20)
    c.send(packet)
    assert c.recv() == first
    assert [r["reason"] for r in renv.audit(u.user) if r["event"] == "auth"] == ["accepted"]


def test_same_identifier_new_authenticator_same_code_is_a_replay(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    code = u.code()
    first, _ = access_request(u.user, code, ident=77)
    assert check_reply(c.ask(first), first) == p.ACCESS_ACCEPT
    second, _ = access_request(u.user, code, ident=77)
    reply = c.ask(second)
    assert check_reply(reply, second) == p.ACCESS_REJECT
    assert reply is not None and reply_message(reply) == "Verification failed."


def test_retransmission_from_another_source_port_is_a_new_request(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    packet, _ = access_request(u.user, u.code())
    assert check_reply(udp(server.port).ask(packet), packet) == p.ACCESS_ACCEPT
    assert check_reply(udp(server.port).ask(packet), packet) == p.ACCESS_REJECT  # replay, not a cache hit


# ---------------------------------------------------------------------------
# Password encoding rules


def test_chap_is_rejected_with_a_reason(renv: RadiusEnv, server: Daemon) -> None:
    u = renv.enroll()
    out = radclient(server.port, f'User-Name = "{u.user}", CHAP-Password = "123456", Message-Authenticator = 0x00')
    assert rejected(out) and "CHAP and MS-CHAP cannot carry a one-time code" in out, out


def test_ms_chap_is_rejected_with_a_reason(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    u = renv.enroll()
    auth = os.urandom(16)
    vsa = struct.pack("!I", p.MICROSOFT) + bytes((25, 52)) + os.urandom(50)
    packet = p.build_request(
        p.ACCESS_REQUEST, 3, auth, SECRET_B, [(p.USER_NAME, u.user.encode()), (p.VENDOR_SPECIFIC, vsa)]
    )
    reply = udp(server.port).ask(packet)
    assert check_reply(reply, packet) == p.ACCESS_REJECT
    assert reply is not None and "CHAP" in reply_message(reply)


def test_chap_beside_pap_is_rejected(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    packet, _ = access_request(u.user, u.code(), extra=[(p.CHAP_PASSWORD, bytes(17))])
    assert check_reply(c.ask(packet), packet) == p.ACCESS_REJECT
    good, _ = access_request(u.user, u.code())  # the code was not consumed
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT


def test_two_user_passwords_are_rejected(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    auth = os.urandom(16)
    enc = p.encode_password(u.code().encode(), SECRET_B, auth)
    packet, _ = access_request(u.user, u.code(), authenticator=auth, extra=[(p.USER_PASSWORD, enc)])
    assert check_reply(c.ask(packet), packet) == p.ACCESS_REJECT
    good, _ = access_request(u.user, u.code())
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT


@pytest.mark.parametrize("size", [15, 17, 144])
def test_user_password_of_a_bad_length_is_rejected(server: Daemon, udp: Any, size: int) -> None:
    auth = os.urandom(16)
    attrs = [(p.USER_NAME, b"someone"), (p.USER_PASSWORD, os.urandom(size))]
    packet = p.build_request(p.ACCESS_REQUEST, 4, auth, SECRET_B, attrs)
    assert check_reply(udp(server.port).ask(packet), packet) == p.ACCESS_REJECT


def test_password_with_invalid_utf8_or_inner_nul_is_rejected(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    for typed in (u.code().encode() + b"\xff", u.code().encode() + b"\0x"):
        packet, _ = access_request(u.user, typed)
        assert check_reply(c.ask(packet), packet) == p.ACCESS_REJECT
    # trailing NULs are padding: a 16-byte block holding the code and NULs is the code
    good, _ = access_request(u.user, u.code().encode() + b"\0" * 10)
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT


# ---------------------------------------------------------------------------
# Malformed datagrams: each is dropped, consumes no code, and a good request is answered after it.


def _with_attr(packet: bytes, raw_attr: bytes, fix_length: bool = True) -> bytes:
    body = packet + raw_attr
    if fix_length:
        body = body[:2] + struct.pack("!H", len(body)) + body[4:]
    return body


def _malformed_cases(user: str, code: str) -> dict[str, bytes]:
    good, _ = access_request(user, code, ma=False)

    def signed(attrs_raw: bytes) -> bytes:
        # a request whose MA is right for its bytes: malformed structure, not a bad signature
        import hashlib
        import hmac

        pkt = _with_attr(good, attrs_raw + b"\x50\x12" + bytes(16))
        mac = hmac.new(SECRET_B, pkt, hashlib.md5).digest()
        return pkt[:-16] + mac

    return {
        "zero-length attribute": signed(bytes((p.NAS_IDENTIFIER, 2))),
        "attribute length 1": signed(bytes((p.NAS_IDENTIFIER, 1))),
        "attribute past the end": _with_attr(good, bytes((p.NAS_IDENTIFIER, 40)) + b"abc", fix_length=True),
        "header length too long": good[:2] + struct.pack("!H", len(good) + 5) + good[4:],
        "header length too short": good[:2] + struct.pack("!H", 19) + good[4:],
        "oversized datagram": _with_attr(good, os.urandom(5000), False),
        "VSA with zero-length sub-attribute": signed(
            bytes((p.VENDOR_SPECIFIC, 8)) + struct.pack("!I", 9) + b"\x01\x02"
        ),
        "VSA too short": signed(bytes((p.VENDOR_SPECIFIC, 5)) + b"\x00\x00\x09"),
        "wrong-length integer": signed(bytes((5, 5)) + b"\x00\x00\x01"),
        "wrong-length NAS-IP-Address": signed(bytes((p.NAS_IP_ADDRESS, 8)) + bytes(6)),
        "wrong-length Message-Authenticator": _with_attr(good, b"\x50\x0a" + bytes(8)),
        "unknown attribute type": signed(bytes((200, 5)) + b"abc"),
        "reply type on the auth port": bytes((p.ACCESS_ACCEPT,)) + good[1:],
        "accounting request on the auth port": bytes((p.ACCOUNTING_REQUEST,)) + good[1:],
        "unknown code": bytes((99,)) + good[1:],
        "short datagram": good[:19],
        "empty datagram": b"",
    }


CASES = list(_malformed_cases("x", "123456"))


@pytest.mark.parametrize("case", CASES)
def test_malformed_datagram_is_dropped_and_the_server_goes_on(
    renv: RadiusEnv, server: Daemon, udp: Any, case: str
) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    bad = _malformed_cases(u.user, u.code())[case]
    c.send(bad)
    assert c.recv(timeout=0.5) is None, case
    good, _ = access_request(u.user, u.code())
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT, f"after {case}: the code was consumed or no answer"
    assert server.proc.poll() is None


def test_flood_of_malformed_packets_does_not_block_the_loop(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    for bad in list(_malformed_cases(u.user, u.code()).values()) * 30:
        c.send(bad)
    good, _ = access_request(u.user, u.code())
    started = time.monotonic()
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT
    assert time.monotonic() - started < 2.0
    # the log is rate-limited: far fewer lines than packets
    assert len(re.findall("malformed", server.text())) < 100


def test_exempt_user_is_passed_by_the_core_policy_and_audited(renv: RadiusEnv, udp: Any) -> None:
    port = free_udp_port()
    radius = {"listen": [f"127.0.0.1:{port}"], "first_factor": "none", "clients": [client("otp-only")]}
    renv.write_config(radius)  # initialises the database
    exempt = renv.enroll()
    other = renv.enroll()
    config = renv.write_config(radius, extra=f"enforcement:\n  exempt_users: [{exempt.user}]\n")
    daemon = renv.start(config)
    c = udp(port)
    packet, _ = access_request(exempt.user, "000000")
    assert check_reply(c.ask(packet), packet) == p.ACCESS_ACCEPT
    packet, _ = access_request(other.user, other.wrong())
    assert check_reply(c.ask(packet), packet) == p.ACCESS_REJECT
    assert any(r["reason"].startswith("exempt") for r in renv.audit(exempt.user))
    assert daemon.stop() == 0


def test_locked_database_fails_closed_and_consumes_no_code(renv: RadiusEnv, udp: Any) -> None:
    import sqlite3

    port = free_udp_port()
    radius = {"listen": [f"127.0.0.1:{port}"], "first_factor": "none", "clients": [client("otp-only")]}
    config = renv.write_config(radius)
    text = config.read_text().replace("database:\n", "database:\n  busy_timeout_ms: 200\n", 1)
    config.write_text(text)
    daemon = renv.start(config)
    clear_of_step_boundary(margin=8)
    u = renv.enroll()
    c = udp(port)
    holder = sqlite3.connect(str(renv.db), isolation_level=None, timeout=5)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        packet, _ = access_request(u.user, u.code())
        reply = c.ask(packet, timeout=5)
        assert check_reply(reply, packet) == p.ACCESS_REJECT  # an error is never a success
        assert reply is not None and reply_message(reply) == "Verification failed."
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    good, _ = access_request(u.user, u.code())
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT  # the code was not consumed
    assert daemon.stop() == 0


def test_nas_ip_address_is_the_nas_when_no_identifier(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    packet, _ = access_request(u.user, u.code(), extra=[(p.NAS_IP_ADDRESS, bytes((192, 0, 2, 10)))])
    assert check_reply(udp(server.port).ask(packet), packet) == p.ACCESS_ACCEPT
    row = next(r for r in renv.audit(u.user) if r["reason"] == "accepted")
    assert row["detail"]["nas"] == "192.0.2.10" and row["source"] == "local"


def test_reject_carries_proxy_states_and_no_accept_attributes(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    u = renv.enroll()
    packet, _ = access_request(u.user, u.wrong(), extra=[(p.PROXY_STATE, b"p1"), (p.PROXY_STATE, b"p2")])
    reply = udp(server.port).ask(packet)
    assert check_reply(reply, packet) == p.ACCESS_REJECT
    assert reply is not None
    types = [t for t, _ in reply_attrs(reply)]
    assert p.CLASS not in types and 27 not in types  # Class and Session-Timeout only on Accept
    assert [v for t, v in reply_attrs(reply) if t == p.PROXY_STATE] == [b"p1", b"p2"]


def test_state_in_otp_only_mode_is_rejected(renv: RadiusEnv, server: Daemon, udp: Any) -> None:
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(server.port)
    packet, _ = access_request(u.user, u.code(), extra=[(p.STATE, os.urandom(32))])
    assert check_reply(c.ask(packet), packet) == p.ACCESS_REJECT
    good, _ = access_request(u.user, u.code())
    assert check_reply(c.ask(good), good) == p.ACCESS_ACCEPT


def test_request_whose_reply_cannot_fit_is_dropped_without_spending_the_code(renv: RadiusEnv, udp: Any) -> None:
    """A client whose Accept carries a long Class: with the request's Proxy-States echoed back, the
    Accept would not fit in a packet. The request is dropped before its code is checked."""
    long_class = renv.radiusd([client("otp-only", reply={"Class": "c" * 200})])
    clear_of_step_boundary()
    u = renv.enroll()
    stuffing = [(p.PROXY_STATE, bytes([i]) * 253) for i in range(15)] + [(p.PROXY_STATE, b"x" * 73)]
    packet, _ = access_request(u.user, u.code(), extra=stuffing)
    assert len(packet) <= 4096
    assert udp(long_class.port).ask(packet, timeout=1.5) is None
    packet, _ = access_request(u.user, u.code())
    assert check_reply(udp(long_class.port).ask(packet), packet) == p.ACCESS_ACCEPT  # the code was not spent
