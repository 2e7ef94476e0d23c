"""Loading a checkpoint with its experts offloaded: the pieces `Engine.__init__` wires together.

Loading never materialises the fused expert tensors: transformers builds the model from a state dict
of lazy safetensors slices for every non-expert weight (so its own key renaming and conversions apply)
and zero-stride placeholders for the expert parameters, which are then released. The expert bytes go
from the safetensors files straight into the host store (offload/store.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import EngineConfig, parse_budget
from .errors import BudgetError, ModelLoadError
from .offload.store import is_expert_key


def resolve_device(name: str) -> torch.device:
    """The engine's device, with its index: "cuda" means the current CUDA device now, once and for all."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} was requested but CUDA is not available; use device: cpu or auto")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise ModelLoadError(f"device {name!r} was requested but only {count} CUDA device(s) are visible "
                             f"(cuda:0 to cuda:{count - 1}); check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def load_hf_config(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) or "model_type" in str(exc):
            raise ModelLoadError(
                f"{model_dir}/config.json describes a model transformers does not know natively ({exc}). "
                "vismmoe runs transformers-native models; set trust_remote_code: true only if you trust the code"
            ) from None
        raise ModelLoadError(f"cannot read {model_dir}/config.json: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {model_dir}/config.json: {exc}") from None


def model_class(hf_config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            return auto._model_mapping[type(hf_config)]
        except KeyError:
            continue
    raise ModelLoadError(
        f"model type {hf_config.model_type!r} has no image-text-to-text or causal-LM class in transformers"
    )


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config.get_text_config(), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        return torch.float32
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32  # float16 matmuls are slow or missing on many CPUs
    return dtype


def resolve_auto_budget(config: EngineConfig, model_dir: Path, device: torch.device, dtype) -> EngineConfig:
    """expert_budget: auto -> the bytes `vismmoe.deploy` fits into this machine's free memory now."""
    if parse_budget(config.expert_budget)[0] != "auto":
        return config
    from .deploy.auto import auto_budget_bytes

    return config.replace(expert_budget=auto_budget_bytes(model_dir, device, dtype, config))


def budget_to_slots(budget, layout, dtype: torch.dtype) -> int:
    kind, value = parse_budget(budget)
    record_bytes = layout.record_numel * torch.empty((), dtype=dtype).element_size()
    total = len(layout.layers) * layout.num_experts
    minimum = layout.top_k
    if kind == "min":
        return minimum
    slots = int(value * total) if kind == "fraction" else int(value // record_bytes)
    if slots < minimum:
        raise BudgetError(
            f"expert budget {budget!r} holds {slots} expert(s) of {record_bytes} bytes, but one layer's top-{layout.top_k} "
            f"experts need {minimum} slots: the minimum budget is {minimum * record_bytes} bytes "
            f"({minimum * record_bytes / 2**20:.2f} MiB, or {minimum / total:.4f} of all experts, or 'min')"
            + ("; an integer budget is a byte count: write a fraction as 1.0 or '100%'"
               if kind == "bytes" and str(budget).strip().isdigit() else "")
        )
    return min(slots, total)


def load_non_expert_weights(model_cls, hf_config, files, layout, dtype, config):
    from safetensors import safe_open

    handles = [safe_open(str(p), framework="pt") for p in files]
    state_dict = {}
    for handle in handles:
        for key in handle.keys():
            if not is_expert_key(key):
                state_dict[key] = handle.get_slice(key)  # lazy: transformers reads it when it places it
    placeholder = torch.zeros((), dtype=dtype)
    for layer in layout.layers:
        for name in ("gate_up_proj", "down_proj"):
            shape = getattr(layer.experts, name).shape
            state_dict[f"{layer.name}.{name}"] = placeholder.expand(shape)  # zero-stride: no memory
    attn = "sdpa" if config.attn_implementation == "xformers" else config.attn_implementation
    if config.attn_implementation == "xformers":
        from .attention import register_xformers

        attn = register_xformers()
    try:
        model, info = model_cls.from_pretrained(
            None, config=hf_config, state_dict=state_dict, dtype=dtype, attn_implementation=attn,
            output_loading_info=True,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"transformers could not build the model from the checkpoint: {exc}") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if "rotary" not in k)
    if missing or info.get("mismatched_keys"):
        shown = ", ".join(missing[:5]) or str(sorted(info["mismatched_keys"])[:5])
        raise ModelLoadError(
            f"the checkpoint does not match config.json: missing or mismatched weights ({shown}, ...)"
        )
    return model


def release_expert_params(layout, dtype) -> None:
    # The experts now live in the store; leave empty parameters so module attributes keep their types.
    for layer in layout.layers:
        for name in ("gate_up_proj", "down_proj"):
            setattr(layer.experts, name, torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False))


def generation_config(model_dir: Path, model, tokenizer):
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        gen = GenerationConfig.from_model_config(model.config)
    if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.eos_token_id
    gen.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(gen, key, None)
    return gen
