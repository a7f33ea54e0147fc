"""An OpenAI-compatible HTTP server on the batched engine: ``mmspec serve [--host 127.0.0.1] [--port 8000]``.

Endpoints: ``POST /v1/chat/completions`` (OpenAI's chat format with one image per request, as a ``data:`` URL;
``http(s)`` URLs only with ``--allow-remote-images``; ``stream: true`` as server-sent events ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}`` and ``GET /health``.

Every request becomes one ``pipe.submit(...)`` on the pipeline's shared engine, so concurrent clients share
one continuous batch; the answer is the text ``pipe.generate`` gives for the same image and prompt (greedy:
the target's own output). The prompt is the whole conversation (system, user and assistant turns) rendered
with the target's chat template, the image where its ``image_url`` part is. A client that goes away, or an
answer that reaches a ``stop`` string, frees its row at the next round (``job.cancelled``).

Bad input gets OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
and never stops the server. Safe by default: binds 127.0.0.1, and ``--api-key`` (or ``MMSPEC_API_KEY``)
makes every request need ``Authorization: Bearer <key>``.

``mmspec serve --load-test`` (also ``python -m mmspec.server --load-test``) measures throughput and latency
percentiles at 1, 4 and 16 concurrent clients on loopback, drafting on and off, and prints a markdown table.

Modules: ``protocol`` (request validation, the error object, stop strings), ``images`` (data: and http(s)
image URLs), ``app`` (the FastAPI app and its handlers), ``loadtest`` (``RunningServer`` and the load test),
``cli`` (the flags and ``run``). Heavy imports (torch, transformers, fastapi, uvicorn) happen inside functions,
so ``mmspec serve --help`` stays fast.
"""

from mmspec.server.app import (BUNDLED_MODEL_ID, DEFAULT_HOST, DEFAULT_PORT, ServerConfig, ServerState, build_app,
                               served_model_id)
from mmspec.server.cli import API_KEY_ENV, add_arguments, resolve_api_key, run
from mmspec.server.images import data_url
from mmspec.server.loadtest import RunningServer, load_test
from mmspec.server.protocol import APIError, AnswerText, ChatRequest, parse_chat_request

__all__ = ["API_KEY_ENV", "APIError", "AnswerText", "BUNDLED_MODEL_ID", "ChatRequest", "DEFAULT_HOST",
           "DEFAULT_PORT", "RunningServer", "ServerConfig", "ServerState", "add_arguments", "build_app", "data_url",
           "load_test", "parse_chat_request", "resolve_api_key", "run", "served_model_id"]
