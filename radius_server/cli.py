"""mfa-radiusd --config FILE [--check]: the RADIUS server, in the foreground, logging to stderr."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass
from typing import Any

from devicedb import Settings, Store, Verifier, load_settings
from devicedb.errors import ConfigError, MfaguardError, UnsafePathError
from devicedb.fsafety import open_private_log
from radius_server import protocol as p
from radius_server.firstfactor import FirstFactor, check_service
from radius_server.server import ClientTable, RadiusServer, bind_socket, build_clients
from radius_server.workers import Worker, supervise

log = logging.getLogger("mfa-radiusd")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_DATABASE = 4
EXIT_PORT = 5


@dataclass
class Loaded:
    settings: Settings
    clients: ClientTable
    first_factor: FirstFactor


def load(path: str, types: p.AttributeTypes) -> Loaded:
    """Load and check everything a start or a reload needs. Raises MfaguardError."""
    settings = load_settings(path, require_file=True)
    radius = settings.radius
    if any(c.secret is not None for c in radius.clients):
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path}: holds inline RADIUS secrets but is readable by group or others; "
                f"chmod 600 {path}, or move the secrets to secret_file"
            )
    clients = build_clients(settings, types)
    needs_password = any(c.mode != "otp-only" for c in radius.clients)
    if radius.first_factor != "none":
        check_service(radius.first_factor)
    elif needs_password:  # parse_settings refuses this already; keep the front end closed anyway
        raise ConfigError(f"{path}: radius.first_factor none needs every client in mode otp-only")
    service = None if radius.first_factor == "none" else radius.first_factor
    return Loaded(settings, clients, FirstFactor(service))


def log_to_file(settings: Settings) -> None:
    """Warnings and tracebacks also go to logging.file (the front ends' daemon log); stderr has everything."""
    path = settings.logging.file
    try:
        handler = logging.StreamHandler(open_private_log(path))
    except OSError as exc:
        log.warning("cannot write the log file %s (%s); logging to stderr only", path, exc.strerror or exc)
        return
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s mfa-radiusd[%(process)d] %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)  # the core's "mfaguard" logger too


def open_verifier(settings: Settings, worker: Worker | None = None) -> Verifier:
    """A Verifier whose store opens now, so that a missing or unsafe database stops the start."""
    store = Store.open(settings)
    if worker is not None:
        store.write_gate = worker.gate
    return Verifier(settings, store=store)


def bind_all(settings: Settings) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for host, port in settings.radius.listen:
            try:
                sockets.append(bind_socket(host, port))
            except OSError as exc:
                shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"{shown} is already in use (another mfa-radiusd or RADIUS server holds it); refusing to start"
                    ) from None
                raise PortInUse(f"cannot listen on {shown}: {exc.strerror}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class PortInUse(Exception):
    pass


def notify_ready() -> None:
    """Tell systemd (Type=notify) that the server is up, so that it queues a reload until then."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", address)
    except OSError as exc:
        log.warning("could not notify systemd that mfa-radiusd is ready: %s", exc)


async def serve(
    path: str, loaded: Loaded, types: p.AttributeTypes, sockets: list[socket.socket], worker: Worker | None = None
) -> int:
    loop = asyncio.get_running_loop()
    verifier = open_verifier(loaded.settings, worker)
    server = RadiusServer(loaded.settings, loaded.clients, types, loaded.first_factor, verifier, worker)
    await server.start(sockets)
    stop = asyncio.Event()

    def reload() -> None:
        try:
            new = load(path, types)
            new_verifier = open_verifier(new.settings, worker)
        except (MfaguardError, OSError) as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if new.settings.radius.listen != server.settings.radius.listen:
            log.warning("radius.listen changed: restart mfa-radiusd to listen on the new addresses")
        if new.settings.radius.workers != loaded.settings.radius.workers:
            log.warning("radius.workers changed: restart mfa-radiusd to run another number of workers")
        server.reload(new.settings, new.clients, new.first_factor, new_verifier)
        log.info("reloaded %s: %d clients", path, len(new.settings.radius.clients))

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    shown = ", ".join(
        f"[{s.getsockname()[0]}]:{s.getsockname()[1]}"
        if s.family == socket.AF_INET6
        else f"{s.getsockname()[0]}:{s.getsockname()[1]}"
        for s in sockets
    )
    who = f"worker {worker.index} of {worker.count}" if worker is not None else "mfa-radiusd"
    log.info("%s (pid %d) listening on %s (%d clients)", who, os.getpid(), shown, len(loaded.settings.radius.clients))
    if worker is None:
        notify_ready()
    await stop.wait()
    log.info("stopping")
    await server.stop()
    log.info("stopped")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mfa-radiusd", description="mfaguard RADIUS server (foreground)")
    parser.add_argument("--config", required=True, help="the mfaguard.yaml to use (required)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--debug", action="store_true", help="log every dropped packet")
    args = parser.parse_args(argv)
    # A SIGHUP before the event loop's handler is in place would end the process (its default action):
    # `systemctl reload` right after a start must not stop the server. The loop's handler replaces this.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s mfa-radiusd[%(process)d] %(levelname)s %(message)s",
    )
    types = p.AttributeTypes.load()
    try:
        loaded = load(args.config, types)
        if args.check:
            open_verifier(loaded.settings).close()
            print(f"{args.config}: configuration OK ({len(loaded.settings.radius.clients)} clients)")
            return EXIT_OK
    except UnsafePathError as exc:
        log.error("%s", exc)
        return EXIT_DATABASE
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except MfaguardError as exc:
        log.error("%s", exc)
        return EXIT_DATABASE
    log_to_file(loaded.settings)
    try:
        sockets = bind_all(loaded.settings)
    except PortInUse as exc:
        log.error("%s", exc)
        return EXIT_PORT
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    try:
        if loaded.settings.radius.workers > 1:
            open_verifier(loaded.settings).close()  # a database that cannot open stops the start here
            # What a worker started (or started again) gets: the configuration in force, which SIGHUP
            # moves on in the master too, so a restarted worker does not bring an old one back.
            current = [loaded]

            def reload_master() -> None:
                try:
                    current[0] = load(args.config, types)
                except (MfaguardError, OSError) as exc:
                    log.error("reload refused, keeping the running configuration: %s", exc)
                    return
                log.info("master reloaded %s: workers started from now on use it", args.config)

            # The database is opened by each worker after the fork: a connection never crosses one.
            return supervise(
                loaded.settings.radius.workers,
                lambda worker: _run_worker(runner, args.config, current[0], types, sockets, worker),
                on_hup=reload_master,
                on_started=notify_ready,
            )
        return runner(serve(args.config, loaded, types, sockets))
    except MfaguardError as exc:
        log.error("%s", exc)
        return EXIT_DATABASE
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()


def _run_worker(
    runner: Any, path: str, loaded: Loaded, types: p.AttributeTypes, sockets: list[socket.socket], worker: Worker
) -> int:
    try:
        return int(runner(serve(path, loaded, types, sockets, worker)))
    except MfaguardError as exc:
        log.error("worker %d: %s", worker.index, exc)
        return EXIT_DATABASE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
