"""Settings: mfaguard.yaml loaded once and validated into typed, frozen objects.

Every problem is reported as ``FILE:LINE: key.path: what is wrong; what is allowed``.
Unknown keys, wrong types and out-of-range values are errors, never ignored.
The documented defaults live here and in ``config/mfaguard.yaml``; a test keeps
the two in step.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from devicedb.errors import ConfigError, UnsafePathError
from devicedb.fsafety import read_trusted_file

DEFAULT_CONFIG_PATH = "/etc/mfaguard/mfaguard.yaml"
CONFIG_ENV = "MFAGUARD_CONFIG"

# NIST SP 800-63B: at most 100 consecutive failed attempts on one account.
HARD_LOCK_CEILING = 100
MAX_DEVICES_CEILING = 8
MAX_TOTP_WINDOW = 10


@dataclass(frozen=True)
class DatabaseSettings:
    path: str = "/var/lib/mfaguard/mfaguard.db"
    key_file: str = "/etc/mfaguard/seal.key"
    synchronous: str = "full"
    busy_timeout_ms: int = 5000


@dataclass(frozen=True)
class TotpSettings:
    period: int = 30
    digits: int = 6
    algorithm: str = "sha1"
    window: int = 1


@dataclass(frozen=True)
class LockoutSettings:
    max_failures: int = 5
    lock_seconds: int = 300
    hard_lock_after: int = 20


@dataclass(frozen=True)
class UsernameSettings:
    strip_realms: tuple[str, ...] = ()
    case_fold: bool = False


@dataclass(frozen=True)
class GraceSettings:
    until: dt.datetime | None = None
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnforcementSettings:
    exempt_users: tuple[str, ...] = ()
    exempt_groups: tuple[str, ...] = ()
    grace: GraceSettings = field(default_factory=GraceSettings)


@dataclass(frozen=True)
class LoggingSettings:
    file: str = "/var/log/mfaguard/mfaguard.log"


@dataclass(frozen=True)
class FidoSettings:
    # None means pam://HOSTNAME; one shared value lets several hosts accept the same keys.
    rp_id: str | None = None
    # PAM services (sudo, say) at which only a FIDO2 key will do: no code, no backup code.
    required_for_services: tuple[str, ...] = ()


# RADIUS: secrets shorter than this are refused (RFC 2865 section 3 recommends at least 16 octets).
RADIUS_MIN_SECRET_CHARS = 16
RADIUS_MAX_SECRET_CHARS = 256
RADIUS_MODES = ("challenge", "append", "otp-only")
# Reply attributes a client entry may add to Access-Accept: name -> "string" or "integer".
RADIUS_REPLY_ATTRIBUTES = {
    "Class": "string",
    "Filter-Id": "string",
    "Session-Timeout": "integer",
    "Idle-Timeout": "integer",
    "Acct-Interim-Interval": "integer",
}


@dataclass(frozen=True)
class RadiusClient:
    name: str
    # An IP network in canonical form: a single address is a /32 or /128.
    address: str
    secret: str | None = None
    secret_file: str | None = None
    require_message_authenticator: bool = True
    mode: str = "challenge"
    # (attribute name, value) pairs added to every Access-Accept for this client, in order.
    reply: tuple[tuple[str, str | int], ...] = ()

    def read_secret(self) -> bytes:
        """The shared secret as bytes: inline, or read from secret_file (root-owned, mode 0600)."""
        if self.secret is not None:
            return self.secret.encode("utf-8")
        assert self.secret_file is not None
        try:
            raw = read_trusted_file(self.secret_file, f"RADIUS secret file of client {self.name}", secret=True)
        except FileNotFoundError:
            raise ConfigError(f"radius client {self.name}: secret_file {self.secret_file} does not exist") from None
        except OSError as exc:
            raise ConfigError(
                f"radius client {self.name}: secret_file {self.secret_file} cannot be read: {exc.strerror or exc}"
            ) from None
        secret = raw.rstrip(b"\r\n")
        if b"\n" in secret or b"\0" in secret:
            raise ConfigError(f"radius client {self.name}: secret_file {self.secret_file} must hold one line")
        if not RADIUS_MIN_SECRET_CHARS <= len(secret) <= RADIUS_MAX_SECRET_CHARS:
            raise ConfigError(
                f"radius client {self.name}: the secret in {self.secret_file} is {len(secret)} bytes long; "
                f"allowed: {RADIUS_MIN_SECRET_CHARS} to {RADIUS_MAX_SECRET_CHARS} bytes"
            )
        return secret


@dataclass(frozen=True)
class RadiusSettings:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 1812), ("::1", 1812))
    first_factor: str = "mfaguard-radius"
    state_lifetime: int = 60
    duplicate_cache_seconds: int = 30
    threads: int = 8
    workers: int = 1
    clients: tuple[RadiusClient, ...] = ()


@dataclass(frozen=True)
class Settings:
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    issuer: str = "mfaguard"
    max_devices: int = 8
    totp: TotpSettings = field(default_factory=TotpSettings)
    lockout: LockoutSettings = field(default_factory=LockoutSettings)
    usernames: UsernameSettings = field(default_factory=UsernameSettings)
    enforcement: EnforcementSettings = field(default_factory=EnforcementSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    fido: FidoSettings = field(default_factory=FidoSettings)
    radius: RadiusSettings = field(default_factory=RadiusSettings)
    # Where the settings came from: a path, or None for the built-in defaults.
    source: str | None = None


# ---------------------------------------------------------------------------
# Field specifications. Each checker returns the typed value or raises _Bad.


class _Bad(Exception):
    def __init__(self, problem: str, allowed: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.allowed = allowed
        # The 1-based line of the offending item, where a node checker knows it better than the key's.
        self.line = line


Checker = Callable[[Any], Any]


def _int_range(low: int, high: int) -> Checker:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"{value!r} is not an integer", f"an integer from {low} to {high}")
        if not low <= value <= high:
            raise _Bad(f"{value} is out of range", f"an integer from {low} to {high}")
        return value

    return check


def _int_choice(*choices: int) -> Checker:
    allowed = " or ".join(str(c) for c in choices)

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value not in choices:
            raise _Bad(f"{value!r} is not allowed", allowed)
        return value

    return check


def _str_choice(*choices: str) -> Checker:
    allowed = ", ".join(choices)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Bad(f"{value!r} is not allowed", f"one of {allowed}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"{value!r} is not a boolean", "true or false")
    return value


def _absolute_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Bad(f"{value!r} is not an absolute path", "an absolute path such as /var/lib/mfaguard/mfaguard.db")
    return os.path.normpath(value)


def _text(max_len: int) -> Checker:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Bad(f"{value!r} is not a non-empty string", f"a string of 1 to {max_len} printable characters")
        if len(value) > max_len or not value.isprintable():
            raise _Bad("the string is too long or holds control characters", f"1 to {max_len} printable characters")
        return value

    return check


def _name_list(what: str) -> Checker:
    def check(value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise _Bad(f"{value!r} is not a list", f"a list of {what}, for example [alice, bob]")
        out = []
        for item in value:
            if not isinstance(item, str) or not item or not item.isprintable() or item != item.strip():
                raise _Bad(f"list item {item!r} is not a plain name", f"a list of {what} without spaces")
            out.append(item)
        return tuple(out)

    return check


def _rp_id_or_null(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 253 or not value.isprintable() or " " in value:
        raise _Bad(f"{value!r} is not an RP id", "null (pam://HOSTNAME), or a name such as pam://vpn.example.com")
    return value


def _instant_or_null(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    raise _Bad(f"{value!r} is not a date", "null (off), a date such as 2027-01-31, or 2027-01-31T12:00:00Z")


_PAM_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _listen_list(value: Any) -> tuple[tuple[str, int], ...]:
    allowed = 'a list of "ADDRESS:PORT", for example ["127.0.0.1:1812", "[::1]:1812", "0.0.0.0:1812"]'
    if not isinstance(value, list) or not value:
        raise _Bad(f"{value!r} is not a non-empty list", allowed)
    out: list[tuple[str, int]] = []
    for item in value:
        if not isinstance(item, str):
            raise _Bad(f"list item {item!r} is not a string", allowed)
        host, sep, port_text = item.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            want = 6
        else:
            want = 4
        try:
            address = ipaddress.ip_address(host)
            port = int(port_text, 10)
        except ValueError:
            raise _Bad(f"list item {item!r} is not ADDRESS:PORT", allowed) from None
        if not sep or address.version != want or not 1 <= port <= 65535 or not port_text.isdigit():
            raise _Bad(f"list item {item!r} is not ADDRESS:PORT (IPv6 in brackets, port 1-65535)", allowed)
        entry = (str(address), port)
        if entry in out:
            raise _Bad(f"list item {item!r} is listed twice", allowed)
        out.append(entry)
    return tuple(out)


def _pam_service_or_none(value: Any) -> str:
    allowed = "a PAM service name from /etc/pam.d (letters, digits, . _ -), or none (only with mode otp-only)"
    if not isinstance(value, str) or not _PAM_SERVICE.fullmatch(value):
        raise _Bad(f"{value!r} is not a PAM service name", allowed)
    return value


_CLIENT_KEYS = ("name", "address", "secret", "secret_file", "require_message_authenticator", "mode", "reply")


def _radius_reply(value: Any, line: int, where: str) -> tuple[tuple[str, str | int], ...]:
    names = ", ".join(RADIUS_REPLY_ATTRIBUTES)
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _Bad(
            f"{where}: reply: {value!r} is not a mapping", f"a mapping of attribute name to value; names: {names}", line
        )
    out: list[tuple[str, str | int]] = []
    for attr, item in value.items():
        kind = RADIUS_REPLY_ATTRIBUTES.get(attr) if isinstance(attr, str) else None
        if kind is None:
            raise _Bad(f"{where}: reply attribute {attr!r} is not supported", f"one of {names}", line)
        if kind == "integer":
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= 0xFFFFFFFF:
                raise _Bad(
                    f"{where}: reply.{attr}: {item!r} is not an integer", "an integer from 0 to 4294967295", line
                )
        elif not isinstance(item, str) or not item or len(item.encode("utf-8")) > 253 or not item.isprintable():
            raise _Bad(f"{where}: reply.{attr}: {item!r} is not a string", "1 to 253 bytes of printable text", line)
        out.append((attr, item))
    return tuple(out)


def _radius_client(node: yaml.Node, index: int) -> RadiusClient:
    where = f"item {index + 1}"
    start = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise _Bad(f"{where} is not a mapping", "a mapping with name, address and secret or secret_file", start)
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = _scalar_value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str) or key not in _CLIENT_KEYS:
            raise _Bad(f"{where}: {key!r} is an unknown key", f"keys {', '.join(_CLIENT_KEYS)}", line)
        if key in values:
            raise _Bad(f"{where}: {key} is given twice (first at line {lines[key]})", "each key once", line)
        lines[key] = line
        values[key] = _scalar_value(value_node)

    def bad(key: str, problem: str, allowed: str) -> _Bad:
        return _Bad(f"{where}: {key}: {problem}", allowed, lines.get(key, start))

    name = values.get("name")
    if not isinstance(name, str) or not _PAM_SERVICE.fullmatch(name):
        raise bad("name", f"{name!r} is not a plain name", "1 to 64 letters, digits, . _ - (required)")
    where = f"client {name}"
    address = values.get("address")
    try:
        if not isinstance(address, str):
            raise ValueError
        network = ipaddress.ip_network(address, strict=True)
    except ValueError:
        raise bad(
            "address", f"{address!r} is not an IP address or network", "an address or CIDR such as 10.0.0.0/24"
        ) from None
    secret = values.get("secret")
    secret_file = values.get("secret_file")
    if (secret is None) == (secret_file is None):
        raise bad("secret", "exactly one of secret and secret_file is needed", "secret: TEXT or secret_file: PATH")
    if secret is not None:
        if not isinstance(secret, str) or not RADIUS_MIN_SECRET_CHARS <= len(secret) <= RADIUS_MAX_SECRET_CHARS:
            shown = "not a string" if not isinstance(secret, str) else f"{len(secret)} characters long"
            raise bad(
                "secret",
                f"the secret is {shown}",
                f"{RADIUS_MIN_SECRET_CHARS} to {RADIUS_MAX_SECRET_CHARS} characters (shorter secrets are refused)",
            )
        if not secret.isprintable():
            raise bad("secret", "the secret holds control characters", "printable characters")
    if secret_file is not None:
        try:
            secret_file = _absolute_path(secret_file)
        except _Bad as exc:
            raise bad("secret_file", exc.problem, exc.allowed) from None
    require_ma = values.get("require_message_authenticator", True)
    if not isinstance(require_ma, bool):
        raise bad("require_message_authenticator", f"{require_ma!r} is not a boolean", "true or false")
    mode = values.get("mode", "challenge")
    if mode not in RADIUS_MODES:
        raise bad("mode", f"{mode!r} is not allowed", f"one of {', '.join(RADIUS_MODES)}")
    reply = _radius_reply(values.get("reply"), lines.get("reply", start), where)
    return RadiusClient(str(name), str(network), secret, secret_file, require_ma, str(mode), reply)


def _radius_clients(node: yaml.Node) -> tuple[RadiusClient, ...]:
    """A list of client mappings; errors name the item's own line."""
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode) and _scalar_value(node) is None:
        return ()
    if not isinstance(node, yaml.SequenceNode):
        raise _Bad("not a list", "a list of client mappings (name, address, secret or secret_file, mode...)", line)
    clients: list[RadiusClient] = []
    for index, item in enumerate(node.value):
        client = _radius_client(item, index)
        if any(c.name == client.name for c in clients):
            raise _Bad(f"client name {client.name} is used twice", "unique names", item.start_mark.line + 1)
        if any(c.address == client.address for c in clients):
            raise _Bad(
                f"client {client.name}: address {client.address} is listed twice",
                "one entry per address or network",
                item.start_mark.line + 1,
            )
        clients.append(client)
    return tuple(clients)


@dataclass(frozen=True)
class _Field:
    checker: Checker
    doc: str
    # A node checker gets the YAML node itself (for lists of mappings, with the line of each item).
    node: bool = False


@dataclass(frozen=True)
class _Section:
    cls: type
    fields: Mapping[str, _Field | _Section]


_SPEC = _Section(
    Settings,
    {
        "database": _Section(
            DatabaseSettings,
            {
                "path": _Field(_absolute_path, "the SQLite database file"),
                "key_file": _Field(_absolute_path, "the 32-byte key that seals OTP seeds"),
                "synchronous": _Field(_str_choice("full", "normal"), "SQLite durability of each commit"),
                "busy_timeout_ms": _Field(_int_range(1, 5000), "how long to wait for a locked database"),
            },
        ),
        "issuer": _Field(_text(64), "the issuer name shown in authenticator apps"),
        "max_devices": _Field(_int_range(1, MAX_DEVICES_CEILING), "devices per user, all kinds together"),
        "totp": _Section(
            TotpSettings,
            {
                "period": _Field(_int_choice(30, 60), "seconds per step for new TOTP devices"),
                "digits": _Field(_int_choice(6, 8), "code length for new TOTP devices"),
                "algorithm": _Field(_str_choice("sha1", "sha256", "sha512"), "HMAC for new TOTP devices"),
                "window": _Field(_int_range(0, MAX_TOTP_WINDOW), "steps accepted either side of now"),
            },
        ),
        "lockout": _Section(
            LockoutSettings,
            {
                "max_failures": _Field(_int_range(1, HARD_LOCK_CEILING), "failures before a temporary lock"),
                "lock_seconds": _Field(_int_range(1, 86400), "length of a temporary lock"),
                "hard_lock_after": _Field(
                    _int_range(1, HARD_LOCK_CEILING), "consecutive failures before a lock only an admin lifts"
                ),
            },
        ),
        "usernames": _Section(
            UsernameSettings,
            {
                "strip_realms": _Field(_name_list("realm names"), "realms removed from alice@REALM and REALM\\alice"),
                "case_fold": _Field(_boolean, "fold login names to lower case"),
            },
        ),
        "enforcement": _Section(
            EnforcementSettings,
            {
                "exempt_users": _Field(_name_list("user names"), "users who need no second factor"),
                "exempt_groups": _Field(_name_list("group names"), "groups whose members need no second factor"),
                "grace": _Section(
                    GraceSettings,
                    {
                        "until": _Field(_instant_or_null, "end of the enrollment grace period, or null (off)"),
                        "users": _Field(_name_list("user names"), "users the grace rule covers"),
                        "groups": _Field(_name_list("group names"), "groups the grace rule covers"),
                    },
                ),
            },
        ),
        "logging": _Section(
            LoggingSettings,
            {"file": _Field(_absolute_path, "the daemon log file of the front ends")},
        ),
        "fido": _Section(
            FidoSettings,
            {
                "rp_id": _Field(_rp_id_or_null, "the relying party id of local FIDO2 keys (null: pam://HOSTNAME)"),
                "required_for_services": _Field(
                    _name_list("PAM service names"), "services at which only a FIDO2 key is accepted"
                ),
            },
        ),
        "radius": _Section(
            RadiusSettings,
            {
                "listen": _Field(_listen_list, "the addresses and ports mfa-radiusd listens on"),
                "first_factor": _Field(_pam_service_or_none, "the PAM service that checks passwords, or none"),
                "state_lifetime": _Field(_int_range(10, 600), "seconds an Access-Challenge State stays valid"),
                "duplicate_cache_seconds": _Field(_int_range(1, 300), "seconds a reply is kept for retransmissions"),
                "threads": _Field(_int_range(1, 64), "threads that run first-factor (PAM) checks"),
                "workers": _Field(_int_range(1, 64), "processes that share the listening sockets"),
                "clients": _Field(_radius_clients, "the RADIUS clients (NAS) allowed to send requests", node=True),
            },
        ),
    },
)


# ---------------------------------------------------------------------------
# YAML walking with line numbers.


_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)", re.ASCII)


def _scalar_value(node: yaml.Node) -> Any:
    """The Python value of a node. A tag or value YAML cannot build is refused at its own line.

    YAML 1.1 (PyYAML's) also reads 0x10, 0b10, 010 (octal: 8), 1_000 and 1:00 (sexagesimal: 60) as
    integers: a setting written so almost never means what it reads as, so integers are decimal only."""
    if node.tag == "tag:yaml.org,2002:int" and isinstance(node.value, str) and not _DECIMAL.fullmatch(node.value):
        raise _Bad(
            f"{node.value!r} is not a plain decimal integer",
            "an integer in decimal digits (no 0x or 0b prefix, leading zero, _ or :)",
            node.start_mark.line + 1,
        )
    try:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        line = node.start_mark.line + 1
        if node.tag == "tag:yaml.org,2002:timestamp":
            allowed = "a real date and time, such as 2026-12-31T23:59:00Z"
        else:
            allowed = "plain YAML values, without tags"
        raise _Bad(f"cannot read this value ({problem})", allowed, line) from None


def _build(section: _Section, node: yaml.Node | None, path: str, src: str) -> Any:
    if node is None:
        return section.cls()
    if not isinstance(node, yaml.MappingNode):
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return section.cls()
        raise ConfigError(f"{src}:{node.start_mark.line + 1}: {path or 'top level'}: expected a mapping of keys")
    seen: dict[str, int] = {}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        try:
            key = _scalar_value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        except _Bad as bad:
            where = path or "top level"
            raise ConfigError(f"{src}:{line}: {where}: key {bad.problem}; allowed: {bad.allowed}") from None
        dotted = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str) or key not in section.fields:
            known = ", ".join(section.fields)
            raise ConfigError(f"{src}:{line}: {dotted}: unknown key; allowed keys here: {known}")
        if key in seen:
            raise ConfigError(f"{src}:{line}: {dotted}: duplicate key (first at line {seen[key]})")
        seen[key] = line
        spec = section.fields[key]
        if isinstance(spec, _Section):
            values[key] = _build(spec, value_node, dotted, src)
            continue
        if not isinstance(value_node, yaml.ScalarNode | yaml.SequenceNode):
            raise ConfigError(f"{src}:{line}: {dotted}: expected a value, found a mapping; this key is {spec.doc}")
        try:
            values[key] = spec.checker(value_node if spec.node else _scalar_value(value_node))
        except _Bad as bad:
            at = bad.line if bad.line is not None else value_node.start_mark.line + 1
            raise ConfigError(f"{src}:{at}: {dotted}: {bad.problem}; allowed: {bad.allowed}") from None
    try:
        return section.cls(**values)
    except TypeError as exc:  # pragma: no cover - the spec and the dataclasses disagree
        raise ConfigError(f"{src}: {path}: internal settings error: {exc}") from None


def _cross_checks(settings: Settings, src: str) -> None:
    lockout = settings.lockout
    if lockout.hard_lock_after < lockout.max_failures:
        raise ConfigError(
            f"{src}: lockout.hard_lock_after ({lockout.hard_lock_after}) is below lockout.max_failures "
            f"({lockout.max_failures}); allowed: hard_lock_after >= max_failures"
        )
    grace = settings.enforcement.grace
    if grace.until is not None and not (grace.users or grace.groups):
        raise ConfigError(
            f"{src}: enforcement.grace.until is set but grace.users and grace.groups are both empty; "
            "name who the grace rule covers, or set until: null"
        )
    if os.path.abspath(settings.database.path) == os.path.abspath(settings.database.key_file):
        raise ConfigError(f"{src}: database.path and database.key_file must be different files")
    radius = settings.radius
    if radius.first_factor == "none":
        for client in radius.clients:
            if client.mode != "otp-only":
                raise ConfigError(
                    f"{src}: radius.clients: client {client.name} has mode {client.mode} but radius.first_factor "
                    "is none; allowed: first_factor none only when every client has mode otp-only"
                )


def parse_settings(text: str, source: str = "<string>") -> Settings:
    """Validate YAML text into Settings. Raises ConfigError naming the line and key."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                line = event.start_mark.line + 1 if event.start_mark is not None else "?"
                raise ConfigError(f"{source}:{line}: YAML anchors and aliases are not allowed here")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply; mfaguard settings are at most a few levels deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    try:
        settings: Settings = _build(_SPEC, root, "", source)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply; mfaguard settings are at most a few levels deep") from None
    settings = _replace_source(settings, source)
    _cross_checks(settings, source)
    return settings


def _replace_source(settings: Settings, source: str | None) -> Settings:
    from dataclasses import replace

    return replace(settings, source=source)


def config_path(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The settings path to use, and whether the administrator named it (flag or environment)."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, True
    if env.get(CONFIG_ENV):
        return env[CONFIG_ENV], True
    return DEFAULT_CONFIG_PATH, False


def load_settings(
    path: str | None = None, *, require_file: bool = False, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load settings from ``path``, ``$MFAGUARD_CONFIG`` or the default path.

    A file the administrator named must exist. The default path may be absent, and the
    built-in defaults then apply, unless ``require_file`` (the daemons and the PAM module).
    ``environ`` stands in for ``os.environ``; the PAM module passes ``{}``: under sudo and su the
    process environment is the invoking user's.
    """
    chosen, named = config_path(path, environ)
    try:
        raw = read_trusted_file(chosen, "config file")
    except FileNotFoundError:
        if named or require_file:
            raise ConfigError(
                f"{chosen}: config file not found; create it from config/mfaguard.yaml "
                "(mode 0644 or stricter, owned by root)"
            ) from None
        return Settings()
    except UnsafePathError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{chosen}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{chosen}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    settings = parse_settings(text, chosen)
    inline = [c.name for c in settings.radius.clients if c.secret is not None]
    if inline:
        mode = os.stat(chosen).st_mode
        if mode & 0o077:
            raise ConfigError(
                f"{chosen}: holds the inline RADIUS secret of client(s) {', '.join(inline)} and is readable by "
                f"group or others (mode {oct(mode & 0o777)}); fix: chmod 600 {chosen}, or move the secrets to "
                "secret_file"
            )
    return settings


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """Settings as plain data, for `mfa-admin` output and for tests."""
    from dataclasses import asdict

    data = asdict(settings)
    data.pop("source", None)
    return data
