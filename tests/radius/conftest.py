"""Fixtures for the mfa-radiusd system tests (helpers and their documentation: radius_helpers.py)."""

from radius_helpers import pam_user, renv, udp  # noqa: F401
