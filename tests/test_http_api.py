"""The OpenAI-compatible endpoint, checked with the official `openai` client against real `expertflow worker`
and `expertflow api` processes serving the embedded default model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from expertflow.services.client import InferenceClient
from expertflow.services.common import wait_for_server
from test_worker_service import free_port


@pytest.fixture(scope="module")
def endpoint():
    worker = f"127.0.0.1:{free_port()}"
    http = f"127.0.0.1:{free_port()}"
    metrics = free_port()
    py = [sys.executable, "-m", "expertflow.cli"]
    processes = [  # the default policy, expertflow, with the default model's shipped predictor
        subprocess.Popen(py + ["worker", "--listen", worker, "--metrics-port", str(metrics)]),
    ]
    wait_for_server(worker, timeout_s=90)
    processes.append(subprocess.Popen(py + ["api", "--listen", http, "--worker", worker, "--metrics-port", "0"]))
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://{http}/health", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    yield worker, http, metrics
    for p in reversed(processes):
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0


def test_completions_and_chat_through_the_openai_client(endpoint):
    worker, http, _ = endpoint
    client = openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["expertflow-coarse-8x2"]
    done = client.completions.create(model="expertflow-coarse-8x2", prompt="def main():", max_tokens=16)
    with InferenceClient(worker) as grpc_client:
        direct = grpc_client.complete("def main():", max_new_tokens=16)
    assert done.choices[0].text == direct.text and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 16 and done.usage.prompt_tokens == direct.prompt_tokens
    streamed = client.completions.create(
        model="expertflow-coarse-8x2", prompt="def main():", max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.text
    assert chunks[-1].usage.completion_tokens == 16
    chat = client.chat.completions.create(
        model="expertflow-coarse-8x2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, seed=3,
        temperature=0.7,
    )  # fmt: skip
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    pieces = client.chat.completions.create(
        model="expertflow-coarse-8x2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, seed=3,
        temperature=0.7, stream=True,
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == chat.choices[0].message.content  # same seed, same text, streamed or not
    stopped = client.completions.create(model="x", prompt="def main():", max_tokens=16, stop=["\n"])
    assert "\n" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_bad_requests_get_400_with_the_parameter_named(endpoint):
    _, http, _ = endpoint
    client = openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="x", prompt="hi", max_tokens=4, logprobs=2)
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.completions.create(model="x", prompt="hi", max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="over this server's"):
        client.completions.create(model="x", prompt="hi", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=-2)
    request = urllib.request.Request(f"http://{http}/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400 and "not JSON" in json.loads(caught.value.read())["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{http}/v2/nothing", timeout=30)
    assert caught.value.code == 404


def test_the_worker_reports_its_serving_metrics(endpoint):
    worker, _, metrics = endpoint
    with InferenceClient(worker) as client:
        client.complete("import os", max_new_tokens=8)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("expertflow_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in (
        'expertflow_expert_lookups_total{outcome="hit"}',
        'expertflow_expert_bytes_total{tier="host"}',
        "expertflow_stall_seconds_total",
        "expertflow_prediction_recall",
        "expertflow_queue_depth",
        "expertflow_step_requests_count",
        "expertflow_time_to_first_token_seconds_count",
        "expertflow_inter_token_seconds_count",
        'expertflow_requests_total{outcome="length"}',
    ):
        assert name in values, name
    assert values['expertflow_requests_total{outcome="length"}'] >= 1
    assert 0 < values["expertflow_prediction_recall"] <= 1
    assert values["expertflow_time_to_first_token_seconds_count"] >= 1
