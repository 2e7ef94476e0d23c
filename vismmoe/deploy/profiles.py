"""Device profiles: the memory, bandwidth and compute figures the planner fits a model to.

A profile is a YAML file (configs/devices/*.yaml ships one per device class; `vismmoe probe` writes
one measured on the spot). Every figure carries where it comes from:

    memory_bandwidth_gbs: {value: 68, source: datasheet, ref: "Jetson Orin Nano Series Data Sheet DS-11105"}

`source` is `datasheet` (ref names the datasheet), `measured` (ref says how and where) or `estimate`
(ref gives the arithmetic from named figures). The loader is strict: a missing figure, an unknown
key, a non-positive number or a figure without its source is a ConfigError naming the file and field.

Unified-memory devices (Jetson) share one DRAM between CPU and GPU: there is no PCIe link, the host
store and the GPU cache draw on the same bytes, and the slow tier is the NVMe disk read through mmap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "devices"
SOURCES = ("datasheet", "measured", "estimate")

# figure name -> (section, required for discrete GPUs, required for unified memory, required for cpu-only)
FIGURES = {
    "memory_gb": ("gpu", True, True, False),  # device memory (unified: the shared DRAM)
    "memory_bandwidth_gbs": ("gpu", True, True, False),
    "bf16_tflops": ("gpu", True, True, False),  # dense tensor-core bf16 (fp32 accumulate)
    "h2d_pinned_gbs": ("link", True, False, False),
    "h2d_pageable_gbs": ("link", True, False, False),
    "copy_kernel_gbs": ("link", False, False, False),  # ops.copy_records reading the mapped slab
    "copy_latency_ms": ("link", False, False, False),  # a copy's fixed cost beyond bytes / bandwidth (probe)
    "ram_gb": ("host", True, False, True),  # unified: the same DRAM as memory_gb, so not separate
    "cpu_cores": ("host", True, True, True),
    "cpu_expert_decode_ms": ("host", False, False, False),  # one expert, one token, on the CPU
    "host_memcpy_gbs": ("host", False, False, True),
    "cpu_tflops": ("host", False, False, False),  # float32 GEMM on all cores
    "disk_read_gbs": ("storage", True, True, True),
    "reserved_gb": ("gpu", True, True, True),  # memory the process cannot use (OS, CUDA context, slack)
    "expert_prefill_ms": ("gpu", False, False, False),  # measured: one expert over 512 tokens
    "expert_decode_ms": ("gpu", False, False, False),  # measured: one expert, one token
    # The engine's own times (`vismmoe probe --model` runs the model; time_model.ENGINE_PRIOR where absent):
    "decode_layer_ms": ("engine", False, False, False),  # static decode step per MoE layer, all resident, beyond the bytes
    "generate_layer_ms": ("engine", False, False, False),  # transformers' generate, per MoE layer
    "prefill_fixed_ms": ("engine", False, False, False),  # TTFT's fixed part: processor, vision launch, first sample
    "prefill_layer_ms": ("engine", False, False, False),  # TTFT per MoE layer (host-decided prefill)
    "prefill_inputs_ms": ("engine", False, False, False),  # TTFT's host input building (processor), for the probed model
    "offload_layer_ms": ("engine", False, False, False),  # static decode below a full budget, per MoE layer, beyond misses
    "generate_offload_layer_ms": ("engine", False, False, False),  # generate below a full budget, per MoE layer, beyond misses
    "generate_prefetch_layer_ms": ("engine", False, False, False),  # generate's prefetch on, per MoE layer, beyond it off
    "loop_expert_ms": ("engine", False, False, False),  # a prefill expert computed one at a time (more experts than its wave)
    "prefill_miss_host_ms": ("engine", False, False, False),  # a prefill miss, loaded one wave per layer (or its copy)
    "prefill_offload_layer_ms": ("engine", False, False, False),  # a prefill below a full budget, per MoE layer
    "mmap_read_ms": ("engine", False, False, False),  # one of the model's records read from an mmap store in the page cache
}
_TOP_KEYS = {"name", "description", "kind", "gpu_name", "compute_capability", "figures"}
KINDS = ("discrete", "unified", "cpu")


@dataclass(frozen=True)
class Figure:
    value: float
    source: str
    ref: str


@dataclass
class DeviceProfile:
    name: str
    description: str
    kind: str  # discrete | unified | cpu
    gpu_name: str = ""
    compute_capability: str = ""
    figures: dict = field(default_factory=dict)  # name -> Figure
    path: str = ""

    @property
    def unified(self) -> bool:
        return self.kind == "unified"

    def has(self, name: str) -> bool:
        return name in self.figures

    def get(self, name: str, default=None):
        fig = self.figures.get(name)
        return default if fig is None else fig.value

    def __getitem__(self, name: str) -> float:
        if name not in self.figures:
            raise ConfigError(f"device profile {self.name!r} has no figure {name!r}")
        return self.figures[name].value

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "kind": self.kind, "gpu_name": self.gpu_name,
                "compute_capability": self.compute_capability,
                "figures": {k: {"value": f.value, "source": f.source, "ref": f.ref} for k, f in self.figures.items()}}


def parse_profile(data, where: str) -> DeviceProfile:
    """Validate a profile mapping (from YAML) strictly; ConfigError names `where` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a device profile must be a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(_TOP_KEYS)}")
    for key in ("name", "description", "kind", "figures"):
        if key not in data:
            raise ConfigError(f"{where}: missing required key {key!r}")
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise ConfigError(f"{where}: name must be a non-empty string")
    kind = data["kind"]
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    cc = str(data.get("compute_capability") or "")
    if kind != "cpu":
        if not data.get("gpu_name"):
            raise ConfigError(f"{where}: a {kind} GPU profile needs gpu_name")
        try:
            major, minor = (int(x) for x in cc.split("."))
        except ValueError:
            raise ConfigError(f"{where}: compute_capability must look like '8.7', got {cc!r}") from None
        if major < 5 or minor < 0:
            raise ConfigError(f"{where}: compute_capability {cc!r} is not a CUDA GPU vismmoe supports")
    figures_in = data["figures"]
    if not isinstance(figures_in, dict):
        raise ConfigError(f"{where}: figures must be a mapping of figure name -> {{value, source, ref}}")
    unknown = sorted(set(figures_in) - set(FIGURES))
    if unknown:
        raise ConfigError(f"{where}: unknown figure(s) {unknown}; valid figures are {sorted(FIGURES)}")
    column = {"discrete": 1, "unified": 2, "cpu": 3}[kind]
    missing = sorted(n for n, spec in FIGURES.items() if spec[column] and n not in figures_in)
    if missing:
        raise ConfigError(f"{where}: a {kind} profile needs figure(s) {missing}")
    if kind == "unified":
        extra = sorted(n for n in ("h2d_pinned_gbs", "h2d_pageable_gbs", "ram_gb") if n in figures_in)
        if extra:
            raise ConfigError(f"{where}: {extra} make no sense on a unified-memory device (host and GPU share "
                              "memory_gb); remove them")
    figures = {}
    for name, entry in figures_in.items():
        figures[name] = _figure(entry, f"{where}: figure {name}")
    if kind != "cpu":
        if figures["reserved_gb"].value >= figures["memory_gb"].value:
            raise ConfigError(f"{where}: reserved_gb ({figures['reserved_gb'].value}) must be below memory_gb "
                              f"({figures['memory_gb'].value})")
    elif figures["reserved_gb"].value >= figures["ram_gb"].value:
        raise ConfigError(f"{where}: reserved_gb must be below ram_gb")
    if "cpu_cores" in figures and figures["cpu_cores"].value != int(figures["cpu_cores"].value):
        raise ConfigError(f"{where}: figure cpu_cores must be a whole number")
    return DeviceProfile(name=data["name"].strip(), description=str(data["description"]), kind=kind,
                         gpu_name=str(data.get("gpu_name") or ""), compute_capability=cc, figures=figures,
                         path=where)


def _figure(entry, where: str) -> Figure:
    if not isinstance(entry, dict) or set(entry) - {"value", "source", "ref"} or "value" not in entry:
        raise ConfigError(f"{where} must be a mapping {{value: <number>, source: datasheet|measured|estimate, "
                          f"ref: <where it comes from>}}, got {entry!r}")
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value \
            or value == float("inf"):
        raise ConfigError(f"{where}: value must be a positive finite number, got {value!r}")
    source = entry.get("source")
    if source not in SOURCES:
        raise ConfigError(f"{where}: source must be one of {SOURCES}, got {source!r}")
    ref = entry.get("ref")
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{where}: ref must name the {source} the figure comes from")
    return Figure(float(value), source, ref.strip())


def load_profile(name_or_path) -> DeviceProfile:
    """A shipped profile by name (`vismmoe devices` lists them) or a profile YAML file by path."""
    import yaml

    path = Path(str(name_or_path))
    if not path.is_file():
        candidate = PROFILE_DIR / f"{name_or_path}.yaml"
        if not candidate.is_file():
            raise ConfigError(f"unknown device profile {str(name_or_path)!r}: not a file and not one of the shipped "
                              f"profiles ({', '.join(profile_names())}); `vismmoe devices` lists them, "
                              "`vismmoe probe --output P.yaml` measures this machine")
        path = candidate
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"device profile {str(path)!r} is not valid YAML: {exc}") from None
    return parse_profile(data, str(path))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def shipped_profiles() -> list[DeviceProfile]:
    return [load_profile(name) for name in profile_names()]
