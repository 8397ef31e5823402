"""Mixed precision of training steps: which one a run uses, its autocast and its gradient scaler.

``--precision`` chooses the arithmetic of the training steps' forward passes (pre-training and
episodic, every method, second-order MAML included): ``fp32``; ``bf16`` (autocast to bfloat16:
float32's range, so no loss scaling); ``fp16`` (autocast to float16 with torch's
``GradScaler``, whose loss scaling keeps small gradients from underflowing and skips the steps
whose gradients overflowed). The backbone's output is float32 again (:func:`float32_features`),
so the methods' heads compute in float32. Weights, optimiser state, validation, calibration,
``adapt`` and ``evaluate`` stay float32, so a checkpoint scores the same whichever precision
trained it.

``auto`` (the default) is what was measured best on each device (:data:`AUTO`; see
``docs/benchmarks.md``): fp32 for now, on the CPU and on GPUs. bf16 trains a conv4 ProtoNet
episode 1.8x faster on CPUs that compute bfloat16 natively (AMX), but over three derm-rare seeds
it tested 1.4 points below fp32 on average (59.2 against 57.8 at 5-shot; per seed -5.4, +3.1,
-1.9), not within the 0.5 points that would make it the default; on GPUs it was not measured. fp16 on a CPU is
refused: there are no fast float16 kernels there (measured 80x slower than fp32).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from medmeta.errors import MedmetaError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: What ``auto`` runs on each device type: the best measured at equal accuracy (module docstring).
AUTO = {"cpu": "fp32", "cuda": "fp32"}
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True when this processor has bfloat16 arithmetic (Intel AMX tiles or AVX-512 BF16)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)


def resolve_precision(name: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``name`` on ``device`` (``auto`` chosen as the module
    says); a precision the device cannot run is refused with a :class:`MedmetaError`."""
    if name not in PRECISIONS:
        raise MedmetaError(f"unknown precision {name!r}; use {', '.join(PRECISIONS)}")
    if name == "auto":
        return AUTO.get(device.type, "fp32")
    if name == "fp16" and device.type == "cpu":
        raise MedmetaError("--precision fp16 needs a GPU: the CPU has no fast float16 kernels (use bf16 or fp32)")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MedmetaError("--precision bf16: this GPU has no bfloat16 support (use fp16 or fp32)")
    return name


def autocast(device: torch.device, precision: str):
    """The autocast context of a training step's forward pass (nothing for ``fp32``)."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def float32_features(backbone: torch.nn.Module, precision: str):
    """Make ``backbone``'s output float32 under autocast (a forward hook; nothing for ``fp32``),
    so that what the methods compute from embeddings (prototypes, squared distances, attention
    and their softmax) runs in float32 while the convolutions run in half precision. A squared
    distance summed over hundreds of bfloat16 dimensions keeps 8 bits of mantissa: a logit of 100
    would be off by up to 0.4. Returns the hook's handle (or None)."""
    if precision == "fp32":
        return None
    return backbone.register_forward_hook(lambda module, args, output: output.float())


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """torch's loss scaler, enabled for ``fp16`` only (a disabled one passes calls through:
    ``scale`` returns the loss, ``step`` steps the optimiser)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
