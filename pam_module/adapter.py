"""The PAM adapter: PAM items and the conversation in, one Verifier call, a PAM code out.

It holds no policy. The core decides; this module only maps:

- accepted                      -> PAM_SUCCESS
- exempt or inside grace        -> PAM_IGNORE (the rest of the stack decides)
- anything else, errors included -> PAM_AUTH_ERR (auth) / PAM_PERM_DENIED (account)

Nothing here reads the process environment (os.environ): under sudo and su it is the invoking
user's. The settings file is the PAM line's ``config=``, else /etc/mfaguard/mfaguard.yaml.

The auth phase hands its success to the account phase through a one-time ticket
in the PAM environment (sshd runs auth and account in a forked child and copies
the PAM environment back). The account phase removes it, so it never reaches a
session.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from devicedb.errors import ConfigError
from devicedb.fsafety import open_private_log
from devicedb.models import PUBLIC_FAILURE_MESSAGE, Context, Requirement, Result
from devicedb.settings import Settings, load_settings
from devicedb.verifier import Verifier

TICKET_ENV = "MFAGUARD_TICKET"
DEFAULT_PROMPT = "Verification code: "
DEFAULT_TRIES = 3
MAX_TRIES = 10
# Every failure is followed by the next prompt, up to `tries`, whatever its reason: the number
# of prompts must not tell a locked account, or one without a device, from a wrong code.

log = logging.getLogger("mfaguard")
_log_ready: set[str] = set()


@dataclass(frozen=True)
class Options:
    config: str | None = None
    prompt: str = DEFAULT_PROMPT
    tries: int = DEFAULT_TRIES
    log: str | None = None


def parse_options(args: list[str]) -> Options:
    """PAM line options after the entry file. An unknown or bad option is an error (fail closed)."""
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for arg in args:
        name, sep, value = arg.partition("=")
        if name in seen:
            raise ConfigError(f"PAM option {name}= is given twice; give each option once")
        seen.add(name)
        if not sep:
            raise ConfigError(f"PAM option {arg!r} is not name=value; allowed: config=, prompt=, tries=, venv=, log=")
        if name == "config":
            if not value.startswith("/"):
                raise ConfigError(f"PAM option config={value!r}: an absolute path is needed")
            values["config"] = value
        elif name == "prompt":
            if not value or not value.isprintable():
                raise ConfigError("PAM option prompt=: 1 or more printable characters are needed")
            values["prompt"] = value
        elif name == "tries":
            if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_TRIES:
                raise ConfigError(f"PAM option tries={value!r}: a whole number from 1 to {MAX_TRIES} is needed")
            values["tries"] = int(value)
        elif name == "log":
            if not value.startswith("/"):
                raise ConfigError(f"PAM option log={value!r}: an absolute path is needed")
            values["log"] = value
        elif name == "venv":
            continue  # read by the entry file
        else:
            raise ConfigError(f"unknown PAM option {name!r}; allowed: config=, prompt=, tries=, venv=, log=")
    return Options(**values)


def _setup_log(path: str) -> None:
    """Log to a file: there is no syslog socket on every host. Never follows a symlink."""
    if path in _log_ready:
        return
    try:
        handler = logging.StreamHandler(open_private_log(path))
        handler.setFormatter(logging.Formatter(f"%(asctime)s mfaguard pam[{os.getpid()}]: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        _log_ready.add(path)
    except OSError:
        pass  # the audit row in the database still records every decision


def _context(pamh: Any) -> Context:
    return Context(
        service=pamh.service or "pam",
        remote_host=pamh.rhost or None,
        tty=pamh.tty or None,
        ruser=pamh.ruser or None,
    )


def _say(pamh: Any, style: int, text: str) -> None:
    # A message that cannot be shown changes no decision.
    with contextlib.suppress(Exception):
        pamh.conversation(pamh.Message(style, text))


def _start(pamh: Any, argv: list[str]) -> tuple[Options, Settings, str]:
    options = parse_options(list(argv[1:]))
    if options.log:
        _setup_log(options.log)
    # config= or the default path, never the process environment: under sudo and su that is the
    # invoking user's, and $MFAGUARD_CONFIG would let them choose the settings (all defaults, say).
    settings = load_settings(options.config, require_file=True, environ={})
    _setup_log(options.log or settings.logging.file)
    user = pamh.get_user(None)
    if not user:
        raise ConfigError("PAM gave no user name")
    return options, settings, user


def authenticate(pamh: Any, flags: int, argv: list[str]) -> int:
    options, settings, user = _start(pamh, argv)
    context = _context(pamh)
    verifier = Verifier(settings)
    try:
        requirement = verifier.requirement(user, context)
        if requirement.requirement is not Requirement.REQUIRED:
            log.info("%s: %s for %s (%s)", context.service, requirement.requirement.value, user, requirement.reason)
            return int(pamh.PAM_IGNORE)
        # An SSH login made with one of the user's enrolled security keys has its FIDO factor done:
        # sshd verified the key and reports it in SSH_AUTH_INFO_0. A plain key still gets the prompt,
        # and so does the key when the user's own authorized_keys (read here, judged by the core)
        # hold it with weaker options than the enrolled ones, or cannot be read safely.
        auth_info = _env(pamh, "SSH_AUTH_INFO_0")
        if auth_info:
            from pam_module.authorized_keys import user_key_files

            decision = verifier.ssh_key_factor(user, auth_info, context, user_files=lambda: user_key_files(user))
            if decision is not None and decision.accepted:
                pamh.env[TICKET_ENV] = verifier.issue_ticket(user, context)
                log.info(
                    "%s: accepted %s (security key, device %s)", context.service, decision.user, decision.device_id
                )
                return int(pamh.PAM_SUCCESS)
            if decision is not None:
                log.info(
                    "%s: %s: security key (device %s) not counted, the code is asked: %s",
                    context.service,
                    decision.user,
                    decision.device_id,
                    decision.reason,
                )
        decision = _try_local_key(pamh, verifier, user, context)
        if decision is not None and decision.accepted:
            pamh.env[TICKET_ENV] = verifier.issue_ticket(user, context)
            log.info("%s: accepted %s (FIDO2 key, device %s)", context.service, decision.user, decision.device_id)
            return int(pamh.PAM_SUCCESS)
        if decision is not None:
            log.info("%s: rejected %s (FIDO2 key): %s", context.service, decision.user, decision.reason)
            _say(pamh, pamh.PAM_ERROR_MSG, PUBLIC_FAILURE_MESSAGE)
            if decision.result is Result.ERROR:
                # An empty or aborted PIN answer, or a database error: the login ends, as at the code prompt.
                return int(pamh.PAM_AUTH_ERR)
        if verifier.fido_required(context):
            # The core accepts no code at this service: asking for one would only mislead.
            if decision is None:
                verifier.record_abandoned(user, context, "no FIDO2 key answered, and this service requires one")
                _say(pamh, pamh.PAM_ERROR_MSG, PUBLIC_FAILURE_MESSAGE)
            return int(pamh.PAM_AUTH_ERR)
        for _ in range(options.tries):
            try:
                answer = pamh.conversation(pamh.Message(pamh.PAM_PROMPT_ECHO_OFF, options.prompt)).resp
            except Exception as exc:
                verifier.record_abandoned(user, context, f"conversation error: {type(exc).__name__}")
                return int(pamh.PAM_AUTH_ERR)
            if answer is None or not str(answer).strip():
                verifier.record_abandoned(user, context, "empty answer")
                _say(pamh, pamh.PAM_ERROR_MSG, PUBLIC_FAILURE_MESSAGE)
                return int(pamh.PAM_AUTH_ERR)
            decision = verifier.verify(user, answer, context)
            del answer
            if decision.accepted:
                pamh.env[TICKET_ENV] = verifier.issue_ticket(user, context)
                log.info("%s: accepted %s (device %s)", context.service, decision.user, decision.device_id)
                return int(pamh.PAM_SUCCESS)
            log.info("%s: rejected %s: %s", context.service, decision.user, decision.reason)
            _say(pamh, pamh.PAM_ERROR_MSG, PUBLIC_FAILURE_MESSAGE)
        return int(pamh.PAM_AUTH_ERR)
    except BaseException as exc:
        log.exception("%s: internal error for %s", context.service, user)
        with contextlib.suppress(BaseException):  # already failing closed
            verifier.record_abandoned(user, context, f"error: {type(exc).__name__}")
        return int(pamh.PAM_AUTH_ERR)
    finally:
        verifier.close()


def _try_local_key(pamh: Any, verifier: Verifier, user: str, context: Context) -> Any:
    """A FIDO2 key's decision, or None (no FIDO2 device enrolled, or no key attached): then the code prompt.
    fido2 is imported only for users who have such a device."""
    if not verifier.has_fido_key(user):
        return None
    from pam_module import fido

    def ask_pin(prompt: str) -> Any:
        return pamh.conversation(pamh.Message(pamh.PAM_PROMPT_ECHO_OFF, prompt)).resp

    return fido.authenticate_with_key(
        lambda text: _say(pamh, pamh.PAM_TEXT_INFO, text),
        verifier,
        user,
        context,
        fido.attached_keys(),
        ask_pin=ask_pin,
    )


def _env(pamh: Any, name: str) -> str | None:
    try:
        value = pamh.env.get(name)
    except Exception:
        return None
    return value if isinstance(value, str) else None


def _take_ticket(pamh: Any) -> str | None:
    """Read and remove the ticket, so that it never reaches the session's environment."""
    try:
        token = pamh.env.get(TICKET_ENV)
    except Exception:
        return None
    if token is not None:
        try:
            del pamh.env[TICKET_ENV]
        except Exception:
            log.warning("could not remove %s from the PAM environment", TICKET_ENV)
    return token or None


def acct_mgmt(pamh: Any, flags: int, argv: list[str]) -> int:
    token = _take_ticket(pamh)
    options, settings, user = _start(pamh, argv)
    context = _context(pamh)
    verifier = Verifier(settings)
    try:
        if token is not None and verifier.redeem_ticket(user, token, context):
            return int(pamh.PAM_SUCCESS)
        requirement = verifier.requirement(user, context)
        if requirement.requirement is not Requirement.REQUIRED:
            return int(pamh.PAM_IGNORE)
        verifier.record_abandoned(user, context, "account: this login did not pass the second factor")
        _say(
            pamh,
            pamh.PAM_ERROR_MSG,
            "A second factor is required for this login and was not given: "
            "the login method skipped the mfaguard prompt.",
        )
        return int(pamh.PAM_PERM_DENIED)
    except BaseException:
        log.exception("%s: account check failed for %s", context.service, user)
        return int(pamh.PAM_PERM_DENIED)
    finally:
        verifier.close()


def setcred(pamh: Any, flags: int, argv: list[str]) -> int:
    # Called only after the auth stack has succeeded; it grants nothing. mfaguard has no
    # credentials to set, so it only makes sure that no ticket lingers into the session.
    _take_ticket(pamh)
    return int(pamh.PAM_SUCCESS)
