"""The radius: section of mfaguard.yaml: defaults, and errors that name file, line and key."""

from __future__ import annotations

import pytest

from devicedb.errors import ConfigError
from devicedb.settings import RadiusSettings, Settings, parse_settings


def parse(text: str) -> Settings:
    return parse_settings(text, "conf.yaml")


def test_defaults() -> None:
    r = parse("").radius
    assert r == RadiusSettings()
    assert r.listen == (("127.0.0.1", 1812), ("::1", 1812))
    assert r.first_factor == "mfaguard-radius" and r.state_lifetime == 60 and r.clients == ()


def test_a_full_client_entry() -> None:
    r = parse(
        "radius:\n"
        '  listen: ["0.0.0.0:1812", "[::]:11812"]\n'
        "  clients:\n"
        "    - name: vpn1\n"
        "      address: 10.0.0.0/24\n"
        "      secret: 0123456789abcdef\n"
        "      mode: append\n"
        "      require_message_authenticator: false\n"
        "      reply: {Class: staff, Session-Timeout: 600}\n"
    ).radius
    assert r.listen == (("0.0.0.0", 1812), ("::", 11812))  # noqa: S104
    (c,) = r.clients
    assert (c.name, c.address, c.mode, c.require_message_authenticator) == ("vpn1", "10.0.0.0/24", "append", False)
    assert c.reply == (("Class", "staff"), ("Session-Timeout", 600))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("radius:\n  listen: [1812]\n", "conf.yaml:2: radius.listen: list item 1812 is not a string"),
        ('radius:\n  listen: ["::1:1812"]\n', "conf.yaml:2: radius.listen: list item '::1:1812' is not ADDRESS:PORT"),
        ("radius:\n  first_factor: 'a b'\n", "conf.yaml:2: radius.first_factor: 'a b' is not a PAM service name"),
        ("radius:\n  state_lifetime: 5\n", "conf.yaml:2: radius.state_lifetime: 5 is out of range"),
        ("radius:\n  clients: {a: 1}\n", "conf.yaml:2: radius.clients: expected a value, found a mapping"),
        (
            "radius:\n  clients:\n    - name: a\n      address: 10.0.0.1\n      secret: 0123456789abcdef\n"
            "      colour: red\n",
            "conf.yaml:6: radius.clients: item 1: 'colour' is an unknown key",
        ),
        (
            "radius:\n  clients:\n    - name: a\n      address: 10.0.0.1/8\n      secret: 0123456789abcdef\n",
            "conf.yaml:4: radius.clients: client a: address: '10.0.0.1/8' is not an IP address or network",
        ),
        (
            "radius:\n  clients:\n    - name: a\n      address: 10.0.0.1\n      secret: 0123456789abcde\n",
            "conf.yaml:5: radius.clients: client a: secret: the secret is 15 characters long",
        ),
        (
            "radius:\n  clients:\n    - name: a\n      address: 10.0.0.1\n",
            "conf.yaml:3: radius.clients: client a: secret: exactly one of secret and secret_file is needed",
        ),
        (
            "radius:\n  clients:\n    - name: a\n      address: 10.0.0.1\n      secret_file: rel/path\n",
            "conf.yaml:5: radius.clients: client a: secret_file: 'rel/path' is not an absolute path",
        ),
        (
            "radius:\n  clients:\n    - name: a\n      address: 10.0.0.1\n      secret: 0123456789abcdef\n"
            "      mode: eap\n",
            "conf.yaml:6: radius.clients: client a: mode: 'eap' is not allowed",
        ),
        (
            "radius:\n  clients:\n    - name: a\n      address: 10.0.0.1\n      secret: 0123456789abcdef\n"
            "      reply: {Framed-IP-Address: 1.2.3.4}\n",
            "conf.yaml:6: radius.clients: client a: reply attribute 'Framed-IP-Address' is not supported",
        ),
        (
            "radius:\n  clients:\n    - {name: a, address: 10.0.0.1, secret: 0123456789abcdef}\n"
            "    - {name: a, address: 10.0.0.2, secret: 0123456789abcdef}\n",
            "conf.yaml:4: radius.clients: client name a is used twice",
        ),
        (
            "radius:\n  first_factor: none\n  clients:\n    - {name: a, address: 10.0.0.1, secret: 0123456789abcdef}\n",
            "conf.yaml: radius.clients: client a has mode challenge but radius.first_factor is none",
        ),
    ],
)
def test_errors_name_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(text)
    assert message in str(err.value)
    assert "allowed" in str(err.value)
