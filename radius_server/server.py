"""The mfa-radiusd event loop: UDP sockets, clients, State, the retransmission cache, group commit.

Parsing, client lookup, Message-Authenticator checks and duplicate detection run on the event
loop and are cheap. PAM checks run in a thread pool; every database call (requirement, code
lengths, verification) runs in one database thread that group-commits verifications with
``Verifier.verify_batch``: a reply is sent only after the commit holding its audit row.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import queue
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from devicedb import PUBLIC_FAILURE_MESSAGE, Context, Decision, Requirement, Verifier
from devicedb.models import ONLY_SECURITY_KEYS, RequirementDecision
from devicedb.settings import RadiusClient, Settings
from devicedb.usernames import canonical_user, safe_display
from radius_server import protocol as p
from radius_server.firstfactor import FirstFactor
from radius_server.workers import Worker

log = logging.getLogger("mfa-radiusd")

CHALLENGE_PROMPT = "Enter the one-time code from your authenticator: "
NO_RADIUS_DEVICE_MESSAGE = "No RADIUS-capable device is enrolled for this account (security keys cannot be used here)."
CHAP_MESSAGE = "CHAP and MS-CHAP cannot carry a one-time code; configure this client for PAP."
EAP_MESSAGE = "EAP is not supported; configure this client for PAP."
MAX_CODE_ATTEMPTS = 3
STATE_BYTES = 32
MAX_PENDING_STATES = 100_000
MAX_CACHE_ENTRIES = 200_000
MAX_BATCH = 256
MAX_IN_FLIGHT = 20_000  # requests being decided at once; beyond it new ones are dropped (the NAS retransmits)
MAX_DROP_AUDITS_PER_SECOND = 20  # per client: a spoofed flood must not fill the audit log
LOG_INTERVAL = 60.0  # seconds between log lines about one source's dropped packets
MAX_LOG_LINES_PER_MINUTE = 100  # all such lines together

Reply = tuple[int, list[tuple[int, bytes]]] | None  # (code, attributes) or None to drop


@dataclass(frozen=True)
class Client:
    conf: RadiusClient
    secret: bytes
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    reply_attrs: tuple[tuple[int, bytes], ...]


class ClientTable:
    """Clients by source address; the most specific network wins."""

    def __init__(self, clients: list[Client]) -> None:
        self._clients = sorted(clients, key=lambda c: c.network.prefixlen, reverse=True)
        self._cache: dict[str, Client | None] = {}

    def lookup(self, host: str) -> Client | None:
        try:
            return self._cache[host]
        except KeyError:
            pass
        found = None
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            for client in self._clients:
                if addr.version == client.network.version and addr in client.network:
                    found = client
                    break
        except ValueError:
            found = None
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[host] = found
        return found


def build_clients(settings: Settings, types: p.AttributeTypes) -> ClientTable:
    """Read every client's secret (secret files checked by devicedb.fsafety). Raises ConfigError/UnsafePathError."""
    clients = []
    for conf in settings.radius.clients:
        secret = conf.read_secret()
        attrs: list[tuple[int, bytes]] = []
        for name, value in conf.reply:
            code, kind = types.names[name]
            if isinstance(value, int):
                attrs.append((code, value.to_bytes(4, "big")))
            else:
                attrs.append((code, value.encode("utf-8")))
        clients.append(Client(conf, secret, ipaddress.ip_network(conf.address), tuple(attrs)))
    return ClientTable(clients)


@dataclass
class PendingState:
    user_name: bytes
    client: str
    deadline: float
    attempts: int


class RateLimitedLog:
    """One line per key a minute, and at most MAX_LOG_LINES_PER_MINUTE lines a minute in all: spoofed
    source addresses are free to make, so a per-address limit alone would not bound the log."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._window = 0.0
        self._lines = 0
        self._over_budget = 0

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            self._suppressed[key] += 1
            return
        if now - self._window >= LOG_INTERVAL:
            if self._over_budget:
                log.warning(
                    "%d more log lines about dropped packets were left out in the last minute", self._over_budget
                )
            self._window, self._lines, self._over_budget = now, 0, 0
        if self._lines >= MAX_LOG_LINES_PER_MINUTE:
            self._over_budget += 1
            return
        self._lines += 1
        if len(self._last) > 10000:
            self._last.clear()
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        suffix = f" ({more} more like this in the last minute)" if more else ""
        log.warning(msg + suffix, *args)


# ---------------------------------------------------------------------------
# The database thread: every Verifier call, with verifications group-committed.


class _Job:
    __slots__ = ("kind", "args", "future")

    def __init__(self, kind: str, args: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.kind = kind
        self.args = args
        self.future = future


class DatabaseThread:
    def __init__(self, loop: asyncio.AbstractEventLoop, verifier: Verifier) -> None:
        self.loop = loop
        self.verifier = verifier
        self.queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="mfa-radiusd-db", daemon=True)
        self.thread.start()

    def submit(self, kind: str, *args: Any) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.queue.put(_Job(kind, args, future))
        return future

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _deliver(self, results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
        for future, value, exc in results:
            if future.done():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(value)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self.queue.get()
            if first is None:
                break
            jobs = [first]
            while len(jobs) < MAX_BATCH:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            verify: list[_Job] = []
            for job in jobs:
                if job.kind == "verify":
                    verify.append(job)
                    continue
                if job.kind == "otp":
                    # otp-only: the requirement, then (when a code is required) the verification in
                    # this same group commit: one trip to this thread per request.
                    user_name, _, context = job.args
                    try:
                        requirement = self.verifier.requirement(user_name, context)
                    except Exception as exc:  # never raises by contract; if it did: a Reject, and the thread lives
                        results.append((job.future, None, exc))
                        continue
                    if requirement.requirement is Requirement.REQUIRED:
                        verify.append(job)
                    else:
                        results.append((job.future, requirement, None))
                    continue
                self._flush(verify, results)
                verify = []
                try:
                    results.append((job.future, self._call(job), None))
                except Exception as exc:
                    results.append((job.future, None, exc))
            self._flush(verify, results)
            try:
                self.loop.call_soon_threadsafe(self._deliver, results)
            except RuntimeError:  # the loop is closed: we are stopping
                break
        self.verifier.close()

    def _flush(self, verify: list[_Job], results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
        if not verify:
            return
        try:
            decisions = self.verifier.verify_batch([job.args for job in verify])  # one commit for all
        except Exception as exc:  # verify_batch never raises; if it did, every request is refused
            log.exception("group commit raised")
            results.extend((job.future, None, exc) for job in verify)
            return
        for job, decision in zip(verify, decisions, strict=True):
            results.append((job.future, decision, None))

    def _call(self, job: _Job) -> Any:
        v = self.verifier
        if job.kind == "requirement":
            return v.requirement(*job.args)
        if job.kind == "code_lengths":
            return v.code_lengths(*job.args)
        if job.kind == "audit":
            event, user, context, reason, detail = job.args
            with v.store().transaction() as tx:
                tx.audit(event, user, context, reason=reason, detail=detail)
            return None
        if job.kind == "swap":
            (new,) = job.args
            old, self.verifier = self.verifier, new
            old.close()
            return None
        raise ValueError(job.kind)


# ---------------------------------------------------------------------------
# The server.


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: RadiusServer, index: int) -> None:
        self.server = server
        self.index = index  # which listening socket: a handed-over request is answered through the same one
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.server.datagram(data, addr, self)
        except Exception:  # never raise out of the handler
            log.exception("internal error handling a datagram from %s", addr[0])

    def error_received(self, exc: Exception) -> None:
        log.debug("socket error: %s", exc)


def bind_socket(host: str, port: int) -> socket.socket:
    """A UDP socket without SO_REUSEPORT or SO_REUSEADDR: a second server on the port fails to bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class RadiusServer:
    def __init__(
        self,
        settings: Settings,
        clients: ClientTable,
        types: p.AttributeTypes,
        first_factor: FirstFactor,
        verifier: Verifier,
        worker: Worker | None = None,
    ) -> None:
        self.worker = worker
        self.protocols: list[_Protocol] = []
        self.settings = settings
        self.clients = clients
        self.types = types
        self.first_factor = first_factor
        self.verifier = verifier
        self.loop = asyncio.get_running_loop()
        self.db = DatabaseThread(self.loop, verifier)
        self.pam_pool = ThreadPoolExecutor(settings.radius.threads, thread_name_prefix="mfa-radiusd-pam")
        self.states: dict[bytes, PendingState] = {}
        # (host, port, ident, authenticator) -> reply bytes, or None while the request is in flight
        self.cache: dict[tuple[Any, ...], bytes | None] = {}
        self.cache_expiry: collections.deque[tuple[float, tuple[Any, ...]]] = collections.deque()
        self.tasks: set[asyncio.Task[None]] = set()
        self.transports: list[asyncio.DatagramTransport] = []
        self.ratelog = RateLimitedLog()
        self._housekeeping: asyncio.TimerHandle | None = None
        self._drop_audits: dict[str, tuple[int, int]] = {}  # client -> (second, rows written in it)

    # -- life cycle ----------------------------------------------------------------
    async def start(self, sockets: list[socket.socket]) -> None:
        for index, sock in enumerate(sockets):
            proto = _Protocol(self, index)
            transport, _ = await self.loop.create_datagram_endpoint(lambda proto=proto: proto, sock=sock)
            # uvloop turns SO_REUSEADDR on for a socket it is given; with it on, any local user could bind
            # the same address and port (SO_REUSEADDR too) and receive the NAS's requests. Off again.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            self.transports.append(transport)
            self.protocols.append(proto)
        if self.worker is not None:
            self.loop.add_reader(self.worker.inbox.fd, self._read_inbox)
        self._housekeeping = self.loop.call_later(1.0, self._housekeep)

    def reload(self, settings: Settings, clients: ClientTable, first_factor: FirstFactor, verifier: Verifier) -> None:
        old_threads = self.settings.radius.threads
        self.settings = settings
        self.clients = clients
        self.first_factor = first_factor
        self.db.submit("swap", verifier)
        if settings.radius.threads != old_threads:
            old_pool = self.pam_pool
            self.pam_pool = ThreadPoolExecutor(settings.radius.threads, thread_name_prefix="mfa-radiusd-pam")
            old_pool.shutdown(wait=False)

    async def stop(self, grace: float = 5.0) -> None:
        if self.worker is not None:
            self.loop.remove_reader(self.worker.inbox.fd)
        for transport in self.transports:
            transport.close()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        self.pam_pool.shutdown(wait=False, cancel_futures=True)
        await self.loop.run_in_executor(None, self.db.stop)

    def _housekeep(self) -> None:
        now = time.monotonic()
        expiry = self.cache_expiry
        while expiry and (expiry[0][0] <= now or len(expiry) > MAX_CACHE_ENTRIES):
            _, key = expiry.popleft()
            if self.cache.get(key, b"") is not None:  # in-flight entries stay until answered
                self.cache.pop(key, None)
        wall = time.time()
        expired = [k for k, s in self.states.items() if s.deadline <= wall]
        for k in expired:
            del self.states[k]
        self._housekeeping = self.loop.call_later(1.0, self._housekeep)

    # -- datagrams -------------------------------------------------------------------
    def _read_inbox(self) -> None:
        """Requests other workers read for this one (its users)."""
        assert self.worker is not None
        for sock_index, addr, data in self.worker.inbox.read():
            if 0 <= sock_index < len(self.protocols):
                try:
                    self.datagram(data, addr, self.protocols[sock_index], handed_over=True)
                except Exception:  # never raise out of the handler
                    log.exception("internal error handling a datagram from %s", addr[0])

    def _hand_over(self, data: bytes, addr: tuple[Any, ...], proto: _Protocol) -> bool:
        """Give an Access-Request to the worker its User-Name belongs to. False: serve it here."""
        assert self.worker is not None
        name = p.first_attribute(data, p.USER_NAME)
        if name is None:
            return False  # malformed or nameless: dropped or refused here, whoever would own it
        router = self.worker.router
        owner = router.owner(name)
        if owner == router.index:
            return False
        handed = router.hand_over(owner, proto.index, addr, data)
        if handed is None:
            # Too large for an atomic hand-over (near 4 KiB). Serving it here would let each worker
            # verify its retransmissions once (its own cache): dropped, so the code is verified once.
            self.ratelog.warning(
                f"large:{addr[0]}",
                "dropped a %d-byte request from %s: too large to hand to its worker (radius.workers > 1)",
                len(data),
                addr[0],
            )
            return True
        if not handed:
            self.ratelog.warning("handover", "worker %d is not keeping up; dropped a request for it", owner)
        return True

    def datagram(self, data: bytes, addr: tuple[Any, ...], proto: _Protocol, handed_over: bool = False) -> None:
        host, port = addr[0], addr[1]
        client = self.clients.lookup(host)
        if client is None:
            self.ratelog.warning(f"unknown:{host}", "dropped a packet from %s: not a configured client", host)
            return
        if len(data) < p.MIN_PACKET or len(data) > p.MAX_PACKET:
            self.ratelog.warning(f"bad:{host}", "dropped a %d-byte datagram from %s", len(data), client.conf.name)
            return
        code = data[0]
        if code != p.ACCESS_REQUEST and code != p.STATUS_SERVER:
            self.ratelog.warning(f"code:{host}", "dropped a packet with code %d from %s", code, client.conf.name)
            return
        if (
            self.worker is not None
            and not handed_over
            and code == p.ACCESS_REQUEST
            and self._hand_over(data, addr, proto)
        ):
            return
        key = (host, port, data[1], data[4:20])
        if key in self.cache:
            cached = self.cache[key]
            if cached is not None and proto.transport is not None:
                proto.transport.sendto(cached, addr)
            return  # answered again from the cache, or still in flight: never verified twice
        try:
            req = p.parse(data, self.types)
        except p.Malformed as exc:
            self.ratelog.warning(f"bad:{host}", "dropped a malformed packet from %s: %s", client.conf.name, exc)
            return
        conf = client.conf
        if len(req.ma_offsets) > 1:
            self._drop_audited(req, client, "more than one Message-Authenticator")
            return
        if req.ma_offsets:
            if not p.message_authenticator_ok(req, client.secret):
                self._drop_audited(req, client, "Message-Authenticator invalid")
                return
        elif conf.require_message_authenticator or code == p.STATUS_SERVER:
            self._drop_audited(req, client, "Message-Authenticator missing")
            return
        if code == p.STATUS_SERVER:
            reply = p.build_reply(p.ACCESS_ACCEPT, req, client.secret, [(p.REPLY_MESSAGE, b"mfa-radiusd is up")])
            if proto.transport is not None:
                proto.transport.sendto(reply, addr)
            return
        if len(self.tasks) >= MAX_IN_FLIGHT:
            self.ratelog.warning("overload", "overloaded: %d requests in flight; dropping new ones", len(self.tasks))
            return
        self.cache[key] = None  # in flight
        task = self.loop.create_task(self._answer(req, client, key, addr, proto))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _drop_audited(self, req: p.Request, client: Client, reason: str) -> None:
        """BlastRADIUS: drop without a reply, log, and record an audit row."""
        name = req.first(p.USER_NAME)
        shown = safe_display(name) if name is not None else None
        self.ratelog.warning(f"ma:{client.conf.name}", "dropped a request from client %s: %s", client.conf.name, reason)
        second = int(time.monotonic())
        window, count = self._drop_audits.get(client.conf.name, (second, 0))
        if window != second:
            window, count = second, 0
        if count >= MAX_DROP_AUDITS_PER_SECOND:
            return  # logged above (rate-limited); the audit log gets at most this many rows a second
        self._drop_audits[client.conf.name] = (window, count + 1)
        context = self._context(req, client)
        detail = {"claimed_user": shown} if shown else None
        future = self.db.submit("audit", "auth", None, context, f"dropped: {reason}", detail)
        future.add_done_callback(_log_failure)

    async def _answer(
        self, req: p.Request, client: Client, key: tuple[Any, ...], addr: tuple[Any, ...], proto: _Protocol
    ) -> None:
        try:
            result = await self._decide(req, client)
        except Exception:
            log.exception("internal error answering %s", client.conf.name)
            result = (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, PUBLIC_FAILURE_MESSAGE.encode())])
        if result is None:
            self.cache.pop(key, None)
            return
        code, attrs = result
        if code == p.ACCESS_ACCEPT:
            attrs = attrs + list(client.reply_attrs)
        reply = p.build_reply(code, req, client.secret, attrs)
        self.cache[key] = reply
        self.cache_expiry.append((time.monotonic() + self.settings.radius.duplicate_cache_seconds, key))
        if proto.transport is not None and not proto.transport.is_closing():
            proto.transport.sendto(reply, addr)

    # -- decisions ------------------------------------------------------------------------
    def _context(self, req: p.Request, client: Client) -> Context:
        nas_id = req.first(p.NAS_IDENTIFIER)
        nas_ip = req.first(p.NAS_IP_ADDRESS)
        nas_ip6 = req.first(p.NAS_IPV6_ADDRESS)
        nas = None
        if nas_id is not None:
            nas = safe_display(nas_id)
        elif nas_ip is not None:
            nas = str(ipaddress.IPv4Address(nas_ip))
        elif nas_ip6 is not None:
            nas = str(ipaddress.IPv6Address(nas_ip6))
        calling = req.first(p.CALLING_STATION_ID)
        return Context(
            service="radius",
            client=client.conf.name,
            nas=nas,
            remote_host=safe_display(calling) if calling is not None else None,
        )

    def _reply_would_fit(self, req: p.Request, client: Client) -> bool:
        """Whether the largest reply this request can get (an Accept with the client's reply attributes,
        or a Challenge with its prompt and State) fits in a RADIUS packet, with the request's Proxy-States."""
        proxy = sum(len(v) + 2 for t, v in req.attrs if t == p.PROXY_STATE)
        accept = sum(len(v) + 2 for _, v in client.reply_attrs)
        messages = (PUBLIC_FAILURE_MESSAGE, CHALLENGE_PROMPT, CHAP_MESSAGE, EAP_MESSAGE, NO_RADIUS_DEVICE_MESSAGE)
        others = max(len(m) for m in messages) + 2
        challenge = others + STATE_BYTES + 2
        return 20 + 18 + proxy + max(accept, challenge, others) <= p.MAX_PACKET

    async def _decide(self, req: p.Request, client: Client) -> Reply:
        conf = client.conf
        reject = (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, PUBLIC_FAILURE_MESSAGE.encode())])
        if not self._reply_would_fit(req, client):
            # Decided before any code is checked: a reply that cannot be sent must not spend a code.
            log.info("dropped a request from %s: its Proxy-States leave no room for a reply", conf.name)
            return None
        names = req.get(p.USER_NAME)
        passwords = req.get(p.USER_PASSWORD)
        if req.get(p.CHAP_PASSWORD) or any(v == p.MICROSOFT and t in p.MS_CHAP_ATTRIBUTES for v, t, _ in req.vsas):
            log.info("rejected a CHAP/MS-CHAP request from %s: it cannot carry a code", conf.name)
            return (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, CHAP_MESSAGE.encode())])
        if req.get(p.EAP_MESSAGE):
            log.info("rejected an EAP request from %s", conf.name)
            return (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, EAP_MESSAGE.encode())])
        if len(names) != 1 or len(passwords) != 1:
            log.info(
                "rejected a request from %s: %d User-Name, %d User-Password", conf.name, len(names), len(passwords)
            )
            return reject
        user_name = names[0]
        raw_password = passwords[0]
        if len(raw_password) < 16 or len(raw_password) > 128 or len(raw_password) % 16:
            log.info("rejected a request from %s: User-Password of %d bytes", conf.name, len(raw_password))
            return reject
        try:
            password = p.decode_password(raw_password, client.secret, req.authenticator).decode("utf-8", "strict")
        except UnicodeDecodeError:
            password = None
        if password is None or "\0" in password:
            log.info("rejected a request from %s: the password is not clean UTF-8", conf.name)
            return reject
        context = self._context(req, client)
        states = req.get(p.STATE)
        if conf.mode == "challenge":
            if len(states) > 1:
                return reject
            if states:
                return await self._second_step(states[0], user_name, password, client, context)
            return await self._first_step(user_name, password, client, context)
        if states:
            log.info("rejected a request from %s: State in mode %s", conf.name, conf.mode)
            return reject
        if conf.mode == "otp-only":
            return await self._otp_only(user_name, password, context)
        return await self._append(user_name, password, client, context)

    def _reply_for(self, decision: Decision) -> Reply:
        if decision.accepted:
            return (p.ACCESS_ACCEPT, [])
        if decision.reason == ONLY_SECURITY_KEYS:
            # RADIUS cannot carry a FIDO assertion: say so, since such a login can never work.
            return (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, NO_RADIUS_DEVICE_MESSAGE.encode())])
        return (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, PUBLIC_FAILURE_MESSAGE.encode())])

    async def _requirement(self, user_name: bytes, context: Context) -> Requirement:
        decision = await self.db.submit("requirement", user_name, context)
        return decision.requirement  # type: ignore[no-any-return]

    async def _pam(self, user_name: bytes, password: str) -> bool:
        try:
            user = canonical_user(user_name, self.settings.usernames)
        except Exception:
            return False
        ff = self.first_factor
        return await self.loop.run_in_executor(self.pam_pool, ff.check, user, password)

    async def _otp_only(self, user_name: bytes, code: str, context: Context) -> Reply:
        outcome: Decision | RequirementDecision = await self.db.submit("otp", user_name, code, context)
        if isinstance(outcome, RequirementDecision):
            return (p.ACCESS_ACCEPT, [])  # exempt, or in enrollment grace: no code asked (audited by the core)
        return self._reply_for(outcome)

    async def _append(self, user_name: bytes, typed: str, client: Client, context: Context) -> Reply:
        reject = (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, PUBLIC_FAILURE_MESSAGE.encode())])
        if await self._requirement(user_name, context) is not Requirement.REQUIRED:
            ok = await self._pam(user_name, typed)
            return (p.ACCESS_ACCEPT, []) if ok else reject
        try:
            lengths: set[int] = await self.db.submit("code_lengths", user_name)
        except Exception:
            lengths = set()
        # The first factor decides where the password ends: the longest code length first.
        for length in sorted(lengths, reverse=True):
            if len(typed) <= length:
                continue
            if await self._pam(user_name, typed[:-length]):
                decision: Decision = await self.db.submit("verify", user_name, typed[-length:], context)
                return self._reply_for(decision)
        if not lengths:
            # No usable device: the core decides and audits (no device, refused name, error). The first
            # factor still runs, so that the time to answer does not tell who has a device.
            await self._pam(user_name, typed[:-6] if len(typed) > 6 else typed)
            decision = await self.db.submit("verify", user_name, "", context)
            return self._reply_for(decision)
        await self._audit_first_factor_failure(user_name, context)
        log.info("rejected a request from %s: first factor failed", client.conf.name)
        return reject

    async def _audit_first_factor_failure(self, user_name: bytes, context: Context) -> None:
        """A wrong password is an authentication event too: it goes to the audit log (never the password),
        before the Reject is sent. It counts on no lockout counter: the first factor has its own."""
        try:
            user: str | None = canonical_user(user_name, self.settings.usernames)
        except Exception:
            user = None
        detail = None if user is not None else {"name": safe_display(user_name)}
        try:
            await self.db.submit("audit", "auth", user, context, "first factor failed", detail)
        except Exception as exc:
            log.error("could not write an audit row: %s", exc)

    async def _first_step(self, user_name: bytes, password: str, client: Client, context: Context) -> Reply:
        reject = (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, PUBLIC_FAILURE_MESSAGE.encode())])
        if not await self._pam(user_name, password):
            await self._audit_first_factor_failure(user_name, context)
            log.info("rejected a request from %s: first factor failed", client.conf.name)
            return reject
        if await self._requirement(user_name, context) is not Requirement.REQUIRED:
            return (p.ACCESS_ACCEPT, [])
        deadline = time.time() + self.settings.radius.state_lifetime
        return self._challenge(user_name, client, deadline, 0)

    def _challenge(self, user_name: bytes, client: Client, deadline: float, attempts: int) -> Reply:
        if len(self.states) >= MAX_PENDING_STATES:
            log.warning("too many pending challenges; rejecting")
            return (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, PUBLIC_FAILURE_MESSAGE.encode())])
        state = secrets.token_bytes(STATE_BYTES)
        self.states[state] = PendingState(user_name, client.conf.name, deadline, attempts)
        return (p.ACCESS_CHALLENGE, [(p.REPLY_MESSAGE, CHALLENGE_PROMPT.encode()), (p.STATE, state)])

    async def _second_step(self, state: bytes, user_name: bytes, code: str, client: Client, context: Context) -> Reply:
        reject = (p.ACCESS_REJECT, [(p.REPLY_MESSAGE, PUBLIC_FAILURE_MESSAGE.encode())])
        pending = self.states.pop(state, None)  # used once, whatever happens next
        if pending is None:
            log.info("rejected a request from %s: unknown or reused State", client.conf.name)
            return reject
        if pending.deadline <= time.time():
            log.info("rejected a request from %s: expired State", client.conf.name)
            return reject
        if pending.client != client.conf.name or pending.user_name != user_name:
            log.warning("rejected a request from %s: State issued to another user or client", client.conf.name)
            return reject
        decision: Decision = await self.db.submit("verify", user_name, code, context)
        if decision.accepted:
            return (p.ACCESS_ACCEPT, [])
        attempts = pending.attempts + 1
        if attempts < MAX_CODE_ATTEMPTS and pending.deadline > time.time():
            return self._challenge(user_name, client, pending.deadline, attempts)
        return reject


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not write an audit row: %s", future.exception())
