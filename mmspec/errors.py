"""The project's one error type: every bad input a user can give ends in an ``MMSpecError``."""

from __future__ import annotations


class MMSpecError(ValueError):
    """A request or configuration mmspec refuses, with a message that says what to change.

    ``code`` classifies the refusal for callers that map errors onto a protocol (the server's OpenAI error
    object, the captioner's log): ``"context_length_exceeded"``, ``"invalid_image"``, ``"invalid_value"``,
    ... ``param`` names the setting at fault in the Python API's terms (``"max_new_tokens"``), so a CLI or a
    server can say it in its own terms (``--max-new-tokens``, the request's ``max_tokens``) without editing
    the message text.
    """

    def __init__(self, message: str = "", *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param

    @property
    def message(self) -> str:
        return str(self)
