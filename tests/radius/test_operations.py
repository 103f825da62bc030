"""Operating mfa-radiusd: --check, start-up refusals, one copy per port, SIGHUP reload, SIGTERM stop."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from radius_helpers import (
    RADIUSD,
    REPO,
    SECRET,
    RadiusEnv,
    access_request,
    check_reply,
    clear_of_step_boundary,
    client,
    free_udp_port,
    need_root,
)

from radius_server import protocol as p


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RADIUSD, "--config", str(config), *args], capture_output=True, text=True, timeout=30, cwd=str(REPO)
    )


def test_check_accepts_a_good_config(renv: RadiusEnv) -> None:
    config = renv.write_config({"first_factor": "none", "clients": [client("otp-only")]})
    done = run(config, "--check")
    assert done.returncode == 0, done.stderr
    assert "configuration OK (1 clients)" in done.stdout


def test_check_names_file_line_and_key(renv: RadiusEnv) -> None:
    config = renv.root / "bad.yaml"
    config.write_text(
        "radius:\n  first_factor: none\n  clients:\n    - name: a\n      address: 127.0.0.1\n"
        "      secret: short\n      mode: otp-only\n"
    )
    os.chmod(config, 0o600)
    done = run(config, "--check")
    assert done.returncode == 3
    assert f"{config}:6: radius.clients: client a: secret: the secret is 5 characters long" in done.stderr


def test_refuses_to_start_without_a_config_file(renv: RadiusEnv) -> None:
    done = run(renv.root / "absent.yaml")
    assert done.returncode == 3 and "config file not found" in done.stderr


def test_inline_secret_in_a_world_readable_config_is_refused(renv: RadiusEnv) -> None:
    config = renv.write_config({"first_factor": "none", "clients": [client("otp-only")]}, mode=0o644)
    done = run(config, "--check")
    assert done.returncode == 3 and "readable by group or others" in done.stderr


def test_secret_file_is_checked_and_used(renv: RadiusEnv, udp: Any) -> None:
    secret_file = renv.root / f"secret-{secrets.token_hex(2)}"
    secret_file.write_text(SECRET + "\n")
    os.chmod(secret_file, 0o644)
    entry = {"name": "local", "address": "127.0.0.1", "secret_file": str(secret_file), "mode": "otp-only"}
    config = renv.write_config({"first_factor": "none", "clients": [entry]}, mode=0o644)
    done = run(config, "--check")
    assert done.returncode == 4 and "readable by group or others" in done.stderr
    os.chmod(secret_file, 0o600)
    assert run(config, "--check").returncode == 0
    port = free_udp_port()
    config = renv.write_config(
        {"listen": [f"127.0.0.1:{port}"], "first_factor": "none", "clients": [entry]}, mode=0o644
    )
    daemon = renv.start(config)
    clear_of_step_boundary()
    u = renv.enroll()
    packet, _ = access_request(u.user, u.code())
    assert check_reply(udp(port).ask(packet), packet) == p.ACCESS_ACCEPT
    assert daemon.stop() == 0


@pytest.mark.parametrize("via_include", [False, True])
def test_first_factor_stack_with_pam_python_is_refused(renv: RadiusEnv, via_include: bool) -> None:
    need_root()
    tag = secrets.token_hex(3)
    service = f"mfaguard-test-pypam-{tag}"
    inner = f"mfaguard-test-pypam-inner-{tag}"
    created = [Path("/etc/pam.d") / service]
    try:
        line = "auth requisite pam_python.so /nonexistent/mfaguard_pam.py\n"
        if via_include:
            created.append(Path("/etc/pam.d") / inner)
            created[1].write_text(line)
            created[0].write_text(f"auth required pam_unix.so\n@include {inner}\n")
        else:
            created[0].write_text("auth [success=1 default=ignore] pam_unix.so nodelay\n" + line)
        config = renv.write_config({"first_factor": service, "clients": [client("challenge")]})
        done = run(config, "--check")
        assert done.returncode == 3
        assert "pam_python" in done.stderr and "would crash" in done.stderr
    finally:
        for path in created:
            path.unlink(missing_ok=True)


def test_missing_first_factor_service_is_refused(renv: RadiusEnv) -> None:
    config = renv.write_config({"first_factor": f"absent-{secrets.token_hex(3)}", "clients": [client("append")]})
    done = run(config, "--check")
    assert done.returncode == 3 and "has no file" in done.stderr


def test_second_copy_on_the_same_port_is_refused(renv: RadiusEnv, udp: Any) -> None:
    first = renv.radiusd([client("otp-only")])
    config = renv.write_config({"listen": [f"127.0.0.1:{first.port}"], "first_factor": "none", "clients": []})
    done = run(config)
    assert done.returncode == 5 and "already in use" in done.stderr
    status = p.build_request(p.STATUS_SERVER, 1, os.urandom(16), SECRET.encode(), [])
    assert check_reply(udp(first.port).ask(status), status) == p.ACCESS_ACCEPT  # the first one still answers


def test_port_held_with_so_reuseport_is_refused(renv: RadiusEnv) -> None:
    # pyrad's async server binds with SO_REUSEPORT; our bind must still fail rather than share the port.
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        config = renv.write_config({"listen": [f"127.0.0.1:{port}"], "first_factor": "none", "clients": []})
        done = run(config)
        assert done.returncode == 5 and "already in use" in done.stderr
    finally:
        holder.close()


def test_sighup_reloads_clients_without_dropping_the_port(renv: RadiusEnv, udp: Any) -> None:
    port = free_udp_port()
    radius: dict[str, Any] = {"listen": [f"127.0.0.1:{port}"], "first_factor": "none", "clients": [client("otp-only")]}
    config = renv.write_config(radius)
    daemon = renv.start(config)
    new_secret = "a-brand-new-secret-after-reload"
    radius["clients"] = [client("otp-only", secret=new_secret)]
    config.write_text(renv.config_text(radius))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("reloaded")
    clear_of_step_boundary()
    u = renv.enroll()
    c = udp(port)
    old, _ = access_request(u.user, u.code())
    assert c.ask(old, timeout=1) is None  # the old secret's MA no longer verifies: dropped
    new, _ = access_request(u.user, u.code(), secret=new_secret.encode())
    assert check_reply(c.ask(new), new, secret=new_secret.encode()) == p.ACCESS_ACCEPT
    # A broken config on reload keeps the running one.
    config.write_text("radius:\n  bogus: 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("reload refused")
    status = p.build_request(p.STATUS_SERVER, 2, os.urandom(16), new_secret.encode(), [])
    assert check_reply(c.ask(status), status, secret=new_secret.encode()) == p.ACCESS_ACCEPT
    assert daemon.proc.poll() is None


def test_sigterm_stops_cleanly_and_frees_the_port(renv: RadiusEnv) -> None:
    daemon = renv.radiusd([client("otp-only")])
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 5
    assert "stopped" in daemon.text()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", daemon.port))  # free again


def test_ipv6_listen_and_client(renv: RadiusEnv) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        port = probe.getsockname()[1]
    config = renv.write_config(
        {"listen": [f"[::1]:{port}"], "first_factor": "none", "clients": [client("otp-only", address="::1")]}
    )
    daemon = renv.start(config)
    assert f"[::1]:{port}" in daemon.text()
    clear_of_step_boundary()
    u = renv.enroll()
    packet, _ = access_request(u.user, u.code())
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(packet, ("::1", port))
        reply, _ = s.recvfrom(4096)
    assert check_reply(reply, packet) == p.ACCESS_ACCEPT
    assert daemon.stop() == 0


def test_first_factor_stack_that_includes_a_missing_file_is_refused(renv: RadiusEnv) -> None:
    """Linux-PAM fails a stack whose include is missing: every first factor would fail."""
    need_root()
    service = f"mfaguard-test-inc-{secrets.token_hex(3)}"
    path = Path("/etc/pam.d") / service
    try:
        path.write_text(f"auth required pam_unix.so\nauth include {service}-nonexistent\n")
        config = renv.write_config({"first_factor": service, "clients": [client("challenge")]})
        done = run(config, "--check")
        assert done.returncode == 3, done
        assert "has no file" in done.stderr
    finally:
        path.unlink(missing_ok=True)


def test_first_factor_module_linked_to_pam_python_is_refused(renv: RadiusEnv, tmp_path: Path) -> None:
    need_root()
    disguise = tmp_path / "pam_innocent.so"
    disguise.symlink_to("/lib/security/pam_python.so")
    service = f"mfaguard-test-lnk-{secrets.token_hex(3)}"
    path = Path("/etc/pam.d") / service
    try:
        path.write_text(f"auth required {disguise} /nonexistent.py\n")
        config = renv.write_config({"first_factor": service, "clients": [client("challenge")]})
        done = run(config, "--check")
        assert done.returncode == 3 and "pam_python" in done.stderr, done
    finally:
        path.unlink(missing_ok=True)
