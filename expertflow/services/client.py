"""The Python client of the inference API: stream a generation, or wait for it whole.

    with InferenceClient("127.0.0.1:50051") as client:
        for piece in client.stream("def main():", max_new_tokens=32):
            print(piece.text, end="", flush=True)
        done = client.complete([1, 415, 2936], max_new_tokens=8)     # token ids in, Completion out

Errors come back as `InferenceError` with the server's status and message (INVALID_ARGUMENT for a bad request,
UNAVAILABLE when no worker answers, UNAUTHENTICATED without the worker's token). `security` (security.py) gives
the TLS and token a secured worker wants.

Not for: serving (worker.py) or HTTP (http_api.py speaks OpenAI's protocol and uses this client).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from expertflow.services.security import Security, open_channel
from expertflow.v1 import inference_pb2, inference_pb2_grpc


class InferenceError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pieces: list[inference_pb2.GenerateResponse] = field(default_factory=list, repr=False)


class InferenceClient:
    def __init__(self, address: str, timeout_s: float | None = None, security: Security | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.security = security or Security()
        self._channel = open_channel(address, self.security)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @staticmethod
    def request(
        prompt: str | Sequence[int],
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        request_id: str = "",
    ) -> inference_pb2.GenerateRequest:
        sampling = inference_pb2.SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
            stop_token_ids=list(stop_token_ids),
            ignore_eos=ignore_eos,
        )
        if isinstance(prompt, str):
            return inference_pb2.GenerateRequest(request_id=request_id, text=prompt, sampling=sampling)
        ids = inference_pb2.TokenIds(ids=[int(t) for t in prompt])
        return inference_pb2.GenerateRequest(request_id=request_id, token_ids=ids, sampling=sampling)

    def stream(self, prompt: str | Sequence[int], **sampling) -> Iterator[inference_pb2.GenerateResponse]:
        """The responses as they come: new tokens and their text; the last one has finish_reason and usage."""
        calls = self._stub.Generate(self.request(prompt, **sampling), timeout=self.timeout_s)
        try:
            yield from calls
        except grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            calls.cancel()  # a consumer that stops early frees the server's slot

    def complete(self, prompt: str | Sequence[int], **sampling) -> Completion:
        pieces = list(self.stream(prompt, **sampling))
        last = pieces[-1]
        return Completion(
            request_id=last.request_id,
            text="".join(p.text for p in pieces),
            token_ids=[t for p in pieces for t in p.token_ids],
            finish_reason=last.finish_reason,
            prompt_tokens=last.usage.prompt_tokens,
            completion_tokens=last.usage.completion_tokens,
            pieces=pieces,
        )

    def cancel(self, request_id: str) -> bool:
        try:
            return self._stub.Cancel(inference_pb2.CancelRequest(request_id=request_id), timeout=10).found
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> InferenceError:
        return InferenceError(e.code(), f"{e.details()}{self.security.hint(e)}")

    def model_info(self) -> inference_pb2.ModelInfo:
        try:
            return self._stub.GetModelInfo(inference_pb2.ModelInfoRequest(), timeout=self.timeout_s or 30)
        except grpc.RpcError as e:
            raise self._error(e) from None
