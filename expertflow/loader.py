"""Turn a local Hugging Face checkpoint directory into a runnable offloaded model.

Dense weights (embeddings, attention, norms, routers, shared experts, LM head) are
copied tensor by tensor from the memory-mapped files to the compute device; routed
experts go to the expert store (host arena within the host budget, the rest on
NVMe, unless the caller brings another `ExpertStore`) and reach the device through
the hot-expert cache, which the named cache policy (orchestrator/policies.py) runs.
No tensor is materialised in RAM except on its way somewhere.

Not for: running requests (engine.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_store.budget import parse_budget, percent_at_least
from expert_store.checkpoint import CheckpointError, CheckpointFiles
from expert_store.device_cache import ExpertCache
from expert_store.keys import ExpertSpace
from expert_store.layout import ExpertLayout
from expert_store.store import ExpertStore, LocalExpertStore
from expert_store.timing import Clock, StepTiming, wall_clock_ms
from expert_store.transfer import make_copier
from expertflow.families import UnsupportedArchitecture, family_for
from expertflow.model import MoETransformer
from expertflow.spec import Family, ModelSpec
from orchestrator.planning_thread import PlanningThread
from orchestrator.policies import CachePolicy, PolicyInputs, make_policy


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: the checkpoint's on CUDA, float32 on CPU
    expert_budget: str = "100%"  # of all routed-expert bytes, or an absolute size
    host_budget: str = "100%"  # of the local store; ignored when load() is given a store
    policy: str = "lru"  # a name in orchestrator/policies.py
    # what named policies may use (predictors, training frequency), given the model's expert space;
    # None: none, so only the policies that need nothing (ondemand, lru, speculate) are available
    policy_inputs: Callable[[ExpertSpace], PolicyInputs] | None = None
    # a policy built by the caller instead of `policy` (tests and benchmarks wrap or tune one)
    policy_factory: Callable[[ExpertSpace], CachePolicy] | None = None
    # "thread": the prefetcher plans on a worker thread (orchestrator/planning_thread.py), off the critical
    # path; "inline": each call plans before the engine goes on
    planning: str = "inline"
    timing: StepTiming | None = None  # None: measured (expert_store/timing.py)
    clock: Clock = wall_clock_ms
    progress: bool = False


@dataclass
class LoadedModel:
    directory: Path
    family: Family
    spec: ModelSpec
    model: MoETransformer
    store: ExpertStore
    cache: ExpertCache
    policy: CachePolicy
    device: torch.device
    dense_bytes: int
    expert_bytes_total: int
    owns_store: bool = True

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype that runs (LoadOptions.dtype, or what the loader chose for the device)."""
        return self.model.embed.weight.dtype

    def close(self) -> None:
        if self.policy.prefetcher is not None:
            self.policy.prefetcher.close()
        if self.owns_store:
            self.store.close()


# Config fields every supported family sizes tensors or loops with: nonsense here fails inside
# torch (negative dimensions, division by zero) or much later, so it is refused up front.
_POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "max_position_embeddings",
    "num_experts_per_tok",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
)
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def _check_config(config, raw: dict, config_path: Path) -> None:
    """Refuse sizes no model can have, naming the field as config.json spells it."""
    aliases: dict[str, str] = dict(getattr(type(config), "attribute_map", {}) or {})

    def spelled(field: str) -> str:
        # transformers maps some names onto others (Qwen3-MoE's num_experts is num_local_experts)
        return next((a for a, target in aliases.items() if target == field and a in raw), field)

    for field in _POSITIVE_FIELDS:
        value = None if field in aliases else getattr(config, field, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise CheckpointError(f"{config_path}: {spelled(field)} must be a positive integer, not {value!r}")
    top_k = getattr(config, "num_experts_per_tok", None)
    count = next((f for f in _EXPERT_COUNT_FIELDS if f not in aliases and getattr(config, f, None) is not None), None)
    if top_k is not None and count is not None and top_k > getattr(config, count):
        raise CheckpointError(
            f"{config_path}: num_experts_per_tok ({top_k}) is more than {spelled(count)} ({getattr(config, count)})"
        )


def read_config(directory: Path):
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory does not exist")
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{config_path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{config_path}: cannot be read ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: not a JSON object but {json.dumps(raw)[:40]}")
    architectures = raw.get("architectures")
    names_ok = isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    if architectures is not None and not names_ok:
        raise CheckpointError(f"{config_path}: architectures must be a list of class names, not {architectures!r}")
    try:
        family = family_for(architectures, raw.get("model_type"))
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"{config_path}: {e}") from None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; all mean the same to a user
        raise CheckpointError(f"{config_path}: transformers cannot read this config ({e})") from None
    _check_config(config, raw, config_path)
    return family, config


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu or cuda")
    return device


def policy_inputs(space: ExpertSpace, **values) -> PolicyInputs:
    """PolicyInputs for a live model: its expert space, and the gate speculation every model can compute."""
    return PolicyInputs(space.n_layers, space.n_experts, space.top_k, speculation=True, **values)


def load(directory: str | Path, options: LoadOptions = LoadOptions(), store: ExpertStore | None = None) -> LoadedModel:
    """The model in `directory`, its routed experts served from `store` (default: a LocalExpertStore over
    the directory's files within `options.host_budget`), which must hold every routed expert of the model
    in the model's layout; the caller keeps ownership of a store it passes (LoadedModel.close leaves it)."""
    directory = Path(directory)
    device = _device(options.device)
    family, config = read_config(directory)
    try:
        spec: ModelSpec = family.build_spec(config)
    except ValueError as e:  # e.g. an unsupported rope type: a property of this config file
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
    # CPUs run bf16/fp16 matmuls slowly or by emulation, and fp32 is exact there.
    dtype = options.dtype or (spec.dtype if device.type == "cuda" else torch.float32)
    files = CheckpointFiles(directory)
    quantized = [n for n in files.tensors if n.endswith(("weight_scale_inv", ".qweight", ".scales"))]
    if quantized:
        raise CheckpointError(f"{directory}: quantized checkpoints are not supported (found {quantized[0]!r})")

    with torch.device("meta"):
        model = MoETransformer(spec)
    model = model.to_empty(device=device).to(dtype)
    model.inv_freq = spec.inv_freq.to(device)
    dense_bytes = _load_dense(model, family, files, spec)

    moe_layers = [ls.moe for ls in spec.layers if ls.moe is not None]
    if not moe_layers:
        raise CheckpointError(f"{directory / 'config.json'}: the config describes no MoE layer")
    ffns = {moe.expert_ffn for moe in moe_layers}
    if len(ffns) != 1:
        raise CheckpointError(f"{directory}: routed experts of different sizes ({sorted(ffns)}) are not supported")
    try:
        space = spec.experts
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    layout = ExpertLayout(spec.hidden, ffns.pop(), dtype)
    names = {k: family.expert_names(space.model_layer(k.layer), k.expert) for k in space.keys()}
    total = len(names) * layout.nbytes
    expert_budget = parse_budget(options.expert_budget, total, "--expert-budget")
    n_slots = min(len(names), expert_budget // layout.nbytes)
    if n_slots < 1:
        raise ValueError(
            f"--expert-budget {options.expert_budget} ({expert_budget} bytes) is smaller than one expert "
            f"({layout.nbytes} bytes); give at least {layout.nbytes} bytes or {percent_at_least(layout.nbytes, total)}"
        )
    owns_store = store is None
    if store is None:
        host_budget = parse_budget(options.host_budget, len(names) * layout.slot_nbytes, "--host-budget")
        store = LocalExpertStore(files, names, layout, host_budget, device.type == "cuda", options.progress)
    else:
        _check_store(store, names.keys(), layout)
    policy = None
    try:
        if options.policy_factory is not None:
            policy = options.policy_factory(space)
        else:
            inputs = options.policy_inputs(space) if options.policy_inputs else policy_inputs(space)
            policy = make_policy(options.policy, inputs)
        if options.planning not in ("inline", "thread"):
            raise ValueError(f"planning {options.planning!r}: inline or thread")
        if options.planning == "thread" and policy.prefetcher is not None:
            policy = CachePolicy(policy.name, policy.eviction, PlanningThread(policy.prefetcher))
        cache = ExpertCache(
            store,
            n_slots,
            device,
            policy.eviction,
            make_copier(device),
            timing=options.timing,
            clock=options.clock,
            shape=space.shape,
        )
    except BaseException:  # a bad policy or Ctrl-C: the caller never gets the store to close
        if policy is not None and policy.prefetcher is not None:
            policy.prefetcher.close()
        if owns_store:
            store.close()
        raise
    for blk in model.layers:
        if hasattr(blk, "moe"):
            blk.moe.cache = cache
    model.eval()
    return LoadedModel(
        directory, family, spec, model, store, cache, policy, device, dense_bytes, total, owns_store
    )


def _check_store(store: ExpertStore, keys, layout: ExpertLayout) -> None:
    """The store must serve exactly this model's experts, in its layout."""
    if store.layout != layout:
        raise ValueError(f"the expert store holds experts laid out as {store.layout}, the model needs {layout}")
    wanted, held = set(keys), set(store.keys())
    if wanted - held:
        missing = wanted - held
        raise ValueError(f"the expert store lacks {len(missing)} of the model's experts, e.g. {tuple(min(missing))}")
    if held - wanted:
        extra = held - wanted
        raise ValueError(
            f"the expert store holds {len(extra)} experts this model does not have, e.g. {tuple(min(extra))}: "
            "it serves another model"
        )


def _load_dense(model: MoETransformer, family: Family, files: CheckpointFiles, spec: ModelSpec) -> int:
    total = 0
    params = dict(model.named_parameters())
    for name, param in params.items():
        ckpt = family.checkpoint_name(name)
        if name == "lm_head.weight" and ckpt not in files and spec.tie_embeddings:
            ckpt = family.checkpoint_name("embed.weight")
        info = files.info(ckpt)
        if info.shape != tuple(param.shape):
            raise CheckpointError(
                f"{files.directory}: tensor {ckpt!r} has shape {info.shape}, the config implies {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(files.get(ckpt))
        total += param.numel() * param.element_size()
    return total
