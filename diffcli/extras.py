"""Optional extras: packages only some flags need, installed with `pip install 'diffcli[EXTRA]'` (pyproject.toml's
[project.optional-dependencies]; `all` and `dev` install every one).

`require` is called where those flags are checked, before any model loads; it looks the package up without importing
it, so a plan (and `batch --dry-run`) still imports no torch. Where a package is finally imported, an ImportError
becomes the same message through `missing`.
"""

from __future__ import annotations

import importlib.util

from diffcli.errors import UsageError

EXTRAS = {  # import name -> (pip package, extra)
    "torchsde": ("torchsde", "sde"),  # --scheduler dpm++sde / dpm++sde-karras (diffusers' DPMSolverSDEScheduler)
    "peft": ("peft", "lora"),  # --lora, <lora:name> (diffusers' load_lora_weights)
    "DeepCache": ("DeepCache", "deepcache"),  # --deep-cache
    "dynamicprompts": ("dynamicprompts", "templates"),  # batch: {a|b} and __name__ templates
    "fastapi": ("fastapi", "server"),  # diffcli serve (with uvicorn)
    "uvicorn": ("uvicorn", "server"),
    "gguf": ("gguf", "gguf"),  # --model FILE.gguf (diffusers' GGUF quantizer reads the file with it)
    "openvino": ("openvino", "openvino"),  # --backend openvino (and auto's choice of it)
}


def missing(module: str, what: str) -> UsageError:
    """The one-line error (exit 2) for `what` (the flag or input that needs it) when `module` is not installed."""
    package, extra = EXTRAS[module]
    return UsageError(f"{what} needs the optional package {package}, which is not installed",
                      f"pip install 'diffcli[{extra}]'")


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed installation
        return False


def require(module: str, what: str) -> None:
    """Raise `missing(module, what)` unless `module` is installed."""
    if not available(module):
        raise missing(module, what)
