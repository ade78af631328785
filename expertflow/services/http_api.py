"""The OpenAI-compatible HTTP endpoint, in front of a worker's inference API.

    GET  /v1/models             the worker's model
    POST /v1/completions        prompt (a string, or token ids) -> text; "stream": true for server-sent events
    POST /v1/chat/completions   messages -> the model's chat template (where its tokenizer config has one;
                                otherwise "role: content" lines and "assistant:") -> text, streamed the same way
    GET  /health                200 once the worker answers

Fields: model, prompt / messages, max_tokens (or max_completion_tokens), temperature, top_p, seed, stop (a string
or a list), stream, n (1 only), user (ignored), stream_options.include_usage. Any other field, or a value the
server cannot honour, is a 400 with OpenAI's error shape naming the parameter; errors the worker reports keep
their meaning (400 for a bad request, 503 when no worker answers, 429 when its queue is full). A client that
disconnects mid-stream cancels its request.

Security ([security], security.py): with a token, every route but /health wants `Authorization: Bearer <token>`
(an OpenAI client's api_key is exactly that) and answers 401 with OpenAI's error shape (code
"invalid_api_key") otherwise; with tls_cert, the endpoint is HTTPS only (the stdlib ssl module, the same
certificate and client-certificate rule as the gRPC services); the gRPC client to the worker uses the same
section.

Not for: generation (the worker does it, through services/client.py) or gRPC clients (they call the worker).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from expertflow.services.client import InferenceClient, InferenceError
from expertflow.services.security import Security

_FIELDS_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
                  "n", "user", "stream_options"}  # fmt: skip
_FIELDS = {"/v1/completions": _FIELDS_COMMON | {"prompt"}, "/v1/chat/completions": _FIELDS_COMMON | {"messages"}}
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
}
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ChatTemplate:
    """messages -> prompt text: the checkpoint's chat template where it has one (transformers renders it)."""

    def __init__(self, model_dir: Path | None) -> None:
        self._tokenizer = None
        config = model_dir / "tokenizer_config.json" if model_dir is not None else None
        if config is not None and config.exists() and "chat_template" in config.read_text():
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._tokenizer is not None:
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def parse_request(path: str, body: dict[str, Any], max_tokens_default: int) -> tuple[str | list[int], dict[str, Any]]:
    """(the prompt, the client's generation arguments) from an OpenAI request body; BadRequest otherwise."""
    unknown = sorted(set(body) - _FIELDS[path])
    if unknown:
        raise BadRequest(f"unsupported parameter(s): {', '.join(unknown)}", unknown[0])
    if body.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", max_tokens_default))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest(f"max_tokens must be a positive integer, not {max_tokens!r}", "max_tokens")
    args: dict[str, Any] = {"max_new_tokens": max_tokens}
    for name, key in (("temperature", "temperature"), ("top_p", "top_p")):
        if name in body:
            value = body[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BadRequest(f"{name} must be a number", name)
            args[key] = float(value)
    if "seed" in body:
        if not isinstance(body["seed"], int) or body["seed"] < 0:
            raise BadRequest("seed must be a non-negative integer", "seed")
        args["seed"] = body["seed"]
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
            raise BadRequest("stop must be a string or a list of at most 4 strings", "stop")
        args["stop"] = stops
    if path == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt, args
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string or a list of token ids (one prompt per request)", "prompt")
        return prompt, args
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRequest("each message needs a string role and string content", "messages")
    return messages, args


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, log: logging.Logger) -> None:
        super().__init__(address, handler)
        self.log = log

    def handle_error(self, request, client_address) -> None:
        """A connection that failed before a request (a TLS handshake refused, a client gone): one debug line,
        not socketserver's traceback on stderr."""
        self.log.debug("connection failed", extra={"client": client_address[0], "why": repr(sys.exc_info()[1])})


class ApiServer:
    """Serves the endpoint on `listen` until `stop()`; one InferenceClient to the worker for all requests;
    `security` as the module says (None: plain HTTP, no token, loopback only)."""

    def __init__(
        self,
        listen: str,
        worker: str,
        model_dir: Path | None,
        registry: CollectorRegistry,
        log: logging.Logger,
        max_tokens_default: int = 256,
        security: Security | None = None,
    ) -> None:
        self.security = security or Security()
        self.security.check_listen(listen, "[api] listen")
        self.client = InferenceClient(worker, timeout_s=600, security=self.security)
        self.template = ChatTemplate(model_dir)
        self.log, self.max_tokens_default = log, max_tokens_default
        self._model_name: str | None = None
        self.requests = Counter("expertflow_http_requests", "HTTP requests", ["route", "status"], registry=registry)
        self.latency = Histogram("expertflow_http_seconds", "HTTP request time", ["route"], registry=registry)
        host, port = listen.rsplit(":", 1)
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args) -> None:  # access log as structured lines
                api.log.debug("http", extra={"request": self.requestline, "status": args[1] if len(args) > 1 else ""})

            def do_GET(self) -> None:
                api.handle(self, "GET")

            def do_POST(self) -> None:
                api.handle(self, "POST")

        self.httpd = _Server((host, int(port)), Handler, log)
        context = self.security.http_context()
        if context is not None:
            # the handshake happens in the request's thread, at its first read: a slow or hostile client cannot
            # hold up the accepting thread
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.scheme = "https" if context is not None else "http"
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self.client.close()

    # -- routing ----------------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        route = h.path.split("?", 1)[0]
        t0 = time.perf_counter()
        status = HTTPStatus.OK
        try:
            problem = None if route == "/health" else self.security.bearer_problem(h.headers.get("Authorization"))
            if problem is not None:  # before the body is read: the connection closes after the answer
                status = HTTPStatus.UNAUTHORIZED
                h.close_connection = True
                self._error(h, status, problem, "invalid_request_error", code="invalid_api_key")
            elif method == "GET" and route == "/v1/models":
                self._json(h, {"object": "list", "data": [self._model_card()]})
            elif method == "GET" and route == "/health":
                self.client.model_info()
                self._json(h, {"status": "ok"})
            elif method == "POST" and route in _FIELDS:
                self._generate(h, route)
            else:
                status = HTTPStatus.NOT_FOUND
                self._error(h, status, f"no route {method} {route}", "invalid_request_error")
        except BadRequest as e:
            status = HTTPStatus.BAD_REQUEST
            self._error(h, status, str(e), "invalid_request_error", e.param)
        except InferenceError as e:
            status = _STATUS.get(e.code, HTTPStatus.INTERNAL_SERVER_ERROR)
            kind = "invalid_request_error" if status == HTTPStatus.BAD_REQUEST else "server_error"
            self._error(h, status, e.message, kind)
        except (BrokenPipeError, ConnectionResetError):
            status = HTTPStatus.REQUEST_TIMEOUT  # the client left; nothing to answer
        finally:
            self.requests.labels(route if route in _FIELDS or route in ("/v1/models", "/health") else "other",
                                 str(int(status))).inc()  # fmt: skip
            self.latency.labels(route).observe(time.perf_counter() - t0)

    def _model_card(self) -> dict[str, Any]:
        if self._model_name is None:
            info = self.client.model_info()
            self._model_name = Path(info.model).name or info.model
        return {"id": self._model_name, "object": "model", "created": 0, "owned_by": "expertflow"}

    # -- generation -------------------------------------------------------------------------------------
    def _generate(self, h: BaseHTTPRequestHandler, route: str) -> None:
        body = self._body(h)
        prompt, args = parse_request(route, body, self.max_tokens_default)
        chat = route == "/v1/chat/completions"
        if chat:
            prompt = self.template.render(prompt)
        model = body.get("model") or self._model_card()["id"]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(h, prompt, args, rid, model, created, chat, usage)
            return
        done = self.client.complete(prompt, request_id=rid, **args)
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}  # fmt: skip
        finish = _FINISH.get(done.finish_reason, done.finish_reason)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": finish}
            self._json(h, {"id": rid, "object": "chat.completion", "created": created, "model": model,
                           "choices": [choice], "usage": usage})  # fmt: skip
        else:
            choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": finish}
            self._json(h, {"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [choice], "usage": usage})  # fmt: skip

    def _stream(self, h, prompt, args, rid, model, created, chat: bool, include_usage: bool) -> None:
        kind = "chat.completion.chunk" if chat else "text_completion"
        pieces = self.client.stream(prompt, request_id=rid, **args)
        first = next(pieces)  # a bad request fails here, before any byte of the 200 goes out
        h.send_response(HTTPStatus.OK)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True

        def event(data: dict[str, Any] | str) -> None:
            h.wfile.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())
            h.wfile.flush()

        if chat:
            event({"id": rid, "object": kind, "created": created, "model": model,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})  # fmt: skip
        try:
            piece = first
            while True:
                finish = _FINISH.get(piece.finish_reason, piece.finish_reason) or None
                if piece.text or finish:
                    choice = {"index": 0, "finish_reason": finish}
                    choice.update({"delta": {"content": piece.text}} if chat else {"text": piece.text, "logprobs": None})
                    event({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]})
                if finish:
                    if include_usage:
                        used = piece.usage
                        event({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                               "usage": {"prompt_tokens": used.prompt_tokens, "completion_tokens": used.completion_tokens,
                                         "total_tokens": used.prompt_tokens + used.completion_tokens}})  # fmt: skip
                    break
                piece = next(pieces)
            event("[DONE]")
        finally:
            pieces.close()  # a client that left cancels its request at the worker

    # -- plumbing ---------------------------------------------------------------------------------------
    @staticmethod
    def _body(h: BaseHTTPRequestHandler) -> dict[str, Any]:
        try:
            length = int(h.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if length <= 0 or length > 16 << 20:
            raise BadRequest("the request needs a JSON body of at most 16 MiB")
        try:
            body = json.loads(h.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    @staticmethod
    def _json(
        h: BaseHTTPRequestHandler,
        data: dict[str, Any],
        status: HTTPStatus = HTTPStatus.OK,
        headers: dict[str, str] | None = None,
    ) -> None:
        payload = json.dumps(data).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(payload)

    def _error(
        self, h, status: HTTPStatus, message: str, kind: str, param: str | None = None, code: str | None = None
    ) -> None:
        error = {"message": message, "type": kind, "param": param, "code": code}
        headers = {"WWW-Authenticate": "Bearer", "Connection": "close"} if status == HTTPStatus.UNAUTHORIZED else {}
        self._json(h, {"error": error}, status, headers)
