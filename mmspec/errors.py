"""The project's one error type: every bad input a user can give ends in an ``MMSpecError``."""


class MMSpecError(ValueError):
    """A request or configuration mmspec refuses, with a message that says what to change."""
