"""A stand-in for pam_python's handle, for the paths no real client on these machines can drive
(a login signed by a security key needs an sk-capable client and an authenticator)."""

from __future__ import annotations

from typing import Any


class FakePamHandle:
    """pam_python's handle, for the one path no real client here can drive: an SSH login signed by a
    security key needs an sk-capable client and authenticator, and this machine has neither."""

    PAM_SUCCESS, PAM_AUTH_ERR, PAM_IGNORE = 0, 7, 25
    PAM_PROMPT_ECHO_OFF, PAM_ERROR_MSG, PAM_TEXT_INFO = 1, 3, 4

    class Message:
        def __init__(self, style: int, text: str) -> None:
            self.msg_style, self.msg = style, text

    def __init__(self, user: str, env: dict[str, str], answers: list[str]) -> None:
        self.service, self.rhost, self.tty, self.ruser = "sshd-test", "127.0.0.1", None, None
        self.env = dict(env)
        self.user = user
        self.answers = list(answers)
        self.prompts: list[str] = []

    def get_user(self, prompt: Any) -> str:
        return self.user

    def conversation(self, message: Any) -> Any:
        self.prompts.append(message.msg)
        answer = self.answers.pop(0) if message.msg_style == self.PAM_PROMPT_ECHO_OFF and self.answers else None

        class Response:
            resp = answer

        return Response()
