"""MiniGPT: a from-scratch, educational GPT framework.

The main pieces, for notebooks and scripts:

    from minigpt import GPT, generate, prepare_run, preset_config
    from minigpt import model_folder     # model_folder.load(path): any model folder a command takes

They are imported on first use (so `minigpt --version` starts without loading PyTorch).
"""

from __future__ import annotations

import importlib
from typing import Any

from minigpt.version import __version__

PUBLIC_API = {  # name -> the module that defines it
    "GPT": "minigpt.model",
    "RunConfig": "minigpt.config", "preset_config": "minigpt.config", "load_config": "minigpt.config",
    "apply_overrides": "minigpt.config",
    "prepare_run": "minigpt.run", "Trainer": "minigpt.trainer", "Callback": "minigpt.trainer",
    "LanguageModelObjective": "minigpt.objective",
    "load_tokenizer": "minigpt.tokenizer",
    "generate": "minigpt.generation", "evaluate": "minigpt.evaluation",
    "Engine": "minigpt.engine", "Request": "minigpt.engine", "SamplingConfig": "minigpt.engine",
    "ChatSession": "minigpt.chat",
}
__all__ = ["__version__", *PUBLIC_API]


def __getattr__(name: str) -> Any:
    if name in PUBLIC_API:
        return getattr(importlib.import_module(PUBLIC_API[name]), name)
    raise AttributeError(f"module 'minigpt' has no attribute {name!r}")
