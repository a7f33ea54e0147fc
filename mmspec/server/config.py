"""The server's settings (``ServerConfig``) and their defaults: what ``build_app`` serves and how strictly.
``mmspec serve``'s flags map onto it by keyword; with ``--replicas`` the same config travels to every replica
(image limits) and to the ingress (everything else)."""

from __future__ import annotations

from dataclasses import dataclass

from mmspec.errors import MMSpecError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 16 * 2**20
MAX_IMAGE_BYTES = 10 * 2**20
REMOTE_TIMEOUT_S = 10.0
MAX_IMAGES = 8                    # images one request may hold (the target's context may allow fewer)
DRAIN_S = 30.0                    # on SIGTERM / Ctrl-C: how long requests in flight get to finish


def _positive(name: str, value, integer: bool, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        what = "a positive integer" if integer else "a positive number"
        raise MMSpecError(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    """``model_id``: the id clients name (None: the pipeline's, see ``served_model_id``). ``api_key``: ``/v1/*``
    and ``/metrics`` need ``Authorization: Bearer <key>`` (``/health`` never does; ``metrics_public`` opens
    ``/metrics``). ``max_waiting``: requests beyond the rows of the batch(es) that may wait; more get 503 with
    ``Retry-After`` (None: no bound). ``request_timeout_s``: a request running longer is ended and its row freed.
    ``max_images``: image parts one request may hold, across its turns (more: 400 ``too_many_images``).
    """

    model_id: str | None = None
    api_key: str | None = None
    allow_remote_images: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    max_image_bytes: int = MAX_IMAGE_BYTES
    remote_timeout_s: float = REMOTE_TIMEOUT_S
    max_waiting: int | None = None
    request_timeout_s: float | None = None
    metrics_public: bool = False
    max_images: int = MAX_IMAGES

    def __post_init__(self):
        if self.model_id is not None and (not isinstance(self.model_id, str) or not self.model_id.strip()):
            raise MMSpecError("the served model id must be a non-empty string")
        _positive("max_body_bytes", self.max_body_bytes, integer=True)
        _positive("max_image_bytes", self.max_image_bytes, integer=True)
        _positive("max_images", self.max_images, integer=True)
        _positive("remote_timeout_s", self.remote_timeout_s, integer=False)
        _positive("request_timeout_s", self.request_timeout_s, integer=False, allow_none=True)
        if self.max_waiting is not None and (isinstance(self.max_waiting, bool) or not isinstance(self.max_waiting, int)
                                             or self.max_waiting < 0):
            raise MMSpecError(f"max_waiting must be a non-negative integer or None, got {self.max_waiting!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise MMSpecError("api_key must be a non-empty string or None")
