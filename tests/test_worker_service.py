"""The gpu worker as a service: what clients get through it equals the embedded mode, concurrency, cancels,
disconnects, bad requests and a graceful stop, against the real `expertflow worker` process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from conftest import prompt_ids
from expertflow.engine import Engine
from expertflow.loader import LoadOptions, load
from expertflow.requests import SamplingParams
from expertflow.services.client import InferenceClient, InferenceError
from expertflow.services.common import wait_for_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "expertflow.cli", "worker", "--model", str(model_dir), "--listen", address,
               "--policy", "lru", "--expert-budget", "25%", "--metrics-port", "0", *flags]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_server(address, timeout_s=60)
    except TimeoutError:
        process.kill()
        raise AssertionError(f"the worker did not start: {process.stderr.read()}") from None
    return process, address


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(60)


@pytest.fixture(scope="module")
def worker(tiny_models):
    process, address = start_worker(tiny_models["mixtral"][0], "--rows", "4", "--max-batch", "4")
    yield address
    assert stop(process) == 0


def embedded(model_dir, prompt, max_new):
    loaded = load(model_dir, LoadOptions(expert_budget="25%", policy="lru"))
    out = Engine(loaded).generate([prompt], SamplingParams(max_new_tokens=max_new, stop_on_eos=False))
    loaded.close()
    return out.outputs[0].token_ids


def test_single_and_concurrent_requests_equal_the_embedded_mode(worker, tiny_models):
    directory = tiny_models["mixtral"][0]
    prompts = [prompt_ids(200 + i, 5 + 2 * i) for i in range(8)]
    expected = [embedded(directory, p, 10) for p in prompts]
    with InferenceClient(worker, timeout_s=120) as client:
        info = client.model_info()
        assert info.family == "mixtral" and info.policy == "lru" and not info.has_tokenizer
        one = client.complete(prompts[0], max_new_tokens=10, ignore_eos=True)
        assert one.token_ids == expected[0] and one.finish_reason == "length"
        assert (one.prompt_tokens, one.completion_tokens) == (len(prompts[0]), 10)
        results: dict[int, list[int]] = {}

        def ask(i: int) -> None:
            results[i] = client.complete(prompts[i], max_new_tokens=10, ignore_eos=True).token_ids

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]  # 8 requests, 4 rows
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [results[i] for i in range(8)] == expected


def test_cancel_and_disconnect_free_the_row(worker):
    with InferenceClient(worker, timeout_s=120) as client:
        stream = client.stream(prompt_ids(210, 6), max_new_tokens=200, ignore_eos=True, request_id="long-1")
        next(stream)
        assert client.cancel("long-1")
        last = list(stream)[-1]
        assert last.finish_reason == "cancelled"
        assert not client.cancel("nobody")
        # four clients walk away mid-stream; their rows must serve the next requests
        for i in range(4):
            gone = client.stream(prompt_ids(220 + i, 6), max_new_tokens=200, ignore_eos=True)
            next(gone)
            gone.close()
        t0 = time.monotonic()
        done = client.complete(prompt_ids(230, 6), max_new_tokens=5, ignore_eos=True)
        assert done.finish_reason == "length" and time.monotonic() - t0 < 60


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt=[5, 6], max_new_tokens=10**6), "over this server's"),
        (dict(prompt=[5, 6], temperature=-1.0), "temperature"),
        (dict(prompt=[10**6]), "outside the vocabulary"),
        (dict(prompt=list(range(3, 96)) * 30), "context holds"),
        (dict(prompt="text without a tokenizer"), "no tokenizer"),
    ],
)
def test_bad_requests_get_invalid_argument(worker, request_kwargs, message):
    with InferenceClient(worker, timeout_s=60) as client:
        prompt = request_kwargs.pop("prompt")
        with pytest.raises(InferenceError, match=message) as caught:
            client.complete(prompt, **request_kwargs)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_sigterm_lets_requests_in_flight_finish(tiny_models):
    process, address = start_worker(tiny_models["mixtral"][0])
    with InferenceClient(address, timeout_s=120) as client:
        stream = client.stream(prompt_ids(240, 6), max_new_tokens=40, ignore_eos=True)
        first = next(stream)
        process.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].finish_reason == "length"
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 40
        with pytest.raises(InferenceError) as refused:
            client.complete([5, 6, 7], max_new_tokens=2)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert process.wait(60) == 0
