"""Turn a local Hugging Face checkpoint directory into a runnable offloaded model.

Dense weights (embeddings, attention, norms, routers, shared experts, LM head) are
copied tensor by tensor from the memory-mapped files to the compute device; routed
experts go to the expert store (host arena within the host budget, the rest on
NVMe) and reach the device through the hot-expert cache. No tensor is materialised
in RAM except on its way somewhere.

Not for: running requests (engine.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_store.checkpoint import CheckpointError, CheckpointFiles
from expert_store.device_cache import ExpertCache
from expert_store.layout import ExpertLayout
from expert_store.policies import CachePolicy, make_policy
from expert_store.store import LocalExpertStore
from expert_store.transfer import make_copier
from expert_store.budget import parse_budget, percent_at_least
from expertflow.families import UnsupportedArchitecture, family_for
from expertflow.model import MoETransformer
from expertflow.spec import Family, ModelSpec


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: the checkpoint's on CUDA, float32 on CPU
    expert_budget: str = "100%"  # of all routed-expert bytes, or an absolute size
    host_budget: str = "100%"
    policy: str = "lru"
    # builds the policy from the model's spec instead of `policy` (for policies that need
    # more than a name, such as a learned predictor)
    policy_factory: Callable[[ModelSpec], CachePolicy] | None = None
    progress: bool = False


@dataclass
class LoadedModel:
    directory: Path
    family: Family
    spec: ModelSpec
    model: MoETransformer
    store: LocalExpertStore
    cache: ExpertCache
    device: torch.device
    dense_bytes: int
    expert_bytes_total: int

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype that runs (LoadOptions.dtype, or what the loader chose for the device)."""
        return self.model.embed.weight.dtype

    def close(self) -> None:
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


def load(directory: str | Path, options: LoadOptions = LoadOptions()) -> LoadedModel:
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

    moe_layers = [(i, ls.moe) for i, ls in enumerate(spec.layers) if ls.moe is not None]
    if not moe_layers:
        raise CheckpointError(f"{directory / 'config.json'}: the config describes no MoE layer")
    ffns = {moe.expert_ffn for _, moe in moe_layers}
    if len(ffns) != 1:
        raise CheckpointError(f"{directory}: routed experts of different sizes ({sorted(ffns)}) are not supported")
    layout = ExpertLayout(spec.hidden, ffns.pop(), dtype)
    names = {(i, e): family.expert_names(i, e) for i, moe in moe_layers for e in range(moe.router.n_experts)}
    total = len(names) * layout.nbytes
    expert_budget = parse_budget(options.expert_budget, total, "--expert-budget")
    n_slots = min(len(names), expert_budget // layout.nbytes)
    if n_slots < 1:
        raise ValueError(
            f"--expert-budget {options.expert_budget} ({expert_budget} bytes) is smaller than one expert "
            f"({layout.nbytes} bytes); give at least {layout.nbytes} bytes or {percent_at_least(layout.nbytes, total)}"
        )
    host_budget = parse_budget(options.host_budget, len(names) * layout.slot_nbytes, "--host-budget")
    store = LocalExpertStore(files, names, layout, host_budget, device.type == "cuda", options.progress)
    try:
        policy = options.policy_factory(spec) if options.policy_factory else make_policy(options.policy)
        policy.bind_speculation(model.speculate)
        cache = ExpertCache(store, n_slots, device, policy, make_copier(device))
    except BaseException:  # a bad policy or Ctrl-C: the caller never gets the store to close
        store.close()
        raise
    for i, _ in moe_layers:
        model.layers[i].moe.cache = cache
    model.eval()
    return LoadedModel(directory, family, spec, model, store, cache, device, dense_bytes, total)


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
