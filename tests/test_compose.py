"""compose.yaml cannot drift from the code: every ExpertFlow service it declares runs here as a plain local
process with exactly its command, environment and mounted config (docker/expertflow.toml, its container
addresses rewritten to free loopback ports; compose's redis, the expert store's directory, a redis-server here),
passes its own healthcheck, and the stack generates through gRPC and HTTP. No Docker needed; the redis image
runs in test_docker.py. The compose files must also be valid for
every Compose found here (docker-compose v1.29, Compose v2)."""

from __future__ import annotations

import shutil
import subprocess

import openai
import pytest

from compose_stack import COMPOSE_FILE, REPO, SECTIONS, LocalStack, available_subcommands, load_compose
from expertflow.services.client import InferenceClient
from expertflow.services.config import ServicesConfig

# The two stacks: every ExpertFlow service of compose.yaml, and the worker with the API alone (the worker then
# keeps its experts and plans in process); the first needs `expertflow expert-store`, `predictor` and
# `orchestrator`, which come from their own branches.
PROFILES = {"all": None, "worker+api": ("worker", "api")}


def compose_commands() -> list[list[str]]:
    """Each Compose implementation installed here: `docker compose` (v2 plugin), `docker-compose` (v1 or v2)."""
    found = []
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


@pytest.mark.parametrize("compose", compose_commands() or [pytest.param(None, marks=pytest.mark.skip("no Compose"))],
                         ids=lambda c: " ".join(c) if c else "none")  # fmt: skip
def test_compose_files_are_valid(compose):
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        args = [a for f in files for a in ("-f", f)]
        done = subprocess.run([*compose, *args, "config", "-q"], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(compose)} config {files}: {done.stderr}"


def test_published_ports_and_healthchecks_match_the_config():
    services = load_compose()
    ours = {n: s for n, s in services.items() if s.subcommand}
    assert {s.subcommand for s in ours.values()} == set(SECTIONS), "compose.yaml should run every service"
    for name, s in ours.items():
        config = ServicesConfig.load(s.config_file)
        listen = int(getattr(config, SECTIONS[s.subcommand]).listen.rsplit(":", 1)[1])
        for _, container_port in s.ports:
            assert container_port == listen, f"{name} publishes {container_port} but listens on {listen}"
        assert f"127.0.0.1:{listen}" in s.healthcheck, f"{name}: the healthcheck {s.healthcheck} misses {listen}"


@pytest.mark.parametrize("profile", list(PROFILES))
def test_compose_services_run_as_declared(profile, tmp_path):
    services = load_compose()
    ours = {n: s for n, s in services.items() if s.subcommand}
    wanted = PROFILES[profile]
    names = [n for n, s in ours.items() if wanted is None or s.subcommand in wanted]
    assert not {ours[n].subcommand for n in names} - available_subcommands(), "compose.yaml runs a command we lack"
    [worker] = [n for n in names if ours[n].subcommand == "worker"]
    [api] = [n for n in names if ours[n].subcommand == "api"]
    with LocalStack(services, names, tmp_path) as stack:
        if profile == "all":  # the expert store scaled out (one node here), found through the directory
            assert stack.config.worker.store.startswith("redis://") and stack.redis is not None
        with InferenceClient(stack.address(worker), timeout_s=120) as client:
            direct = client.complete("def main():", max_new_tokens=12)
        http = openai.OpenAI(base_url=f"http://{stack.address(api)}/v1", api_key="unused", max_retries=0)
        done = http.completions.create(model="expertflow-coarse-8x2", prompt="def main():", max_tokens=12)
    assert direct.completion_tokens == 12 and direct.text
    assert done.choices[0].text == direct.text  # greedy: the same text through the API as from the worker
    assert stack.codes == {n: 0 for n in names}, {n: stack.log(n) for n, c in stack.codes.items() if c}


def test_compose_yaml_has_no_version_key():
    """Compose v2 warns about `version:`; without it docker-compose v1.29 reads the Compose specification."""
    import yaml

    assert "version" not in yaml.safe_load(COMPOSE_FILE.read_text())
