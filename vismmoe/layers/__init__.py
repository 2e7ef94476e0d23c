"""Model layers that vismmoe runs in its own kernels in place of transformers' (rms_norm.py, router.py,
rotary.py), each behind a `*_kernel: auto | fused | torch` setting."""


def kernel_wanted(key: str, setting: str, usable, device) -> bool:
    """Whether a `key: setting` (auto, fused or torch) swaps in its kernel on `device`: never for torch, for
    auto where `usable(device)` (CUDA, triton, a kernel that matched its twin there); fused raises
    ConfigError where it cannot run."""
    wanted = setting != "torch" and usable(device)
    if setting == "fused" and not wanted:
        from ..errors import ConfigError

        raise ConfigError(f"{key}: fused needs a CUDA device with triton and a kernel that passed its "
                          f"check against the torch twin (here {device}); use auto or torch")
    return wanted
