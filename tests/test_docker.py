"""The images and compose.yaml for real, with a Docker engine: docker/build.sh builds the images (cached after the
first time), compose brings the stack up, it answers through gRPC and the OpenAI client and comes down; and the
images one by one under testcontainers: Redis answers PING/SET/GET, the worker image generates what the embedded
mode generates.

Marked `docker` (minutes the first time: `-m "not docker"` leaves them out); skipped only when no Docker engine
answers. .ci/run starts one. EXPERTFLOW_COMPOSE picks the Compose to run ("docker compose" or
"docker-compose"; default: v2 where installed, else v1).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from compose_stack import COMPOSE_FILE, REPO, free_port, load_compose
from expertflow.services.client import InferenceClient
from expertflow.services.common import wait_for_server
from expertflow.services.config import ServicesConfig

pytestmark = pytest.mark.docker

PROMPT = "def read_config(path):"


def engine_problem() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker command"
    done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"no Docker engine answers: {done.stderr.strip()[:300]}"


@pytest.fixture(scope="session")
def images() -> tuple[str, str]:
    """docker/build.sh's images (services, redis), built (or found in Docker's cache) once per session; their
    names as build.sh and compose.yaml read them."""
    problem = engine_problem()
    if problem is not None:
        pytest.skip(problem)
    done = subprocess.run(["bash", str(REPO / "docker/build.sh")], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, f"docker/build.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return (os.environ.get("EXPERTFLOW_IMAGE", "expertflow:latest"),
            os.environ.get("EXPERTFLOW_REDIS_IMAGE", "expertflow-redis:latest"))  # fmt: skip


def compose_command() -> list[str]:
    chosen = os.environ.get("EXPERTFLOW_COMPOSE")
    if chosen:
        return shlex.split(chosen)
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no Compose: install docker-compose (v1.29) or the Compose v2 plugin")


def embedded_ids(prompt: str, max_new: int) -> list[int]:
    """The token ids the embedded default model generates for `prompt`, greedily, in this process (any policy
    and budget gives the same ids)."""
    from expertflow.default_model import default_model_dir
    from expertflow.engine import Engine
    from expertflow.loader import LoadOptions, load
    from expertflow.requests import SamplingParams
    from expertflow.tokenizer import TextCodec

    ids = TextCodec(default_model_dir()).encode(prompt)
    loaded = load(default_model_dir(), LoadOptions(device="cpu", policy="lru"))
    try:
        out = Engine(loaded).generate([ids], SamplingParams(max_new_tokens=max_new, stop_on_eos=False))
    finally:
        loaded.close()
    return out.outputs[0].token_ids


class Compose:
    """One compose project: its own name, ports and config, always brought down."""

    def __init__(self, env: dict[str, str], overrides: tuple[Path, ...] = ()) -> None:
        self.command = compose_command()
        self.project = f"expertflow-test-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, **env}
        self.files = [a for f in (COMPOSE_FILE, *overrides) for a in ("-f", str(f))]

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        full = [*self.command, "-p", self.project, *self.files, *args]
        done = subprocess.run(full, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(full)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done

    def wait_healthy(self, services: list[str], timeout_s: float = 420) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(services)
        while pending:
            for service in list(pending):
                ids = self.run("ps", "-q", service).stdout.split()
                if not ids:
                    continue
                state = json.loads(subprocess.run(["docker", "inspect", "--format", "{{json .State}}", ids[0]],
                                                  capture_output=True, text=True, check=True).stdout)  # fmt: skip
                if state.get("Health", {}).get("Status") == "healthy":
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"not healthy after {timeout_s:.0f} s: {pending}\n{self.logs()}")
            time.sleep(2)

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "60", check=False).stdout[-8000:]


@contextmanager
def brought_up(images: tuple[str, str], *up_args: str) -> Iterator[tuple[Compose, int, int]]:
    """`up -d` on free ports: (the project, the worker's port, the API's); its logs printed if the block fails,
    brought down (volumes too) after it, always."""
    worker_port, api_port = free_port(), free_port()
    env = {"EXPERTFLOW_IMAGE": images[0], "EXPERTFLOW_REDIS_IMAGE": images[1],
           "EXPERTFLOW_WORKER_PORT": str(worker_port), "EXPERTFLOW_API_PORT": str(api_port)}  # fmt: skip
    stack = Compose(env)
    try:
        stack.run("up", "-d", *up_args)
        yield stack, worker_port, api_port
    except BaseException:
        print(stack.logs())
        raise
    finally:
        down = stack.run("down", "-v", "--timeout", "60", check=False)
    assert down.returncode == 0, down.stderr


def test_compose_stack_scaled_out_answers_through_grpc_and_http(images, tmp_path):
    """`up --scale expert-store=3`, the whole stack: every service healthy; three store nodes register in compose's
    redis, each expert on two of them; the worker generates what this checkout generates (its experts from its own
    node's shared memory and the others' over gRPC), through gRPC and the OpenAI-compatible HTTP API; every
    service's Prometheus endpoint answers on the compose network. One bring-up for all of it: each costs a minute."""
    services = load_compose()
    with brought_up(images, "--scale", "expert-store=3") as (stack, worker_port, api_port):
        stack.wait_healthy(list(services))
        assert stack.run("exec", "-T", "redis", "redis-cli", "ping").stdout.strip() == "PONG"
        assert len(stack.run("ps", "-q", "expert-store").stdout.split()) == 3

        read = ("import json; from expertflow.services.redis_directory import RedisDirectory as R; "
                "d = R.from_url('redis://redis:6379'); s = d.snapshot(d.current()); "
                "print(json.dumps({n: len(s.held_by(n)) for n in s.nodes}))")  # fmt: skip

        def held() -> dict[str, int]:
            return json.loads(stack.run("exec", "-T", "gpu-worker", "python", "-c", read).stdout)

        # rendezvous placement, 2 copies: each node about 2/3 of the model's 4 x 8 experts, once placement settled
        deadline = time.monotonic() + 90
        while (per_node := held()) and not (len(per_node) == 3 and sum(per_node.values()) == 2 * 32):
            assert time.monotonic() < deadline, per_node
            time.sleep(2)
        assert all(n > 0 for n in per_node.values()), per_node

        with InferenceClient(f"127.0.0.1:{worker_port}", timeout_s=120) as client:
            info = client.model_info()
            direct = client.complete(PROMPT, max_new_tokens=16)
        assert info.family == "mixtral" and direct.completion_tokens == 16
        assert direct.token_ids == embedded_ids(PROMPT, 16)  # the containers compute what this checkout computes
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0)
        done = http.completions.create(model="expertflow-coarse-8x2", prompt=PROMPT, max_tokens=16)
        assert done.choices[0].text == direct.text
        # every service's Prometheus endpoint answers on the compose network ([metrics] host in the config), and
        # the worker's experts came from the store nodes
        scrape = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
        ports = ServicesConfig.load(services["gpu-worker"].config_file).metrics
        for service, port in [("gpu-worker", ports.worker), ("expert-store", ports.expert_store),
                              ("predictor", ports.predictor), ("orchestrator", ports.orchestrator), ("api", ports.api)]:
            text = stack.run("exec", "-T", "api", "python", "-c", scrape, f"http://{service}:{port}/metrics").stdout
            assert "# TYPE" in text, service
            if service == "gpu-worker":
                moved = [float(line.split()[-1]) for line in text.splitlines()
                         if line.startswith("expertflow_expert_bytes_total{")]  # fmt: skip
                assert sum(moved) > 0, text


@pytest.fixture
def testcontainers_without_reaper():
    """testcontainers without its Ryuk reaper container: that image comes from a registry, and each test stops
    its own containers anyway."""
    from testcontainers.core.config import testcontainers_config

    before = testcontainers_config.ryuk_disabled
    testcontainers_config.ryuk_disabled = True
    yield
    testcontainers_config.ryuk_disabled = before


def test_redis_image_under_testcontainers(images, testcontainers_without_reaper):
    import redis
    from testcontainers.core.container import DockerContainer

    with DockerContainer(images[1]).with_exposed_ports(6379) as container:
        client = redis.Redis(host=container.get_container_host_ip(), port=int(container.get_exposed_port(6379)))
        deadline = time.monotonic() + 60
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, container.get_logs()
                time.sleep(0.2)
        assert client.set("expertflow:test", "worker-1")
        assert client.get("expertflow:test") == b"worker-1"
        client.close()


def test_worker_image_generates_under_testcontainers(images, testcontainers_without_reaper):
    from testcontainers.core.container import DockerContainer

    command = "expertflow worker --listen 0.0.0.0:50051 --allow-insecure --policy lru --metrics-port 0"
    with DockerContainer(images[0]).with_command(command).with_exposed_ports(50051) as container:
        address = f"{container.get_container_host_ip()}:{container.get_exposed_port(50051)}"
        try:
            wait_for_server(address, timeout_s=180)
        except TimeoutError:
            raise AssertionError(f"the worker did not come up:\n{container.get_logs()}") from None
        with InferenceClient(address, timeout_s=120) as client:
            done = client.complete(PROMPT, max_new_tokens=12)
    assert done.finish_reason == "length" and done.completion_tokens == 12
    assert done.token_ids == embedded_ids(PROMPT, 12)
