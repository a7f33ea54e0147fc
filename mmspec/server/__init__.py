"""An OpenAI-compatible HTTP server on the batched engine: ``mmspec serve [--host 127.0.0.1] [--port 8000]``.

Endpoints: ``POST /v1/chat/completions`` (OpenAI's chat format with 0..``--max-images`` images across the user
turns, each as a ``data:`` URL, and video parts where the target takes video -- ``video_url`` of an animated image,
or ``video`` with one URL per frame, each frame counting as an image; ``http(s)`` URLs only with ``--allow-remote-images``; ``stream: true`` as server-sent events ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (liveness and readiness, open
without the API key) and ``GET /metrics`` (Prometheus: vLLM's ``spec_decode_*`` counters under ``mmspec:``,
requests by outcome, latency histograms, load gauges).

Every request becomes one ``pipe.submit(...)`` on the pipeline's shared engine, so concurrent clients share
one continuous batch; the answer is the text ``pipe.chat`` gives for the same conversation (greedy: the
target's own output). The prompt is the whole conversation (system, user and assistant turns) rendered with
the target's chat template, each image where its ``image_url`` part is. A client that goes away, an
answer that reaches a ``stop`` string, or one past ``--request-timeout`` frees its row at the next round.
``--max-waiting`` bounds the requests waiting for a row (more get 503 with ``Retry-After``).

Bad input gets OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
and never stops the server. Safe by default: binds 127.0.0.1, and ``--api-key`` (or ``MMSPEC_API_KEY``)
makes ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``.

``mmspec serve --replicas N`` runs N engine replicas (one model, one batch each; one GPU each on CUDA) behind
the same routes on Ray Serve, on a running cluster (``--ray-address`` / ``RAY_ADDRESS``) or a local one
(``replicas``). ``mmspec serve --load-test`` (also ``python -m mmspec.server --load-test``) measures throughput
and latency percentiles at 1, 4, 16 and 64 concurrent clients on loopback, drafting on and off, or over
``--load-replicas 1,2``, and prints a markdown table.

Modules: ``protocol`` (request validation, the error object, stop strings), ``images`` (data: and http(s)
image URLs), ``config`` (``ServerConfig``), ``backend`` (the engine side: a pipeline's answers as pieces),
``metrics`` (``/metrics``), ``app`` (the FastAPI app and its handlers), ``replicas`` (Ray Serve), ``loadtest``
(``RunningServer`` and the load test), ``cli`` (the flags and ``run``). Heavy imports (torch, transformers,
fastapi, uvicorn, prometheus_client, ray) happen inside functions, so ``mmspec serve --help`` stays fast; Ray
only with ``--replicas``.
"""

from mmspec.server.app import ServerState, backend_app, build_app
from mmspec.server.backend import BUNDLED_MODEL_ID, LocalBackend, served_model_id
from mmspec.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig
from mmspec.server.cli import API_KEY_ENV, add_arguments, resolve_api_key, run
from mmspec.server.images import data_url
from mmspec.server.loadtest import RunningServer, load_test
from mmspec.server.protocol import APIError, AnswerText, ChatRequest, parse_chat_request

__all__ = ["API_KEY_ENV", "APIError", "AnswerText", "BUNDLED_MODEL_ID", "ChatRequest", "DEFAULT_HOST",
           "DEFAULT_PORT", "LocalBackend", "RunningServer", "ServerConfig", "ServerState", "add_arguments",
           "backend_app", "build_app", "data_url", "load_test", "parse_chat_request", "resolve_api_key", "run",
           "served_model_id"]
