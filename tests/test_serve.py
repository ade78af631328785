"""`expertflow serve`: every service as its own process from one config; what comes out equals the embedded
mode, a predictor killed mid-run costs no request, and SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from expertflow.engine import Engine
from expertflow.loader import LoadOptions, load
from expertflow.requests import SamplingParams
from expertflow.default_model import default_model_dir, default_predictor
from expertflow.services.client import InferenceClient
from expertflow.services.common import wait_for_server
from expertflow.services.config import ServicesConfig
from expertflow.tokenizer import TextCodec
from test_worker_service import free_port


def stack_config(**sections: dict) -> ServicesConfig:
    """Every service on a free loopback port, no metrics endpoints, and `sections` on top."""
    ports = {name: free_port() for name in ("worker", "store", "predictor", "orchestrator", "api")}
    return ServicesConfig.from_dict(
        {
            "worker": {"listen": f"127.0.0.1:{ports['worker']}", "plan_timeout_ms": 50.0},
            "expert_store": {"listen": f"127.0.0.1:{ports['store']}"},
            "predictor": {"listen": f"127.0.0.1:{ports['predictor']}"},
            "orchestrator": {"listen": f"127.0.0.1:{ports['orchestrator']}"},
            "api": {"listen": f"127.0.0.1:{ports['api']}"},
            "metrics": {"worker": 0, "expert_store": 0, "predictor": 0, "orchestrator": 0, "api": 0},
            **sections,
        }
    )


@pytest.mark.slow
def test_the_whole_stack_serves_what_the_embedded_mode_generates(tmp_path):
    config = stack_config()
    path = tmp_path / "expertflow.toml"
    path.write_text(config.to_toml())
    serve = subprocess.Popen([sys.executable, "-m", "expertflow.cli", "serve", "--config", str(path)])
    try:
        wait_for_server(config.worker.listen, timeout_s=240)
        directory = default_model_dir()
        codec = TextCodec(directory)
        prompts = ["def main():", "In the beginning", "import os\n"]
        from predictor.learned import LearnedPredictor
        from predictor.online import OnlineConfig
        from expertflow.loader import policy_inputs

        predictor = LearnedPredictor.load(default_predictor(None), OnlineConfig())
        loaded = load(
            directory,
            LoadOptions(expert_budget="25%", policy="expertflow",
                        policy_inputs=lambda space: policy_inputs(space, learned=predictor.sessions())),
        )  # fmt: skip
        expected = [
            Engine(loaded).generate([codec.encode(p)], SamplingParams(max_new_tokens=16, stop_on_eos=False))
            .outputs[0].token_ids
            for p in prompts
        ]  # fmt: skip
        loaded.close()
        with InferenceClient(config.worker.listen, timeout_s=120) as client:
            got = [client.complete(p, max_new_tokens=16, ignore_eos=True).token_ids for p in prompts]
            assert got == expected
            # the predictor dies: plans stop coming, loading turns reactive, answers stay the same
            predictor_pid = _child(serve.pid, "predictor")
            os.kill(predictor_pid, signal.SIGKILL)
            again = [client.complete(p, max_new_tokens=16, ignore_eos=True).token_ids for p in prompts]
            assert again == expected
            # serve starts it again, and the orchestrator's plans resume
            restarted = _child(serve.pid, "predictor", other_than=predictor_pid)
            wait_for_server(config.predictor.listen, timeout_s=120)
            assert [client.complete(p, max_new_tokens=16, ignore_eos=True).token_ids for p in prompts] == expected
            assert restarted != predictor_pid
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(120)
    assert code == 0
    assert not _children(serve.pid)


def _children(pid: int) -> list[tuple[int, str]]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [(int(line.split(None, 1)[0]), line.split(None, 1)[1]) for line in out.splitlines() if line.strip()]


def _child(pid: int, service: str, other_than: int | None = None) -> int:
    for _ in range(300):
        for child, args in _children(pid):
            if f"expertflow.cli {service} " in args and child != other_than:
                return child
        time.sleep(0.1)
    raise AssertionError(f"no {service} process under serve")
