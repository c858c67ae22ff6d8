"""Saving and loading runs so that nothing is ever lost.

Every file and directory is written atomically (`minigpt.files`): a crash at any instant leaves
the old version or the new one, never half of a file. Loading never unpickles arbitrary objects: weights are safetensors and the
training state goes through `torch.load(weights_only=True)`.

A checkpoint directory `checkpoint_step_<N>/` holds:
    model.safetensors  the weights
    state.pt           optimizer, data-stream position, RNG states, counters
    meta.json          step, validation loss, time (small and human-readable)
    manifest.json      each file's size and SHA-256 sum, written last (see `minigpt.files`)

The manifest is checked before anything is loaded, so a checkpoint damaged after it was written
(a truncated copy, a flipped bit) is reported by name instead of failing obscurely inside torch
or, worse, loading wrong numbers. `--resume` then falls back to the newest checkpoint that is
intact. final_model/ carries a manifest too, checked when `minigpt.model_folder.load` reads it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from minigpt.config import RunConfig
from minigpt.errors import UserInputError
from minigpt.files import TEMPORARY_PREFIX, fault_point, verify_manifest, write_directory_atomically
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.checkpoint")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_step_(\d+)$")
SAFETENSORS_METADATA = {"format": "pt"}  # what other safetensors loaders (transformers among them) expect


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's weights as safetensors. When some are frozen (a LoRA run's base model), only
    the trainable ones: the frozen ones are the base model's file, which the run refers to by
    path and checksum instead of copying it into every checkpoint."""
    if all(parameter.requires_grad for parameter in model.parameters()):
        save_model(model, str(path), metadata=SAFETENSORS_METADATA)  # drops the tied duplicate matrix
    else:
        trainable = {name: parameter.detach().contiguous() for name, parameter in model.named_parameters() if parameter.requires_grad}
        save_file(trainable, str(path), metadata=SAFETENSORS_METADATA)


def write_model_files(directory: Path, config: RunConfig, tokenizer: Tokenizer) -> None:
    """config.json and tokenizer.json: with them a directory of weights loads on its own."""
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tokenizer.save(directory / "tokenizer.json")


def save_checkpoint(
    run_dir: str | Path, step: int, model: torch.nn.Module, training_state: dict[str, Any], meta: dict[str, Any],
    config: RunConfig | None = None, tokenizer: Tokenizer | None = None,
) -> Path:
    """Write `checkpoint_step_<step>/` atomically; `training_state` must hold only tensors and plain
    values. Given the run's config and tokenizer (the trainer always gives them), the checkpoint
    holds them too, so a copy of it elsewhere loads alone."""

    def fill(directory: Path) -> None:
        save_weights(model, directory / "model.safetensors")
        fault_point("after_weights")
        torch.save(training_state, directory / "state.pt")
        (directory / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True) + "\n")
        if config is not None and tokenizer is not None:
            write_model_files(directory, config, tokenizer)

    return write_directory_atomically(Path(run_dir) / f"checkpoint_step_{step}", fill, manifest=True)


def load_checkpoint(checkpoint_dir: str | Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `model`; return (training_state, meta). Damage is reported in one sentence."""
    directory = Path(checkpoint_dir)
    missing = [name for name in ("model.safetensors", "state.pt", "meta.json") if not (directory / name).is_file()]
    if missing:
        raise UserInputError(f"{directory} is not a complete checkpoint (missing {', '.join(missing)}).")
    verify_manifest(directory)  # a checkpoint written before manifests existed has none, and loads unchecked
    load_weights(model, directory / "model.safetensors")
    state_file = directory / "state.pt"
    try:
        # weights_only: tensors and plain values only. A pickle can name any function to call
        # while it is read (that is how it rebuilds objects), so a full unpickle of a file from
        # elsewhere could run any code; this one refuses before calling anything.
        training_state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserInputError(
            f"{state_file} holds Python objects other than tensors and plain values; it was refused unread, "
            "because loading such objects can run code."
        ) from None
    except (RuntimeError, EOFError) as error:
        raise UserInputError(f"{state_file} is damaged and cannot be read ({str(error).splitlines()[0]}).") from None
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserInputError(f"{directory / 'meta.json'} is damaged (not valid JSON).") from None
    return training_state, meta


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors file into `model`, explaining a mismatch in one sentence. A model with
    frozen parameters (a LoRA run) loads only its trainable ones: the rest is its base model."""
    device = str(next(model.parameters()).device)
    try:
        if all(parameter.requires_grad for parameter in model.parameters()):
            load_model(model, str(path), device=device)
            return
        missing, unexpected = model.load_state_dict(load_file(str(path), device=device), strict=False)
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        if unexpected or set(missing) & trainable:
            raise RuntimeError(f"missing {sorted(set(missing) & trainable)[:3]}, unexpected {unexpected[:3]}")
    except SafetensorError as error:  # cut short, or its header damaged (a folder without a manifest to tell)
        raise UserInputError(f"The weights file {path} is damaged ({error}); save or train the model again.") from None
    except RuntimeError as error:
        raise UserInputError(f"The weights in {path} do not fit this model's configuration ({str(error).splitlines()[0]}).") from None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(match.group(1)), entry) for entry in run_dir.iterdir() if (match := CHECKPOINT_PATTERN.match(entry.name))]
    return [entry for _, entry in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def latest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files match its manifest, saying in one log line which newer
    one was skipped and why. Checkpoints are kept in twos and threes exactly for this."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verify_manifest(checkpoint)
        except UserInputError as damage:
            log.warning("Skipping checkpoint %s: %s Falling back to the previous one.", checkpoint.name, damage)
            continue
        return checkpoint
    return None


def _metric(checkpoint: Path, metric: str) -> float | None:
    """`metric` from a checkpoint's meta.json, or None if it has none (or its meta.json is damaged)."""
    try:
        value = json.loads((checkpoint / "meta.json").read_text(encoding="utf-8")).get(metric)
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def prune_checkpoints(run_dir: str | Path, keep: int, metric: str = "val_loss", higher_is_better: bool = False) -> list[Path]:
    """Delete all but the `keep` newest checkpoints, always sparing the best by `metric` (read
    from each checkpoint's meta.json; checkpoints saved without an evaluation have none)."""
    fault_point("after_rename_before_prune")
    checkpoints = list_checkpoints(run_dir)
    scored = []
    for checkpoint in checkpoints:
        value = _metric(checkpoint, metric)
        if value is not None:
            scored.append((-value if higher_is_better else value, checkpoint))
    spared = set(checkpoints[-keep:])
    if scored:
        spared.add(min(scored, key=lambda pair: pair[0])[1])
    removed = [checkpoint for checkpoint in checkpoints if checkpoint not in spared]
    for checkpoint in removed:
        # Rename first: a crash halfway through the deletion must not leave a broken checkpoint
        # under a name that looks complete.
        retired = checkpoint.parent / f"{TEMPORARY_PREFIX}{checkpoint.name}"
        os.replace(checkpoint, retired)
        fault_point("during_prune")
        shutil.rmtree(retired)
    return removed
