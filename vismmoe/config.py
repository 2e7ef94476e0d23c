"""Engine configuration: one dataclass, loaded from YAML or a dict, validated strictly.

Unknown keys are errors (a typo in a deployment file must not be silently ignored), and every value is
checked here so that the engine itself can trust its configuration.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import BudgetError, ConfigError

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_STORES = ("pinned", "memory", "mmap")


@dataclass
class EngineConfig:
    # Where non-expert weights and compute live: "auto" = cuda if available, else cpu.
    device: str = "auto"
    # Compute dtype; "auto" = the checkpoint's dtype (float32 on cpu if the checkpoint is float16).
    dtype: str = "auto"
    # GPU expert cache size: bytes (int), a size string ("12GiB", "800MB"), a fraction of all expert
    # bytes (0 < x <= 1, or "25%"), "min" for the smallest budget that can run the model, or "auto":
    # the largest budget that fits this machine's free memory next to the rest (vismmoe.deploy).
    expert_budget: Any = 1.0
    # Host tier: "pinned" (one page-locked slab; plain memory on CPU-only machines), "memory"
    # (pageable), or "mmap" (read experts lazily from the safetensors files: models larger than RAM).
    store: str = "pinned"
    # Cache eviction policy name (see vismmoe.offload.policies).
    policy: str = "lru"
    # Lookahead prefetch: predict the experts of the next `prefetch_depth` MoE layers from the current
    # hidden state (with those layers' own routers) and copy them ahead on the copy stream, at most
    # `prefetch_limit` per layer and step (0 = the model's top-k). "auto": per layer, only where it pays
    # (starts off; on where its would-be misses could pay for the predictions, kept on while the miss time
    # its timely prefetches save exceeds the prediction's and the wrong copies' cost; re-decided every 16
    # decode steps, offload/autoprefetch.py); true: every layer; false: off.
    prefetch: Any = "auto"
    prefetch_depth: int = 1
    prefetch_limit: int = 0
    # Also prefetch during the prefill. Off by default: a many-token step touches nearly every expert,
    # so predictions are the union of everything and mostly displace useful experts.
    prefetch_prefill: bool = False
    # Expert compute: "grouped_mm" (two grouped GEMMs over the slot pool; CUDA + bfloat16), "fused"
    # (steps of <= 16 tokens in the fused decode kernel ops.fused_moe_decode, the rest as auto), "loop"
    # (one expert at a time, the reference arithmetic of transformers' eager experts), or "auto" (fused
    # where it runs, else grouped_mm where it runs, else loop).
    experts_kernel: str = "auto"
    # RMSNorm modules: "fused" (one Triton launch per norm, ops.rms_norm; CUDA + triton), "torch"
    # (transformers' modules as they are: eight small kernels each), or "auto" (fused where it runs).
    # Only modules whose forward equals transformers' RMSNorm on a probe are swapped.
    norm_kernel: str = "auto"
    # Routers of decode steps: "fused" (logits, softmax, top-k and renormalisation in one Triton launch,
    # ops.route_top_k; CUDA + triton), "torch" (transformers' routers as they are: six launches), or "auto"
    # (fused where it runs). Only routers whose forward equals the softmax top-k twin on a probe are swapped.
    router_kernel: str = "auto"
    # Rotary embedding of decode steps' queries and keys: "fused" (one Triton launch, ops.rotary, bit for
    # bit transformers' apply_rotary_pos_emb; CUDA + triton), "torch" (transformers' function: ten
    # launches), or "auto" (fused where it runs). Process-wide per device (layers/rotary.py says why).
    # The kernel launches with fp fusion off: with it on, the GPU compiler fused a product and the sum into
    # one FMA and missed transformers' rounding by one step on an H200 (bit for bit since, tests/test_rotary.py).
    rope_kernel: str = "auto"
    # Time how long the compute stream waits for expert copies (CUDA events; small overhead).
    measure_stalls: bool = False
    # Decode loop: "static" (greedy steps over a static KV cache, experts decided on the device, each
    # step one CUDA graph replay when `cuda_graphs`), "generate" (transformers' generate, experts
    # decided on the host per layer), or "auto" (static whenever the request and the cache allow it:
    # greedy, no trace, and a host slab the device can copy from (page-locked on CUDA) unless the budget
    # holds every expert; any policy).
    decode: str = "auto"
    cuda_graphs: bool = True
    # How a decode step serves an expert missing from the GPU cache, per MoE layer (offload/miss_paths.py):
    # "copy" (into a slot, evicting one), "zerocopy" (the decode kernel reads it from the page-locked host
    # slab, no slot taken), "cpu" (computed on the CPU from the host store beside the GPU; host-decided
    # path only), or "auto" (per layer, the cheapest by a cost model on figures measured at load; it
    # considers the in-place paths only where the pool cannot keep an expert between its uses).
    # "copy" by default: on the 12-layer bench model (H200) copy was the fastest at 10% and 25% budgets
    # by 1.7-3.7x, because reading in place installs nothing and the misses stay (BENCHMARKS.md).
    miss_path: str = "copy"
    # Default generation length and sampling.
    max_new_tokens: int = 64
    do_sample: bool = False
    # Attention backend passed to transformers ("sdpa", "eager"; "xformers" needs the optional package).
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    # How the expert cache's slots are shared by the MoE layers: "global" (or null: one pool, the policy
    # alone decides), "uniform" (an even partition), or a list of per-MoE-layer quotas (each >= top-k,
    # summing to the budget's slots), as `vismmoe plan` computes them: a layer at its quota replaces
    # only its own experts. Host path, device path and simulator make the same decisions.
    slot_plan: Any = None
    # Emulate a device profile (a `vismmoe devices` name or a profile YAML) on this machine: its usable
    # memory caps what the engine holds (BudgetError where the device would run out) and expert copies
    # are paced to its host link. Compute speed stays this machine's (vismmoe/deploy/emulate.py).
    emulate: Any = None
    # Visual-token pruning between the vision tower and the language model (vismmoe/pruning):
    # `visual_keep` is a ratio in (0, 1] (1.0 = off) or an integer token count; `visual_prune` the method
    # (affinity, diversity, importance, pool, random; None = affinity); `visual_merge` folds each pruned
    # token into its most similar kept token instead of dropping it.
    visual_keep: Any = 1.0
    visual_prune: Any = None
    visual_merge: bool = False
    # Affinity: score weights (keys importance, concentration, diversity, routing) and how many of the
    # first MoE layers' routers score the tokens. Seed of the random method.
    visual_affinity_weights: Any = None
    visual_affinity_layers: int = 1
    visual_prune_seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.store not in _STORES:
            raise ConfigError(f"store must be one of {_STORES}, got {self.store!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not (isinstance(self.prefetch, bool) or self.prefetch == "auto"):
            raise ConfigError(f"prefetch must be auto, true or false, got {self.prefetch!r}")
        if not 1 <= self.prefetch_depth <= 8:
            raise ConfigError(f"prefetch_depth must be an integer from 1 to 8, got {self.prefetch_depth!r}")
        if self.prefetch_limit < 0:
            raise ConfigError(f"prefetch_limit must be a non-negative integer (0 = automatic), got {self.prefetch_limit!r}")
        if self.experts_kernel not in ("auto", "fused", "grouped_mm", "loop"):
            raise ConfigError(f"experts_kernel must be auto, fused, grouped_mm or loop, got {self.experts_kernel!r}")
        if self.norm_kernel not in ("auto", "fused", "torch"):
            raise ConfigError(f"norm_kernel must be auto, fused or torch, got {self.norm_kernel!r}")
        if self.router_kernel not in ("auto", "fused", "torch"):
            raise ConfigError(f"router_kernel must be auto, fused or torch, got {self.router_kernel!r}")
        if self.rope_kernel not in ("auto", "fused", "torch"):
            raise ConfigError(f"rope_kernel must be auto, fused or torch, got {self.rope_kernel!r}")
        if self.decode not in ("auto", "static", "generate"):
            raise ConfigError(f"decode must be auto, static or generate, got {self.decode!r}")
        from .offload.miss_paths import check_setting

        # The value, and what the keys alone rule out; what needs the machine is checked at load.
        check_setting(self.miss_path, self.decode, "mmap" if self.store == "mmap" else "", cuda=False, fused=False)
        if self.attn_implementation not in ("sdpa", "eager", "xformers"):
            raise ConfigError(f"attn_implementation must be sdpa, eager or xformers, got {self.attn_implementation!r}")
        from .pruning import settings as pruning

        pruning.check_keep(self.visual_keep)
        pruning.check_method(self.visual_prune)
        pruning.check_weights(self.visual_affinity_weights)
        if not isinstance(self.visual_merge, bool):
            raise ConfigError(f"visual_merge must be true or false, got {self.visual_merge!r}")
        for key in ("visual_affinity_layers", "visual_prune_seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "visual_affinity_layers" else 0):
                raise ConfigError(f"{key} must be an integer >= {1 if key == 'visual_affinity_layers' else 0}, got {value!r}")
        from .offload.policies import POLICIES

        if self.policy not in POLICIES:
            raise ConfigError(f"unknown cache policy {self.policy!r}; choose one of {', '.join(sorted(POLICIES))}")
        if self.slot_plan not in (None, "global", "uniform") and (
                not isinstance(self.slot_plan, list) or not self.slot_plan
                or not all(isinstance(q, int) and not isinstance(q, bool) and q >= 1 for q in self.slot_plan)):
            raise ConfigError(f"slot_plan must be global, uniform or a list of positive integers (one per MoE "
                              f"layer), got {self.slot_plan!r}")
        parse_budget(self.expert_budget)  # raises BudgetError on nonsense, before any model is touched
        if self.emulate is not None:
            from .deploy.emulate import load_emulated_profile

            load_emulated_profile(self.emulate)  # an unknown name lists the shipped profiles

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides) -> "EngineConfig":
        check_keys(overrides, "override")
        return dataclasses.replace(self, **overrides)


_ALIASES = {"budget": "expert_budget"}

# Top-level sections a deployment file may hold; the engine reads `engine:`, and `plan:` is what
# `vismmoe plan` chose and predicts (a record for people and tools, not read by load). A file without an
# `engine:` section is flat: its top-level keys are the engine keys themselves.
DEPLOYMENT_SECTIONS = ("engine", "plan")


_SIMPLE_TYPES = {"bool": bool, "int": int, "str": str}  # fields annotated with these are type-checked


def _check_types(config: "EngineConfig") -> None:
    """Every value has its field's type: a YAML `"false"` or `"no"` string is not a boolean (a string
    `trust_remote_code: "false"` would otherwise be truthy), and a boolean is not an integer."""
    for f in fields(config):
        value = getattr(config, f.name)
        kind = _SIMPLE_TYPES.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{f.name} must be true or false (a boolean, not a string or number), got {value!r}")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{f.name} must be an integer, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ConfigError(f"{f.name} must be a string, got {value!r}")


def check_keys(data: dict, where: str) -> None:
    valid = {f.name for f in fields(EngineConfig)}
    bad_type = sorted(repr(k) for k in data if not isinstance(k, str))
    if bad_type:
        raise ConfigError(f"config keys must be strings; got {', '.join(bad_type)} in {where}")
    unknown = sorted(k for k in data if _ALIASES.get(k, k) not in valid)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown} in {where}; valid keys are: {', '.join(sorted(valid))}"
        )
    for alias, name in _ALIASES.items():
        if alias in data and name in data:
            raise ConfigError(f"{where} gives both {alias!r} and {name!r} (the same setting); keep one")


def load_config(config: str | Path | dict | EngineConfig | None = None, **overrides) -> EngineConfig:
    """Build an EngineConfig from a YAML path, a dict or an EngineConfig, then apply keyword overrides."""
    if isinstance(config, EngineConfig):
        data = config.to_dict()
        where = "EngineConfig"
    elif config is None:
        data, where = {}, "defaults"
    elif isinstance(config, dict):
        data, where = dict(config), "config dict"
    elif isinstance(config, (str, Path)):
        data, where = _read_yaml(Path(config)), str(config)
    else:
        raise ConfigError(
            f"config must be a YAML file path, a dict or an EngineConfig, got {type(config).__name__} {config!r}"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    check_keys(data, where)
    check_keys(overrides, "keyword overrides")
    # An override of either spelling of the budget replaces the file's, whichever spelling it used.
    if any(_ALIASES.get(k, k) == "expert_budget" for k in overrides):
        data = {k: v for k, v in data.items() if _ALIASES.get(k, k) != "expert_budget"}
    merged = {_ALIASES.get(k, k): v for k, v in {**data, **overrides}.items()}
    return EngineConfig(**merged)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file")
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text file (not UTF-8); pass a YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must contain a mapping of keys to values")
    if "engine" not in data:
        return data  # a flat file: its keys are engine keys (checked by the caller)
    # A deployment file: engine settings under `engine:`, other top-level keys must be known sections.
    unknown = sorted(str(k) for k in data if k not in DEPLOYMENT_SECTIONS)
    if unknown:
        raise ConfigError(
            f"config file {str(path)!r} has an `engine:` section and unknown top-level key(s) {unknown}; "
            f"engine settings go under `engine:` (known sections: {', '.join(DEPLOYMENT_SECTIONS)})"
        )
    if not isinstance(data["engine"], dict):
        raise ConfigError(f"the `engine:` section of {str(path)!r} must be a mapping of keys to values")
    return data["engine"]


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(value) -> tuple[str, float]:
    """Parse an expert budget into ("bytes", n), ("fraction", x), ("min", 0) or ("auto", 0).

    One grammar for the API, YAML and the CLI (which passes its text here unchanged):
      * an integer is a byte count: 4096, "4096", "4e9" (so 1 means one byte, not 100%);
      * a decimal number in (0, 1] is a fraction of all expert bytes: 0.25, "0.25", "1.0";
        "25%" is the same; a decimal above 1 without a unit ("1.5") is an error;
      * a size with a unit: "12GiB", "800 MB", "1.5GiB";
      * "min": the smallest budget that runs the model;
      * "auto" (-> ("auto", 0)): the engine plans it for this machine at load (vismmoe/deploy).
    """
    bad = BudgetError(
        f"cannot parse expert budget {value!r}: use a size such as '12GiB' or '800MB', a fraction of all "
        "expert bytes such as 0.25 or '25%', an integer byte count such as 4000000000, 'min' or 'auto'"
    )
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        if value <= 0:
            raise bad
        return ("bytes", float(value))
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise BudgetError(f"a fractional expert budget must be in (0, 1], got {value}; "
                              "use an integer byte count or a size such as '12GiB' for sizes")
        return ("fraction", value)
    if not isinstance(value, str):
        raise bad
    text = value.strip().lower().replace(" ", "")
    if text in ("min", "auto"):
        return (text, 0.0)
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise bad from None
        if not 0 < pct <= 100:
            raise BudgetError(f"a percentage expert budget must be in (0%, 100%], got {value!r}")
        return ("fraction", pct / 100.0)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(e[0-9]+)?([a-z]*)", text)
    if not m:
        raise bad
    mantissa, exponent, unit = m.groups()
    number = float(mantissa + (exponent or ""))
    if unit == "":
        if "." in mantissa and not exponent:
            return parse_budget(number)  # a decimal: a fraction in (0, 1]
        if number < 1 or number != int(number):
            raise bad
        return ("bytes", number)
    if unit not in _UNITS:
        raise bad
    n = number * _UNITS[unit]
    if n < 1:
        raise bad
    return ("bytes", n)
