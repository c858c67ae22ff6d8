"""What a model folder holds, and the one way every command loads and saves one.

A user names a folder; MiniGPT has to know what is in it before it can load it. This module is
the only place that looks:

    identify(path)      which kind of folder it is (a `ModelFolder`), or one sentence saying why not
    load(path, device)  the model, its tokenizer and its run configuration (a `LoadedModel`)
    load_language_model / load_classifier
                        `load`, refusing in one sentence a folder the caller cannot use
    save_model_directory, save_adapter
                        write the folders that `load` reads back

The kinds of folder (`FolderKind`):

    LANGUAGE_MODEL  MiniGPT weights: final_model/ or checkpoint_step_<N>/ (model.safetensors,
                    config.json, tokenizer.json; a checkpoint of an older run finds the last two
                    in its run directory). A run directory stands for its final_model/, or for
                    its latest checkpoint while it has none.
    CLASSIFIER      the same files, from `train-classifier`: config.json records stage "classify"
                    and the label maps, which give the heads their sizes.
    LORA_ADAPTER    a LoRA run's final_model/: only the adapter matrices (lora_adapter.safetensors)
                    and their recipe (lora_adapter.json: rank, alpha, dropout, targets, and the base
                    model's path with the SHA-256 of its weights), next to the run's config.json and
                    tokenizer.json. Loading puts the adapter on the recorded base, which must be
                    unchanged. Older runs wrote adapter.safetensors + adapter_config.json: they still
                    load, told apart from a PEFT adapter by their keys (PEFT's have "peft_type").
                    A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, as
                    `save_pretrained` or `minigpt export --format peft` write it) is one too: its
                    settings and tensor names are read into MiniGPT's LoRA (export.lora_config_from_peft,
                    lora_weights_from_peft), on the base folder its base_model_name_or_path names.
                    PEFT records no checksum of the base, so only the shapes are checked.
    HUGGING_FACE    a transformers folder (config.json with a "model_type") of a supported family
                    (minigpt.families: Llama, Qwen2, Qwen3, Gemma 3), converted on load: safetensors
                    weights, one file or shards, read tensor by tensor.

Refused, each in one sentence: a checkpoint of a LoRA run (adapter weights in the middle of
training), a PEFT adapter MiniGPT's LoRA cannot compute (DoRA, rsLoRA, ...), and a folder holding
none of the above.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from minigpt.checkpoint import SAFETENSORS_METADATA, latest_checkpoint, load_weights, write_model_files
from minigpt.config import RunConfig, load_config, validate_model
from minigpt.errors import UserInputError
from minigpt.export import PEFT_CONFIG, PEFT_WEIGHTS, lora_config_from_peft, lora_weights_from_peft
from minigpt.families import check_fits_in_memory, load_model as load_hugging_face_model, weight_files
from minigpt.files import file_sha256, verify_manifest, write_directory_atomically
from minigpt.heads import GPTClassifier
from minigpt.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_state_dict, merge_lora
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer, load_folder_tokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
# MiniGPT's own adapter files. Deliberately not PEFT's names (adapter_config.json,
# adapter_model.safetensors): a folder's file names alone then say whose format it is.
LORA_ADAPTER_WEIGHTS = "lora_adapter.safetensors"
LORA_ADAPTER_CONFIG = "lora_adapter.json"
# What MiniGPT wrote before: the same contents under these names (the config's name is PEFT's).
OLD_ADAPTER_WEIGHTS = "adapter.safetensors"
OLD_ADAPTER_CONFIG = "adapter_config.json"
EXPECTED = "give a final_model/ directory, a checkpoint_step_<N>/ directory, a run directory or a Hugging Face model folder"


class FolderKind(Enum):
    """What a model folder holds; the value is how a sentence names it."""

    LANGUAGE_MODEL = "a MiniGPT language model"
    CLASSIFIER = "a MiniGPT classifier"
    LORA_ADAPTER = "a LoRA adapter"
    HUGGING_FACE = "a Hugging Face model"


FULL_WEIGHTS = (FolderKind.LANGUAGE_MODEL, FolderKind.HUGGING_FACE)  # what a LoRA adapter can sit on


@dataclass(frozen=True)
class ModelFolder:
    """A folder whose kind is known. `path` holds the weights (a run directory has been resolved to
    its final_model/ or latest checkpoint); `files` holds config.json and tokenizer.json, which is
    `path` itself except for a checkpoint of an older run (its run directory)."""

    kind: FolderKind
    path: Path
    files: Path


@dataclass
class AdapterRun:
    """A LoRA adapter's recipe: adapters shaped by `config` on the frozen base model at `base_path`,
    whose weights file had the SHA-256 `base_sha256` when training started. A LoRA training run
    records it in its checkpoints and final adapter; loading an adapter reads it back
    (`read_adapter`), and a changed base is refused, on resume as on load. A PEFT adapter records
    no checksum: `base_sha256` is then empty, and only the shapes are checked."""

    config: LoRAConfig
    base_path: str
    base_sha256: str

    @classmethod
    def start(cls, config: LoRAConfig, base_path: str | Path) -> "AdapterRun":
        """The recipe of a run about to train adapters on `base_path` (its checksum taken now)."""
        return cls(config, str(Path(base_path).resolve()), base_model_checksum(base_path))

    def save(self, directory: Path, model: nn.Module, extra_files: Callable[[Path], None]) -> Path:
        return save_adapter(directory, model, self.config, self.base_path, self.base_sha256, extra_files)


@dataclass
class LoadedModel:
    """What `load` returns: everything a command needs from a model folder.

    model      a GPT (a GPTClassifier for a classifier), in eval mode on the device asked for
    tokenizer  the tokenizer whose ids the model's embeddings mean
    config     the run configuration: the folder's config.json; for an adapter, the fine-tuning
               run's own (when its folder has one) rather than its base's; for a Hugging Face
               folder, its model shape with default training settings
    kind       what the folder holds
    source     the folder the weights came from (a run directory resolved, see `identify`)
    adapter    for a LoRA adapter, its recipe (LoRA settings, base path and checksum), else None
    """

    model: GPT
    tokenizer: Tokenizer
    config: RunConfig
    kind: FolderKind
    source: Path
    adapter: AdapterRun | None = None

    @property
    def stage(self) -> str:
        """The training stage recorded: "pretrain", "sft" (chat-tuned), "dpo" (preference-tuned) or "classify"."""
        return self.config.train.stage

    @property
    def is_classifier(self) -> bool:
        return self.kind is FolderKind.CLASSIFIER


# ----------------------------------------------------------------------------- what a folder holds


def identify(path: str | Path) -> ModelFolder:
    """Say what `path` holds, reading only small files (no weights are loaded or checked here).

    The checks go from the most specific to the least: a Hugging Face config, MiniGPT weights,
    an adapter (MiniGPT's or PEFT's), and last a run directory, which stands
    for its final_model/ or, while it has none, its latest checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"Model path {path} does not exist or is not a directory.")
    if is_hugging_face_folder(path):
        return ModelFolder(FolderKind.HUGGING_FACE, path, path)
    if (path / WEIGHTS_FILE).is_file():
        files = path if (path / "config.json").is_file() else path.parent  # an older run's checkpoint: its run directory
        if (files / "config.json").is_file() and (files / "tokenizer.json").is_file():
            if "base_model_sha256" in _read_json(path / "meta.json", missing={}):
                raise UserInputError(
                    f"{path} is a checkpoint of a LoRA run, which holds adapter weights in the middle of training; "
                    "continue the run with --resume, or give its final_model/ once it has finished."
                )
            train = _read_json(files / "config.json").get("train") or {}
            classifier = train.get("stage") == "classify" and bool(train.get("label_maps"))
            return ModelFolder(FolderKind.CLASSIFIER if classifier else FolderKind.LANGUAGE_MODEL, path, files)
    elif (path / LORA_ADAPTER_CONFIG).is_file():
        return ModelFolder(FolderKind.LORA_ADAPTER, path, path)
    elif (path / OLD_ADAPTER_CONFIG).is_file():  # PEFT's adapter_config.json, or an older MiniGPT run's
        return ModelFolder(FolderKind.LORA_ADAPTER, path, path)
    elif (path / "final_model").is_dir():
        return identify(path / "final_model")
    elif (checkpoint := latest_checkpoint(path)) is not None:
        return identify(checkpoint)
    raise UserInputError(f"{path} holds no model: {EXPECTED}.")


def is_hugging_face_folder(path: str | Path) -> bool:
    """True if `path` has a Hugging Face config.json, which names its `model_type` (a MiniGPT
    config.json has "model" and "train" sections instead)."""
    config = Path(path) / "config.json"
    return config.is_file() and "model_type" in _read_json(config)


def _read_json(path: Path, missing: Any = None) -> dict:
    """A small JSON file of a model folder as a dict; `missing` if the file is absent (when given)."""
    if missing is not None and not path.is_file():
        return missing
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path} cannot be read as JSON ({error}).") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{path} does not hold a JSON object.")
    return value


# ----------------------------------------------------------------------------- loading


def load(path: str | Path, device: str | torch.device = "cpu", merge_adapter: bool = True) -> LoadedModel:
    """Load whatever model `path` holds (see `identify`), on `device`, in eval mode.

    A LoRA adapter comes on its base model, merged into it unless `merge_adapter` is False
    (merged, it is a plain GPT that runs at full speed; unmerged, its adapter matrices can be
    read, as `export --format peft` does). Weights are checked against the folder's manifest.
    """
    folder = identify(path)
    if folder.kind is FolderKind.LORA_ADAPTER:
        return _load_adapter(folder, device, merge_adapter)
    if folder.kind is FolderKind.HUGGING_FACE:
        model, tokenizer, config = _load_hugging_face(folder.path)
        return LoadedModel(model.to(device), tokenizer, config, folder.kind, folder.path)
    verify_manifest(folder.path)  # final_model/ and checkpoints; folders written before manifests existed have none
    source = str(folder.files / "config.json")
    config = load_config(source)
    try:
        validate_model(config.model)  # a damaged or hostile config.json is refused before anything is allocated
        if config.model.vocab_size < 1:
            raise UserInputError("it records no model.vocab_size, so it is not a saved model's configuration.")
    except UserInputError as error:
        raise UserInputError(f"{source} describes a model MiniGPT cannot build: {error}") from None
    check_fits_in_memory(config.model, source, bytes_per_weight=4)  # built in float32, then the weights are read
    model = (GPTClassifier(config) if folder.kind is FolderKind.CLASSIFIER else GPT(config.model)).to(device)
    load_weights(model, folder.path / WEIGHTS_FILE)
    return LoadedModel(model.eval(), load_tokenizer(folder.files / "tokenizer.json"), config, folder.kind, folder.path)


def load_language_model(path: str | Path, device: str | torch.device = "cpu", merge_adapter: bool = True) -> LoadedModel:
    """`load`, for what predicts the next token (generate, chat, evaluate, export, train --init-from):
    a MiniGPT model, a LoRA adapter on its base, or a Hugging Face model. A classifier is refused."""
    loaded = load(path, device, merge_adapter)
    if loaded.kind is FolderKind.CLASSIFIER:
        raise UserInputError(
            f"{path} is a classifier (trained by train-classifier), not a language model; "
            "run it with `minigpt classify`, or give a language model's folder."
        )
    return loaded


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """`load`, for `classify`: a classifier, with its heads and label maps (`config.train.label_maps`)."""
    loaded = load(path, device)
    if loaded.kind is not FolderKind.CLASSIFIER:
        raise UserInputError(
            f"{path} holds {loaded.kind.value}, not a classifier; train one with train-classifier "
            "(--init-from can start it from this model)."
        )
    return loaded


def _load_hugging_face(folder: Path) -> tuple[GPT, Tokenizer, RunConfig]:
    """The one place a Hugging Face folder becomes a MiniGPT model: the family's weights in
    float32 (minigpt.families, which refuses other families in one sentence), its tokenizer, and
    a RunConfig whose `model` section describes it (training settings are the defaults)."""
    model = load_hugging_face_model(folder)
    tokenizer = load_folder_tokenizer(folder)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserInputError(f"{folder}: vocab_size {model.config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens.")
    return model, tokenizer, RunConfig(model=model.config)


def read_adapter(directory: str | Path) -> AdapterRun:
    """The recipe in an adapter folder's lora_adapter.json (or an older run's adapter_config.json,
    or PEFT's adapter_config.json)."""
    directory = Path(directory)
    path = directory / (LORA_ADAPTER_CONFIG if (directory / LORA_ADAPTER_CONFIG).is_file() else OLD_ADAPTER_CONFIG)
    record = _read_json(path)
    if _is_peft(record):
        config, base = lora_config_from_peft(record, str(path))
        return AdapterRun(config, base, base_sha256="")
    try:
        config = LoRAConfig(rank=record["rank"], alpha=record["alpha"], dropout=record["dropout"], targets=record["targets"])
        return AdapterRun(config, record["base_model"], record["base_model_sha256"])
    except (KeyError, TypeError) as error:
        raise UserInputError(f"{path} lacks the adapter's setting {error}; train the adapter again.") from None


def _is_peft(record: dict) -> bool:
    """Whether an adapter_config.json is PEFT's (it names its "peft_type"), not an older MiniGPT run's."""
    return "peft_type" in record


def base_model_files(base_path: str | Path) -> list[Path]:
    """The weights files of the model a LoRA adapter sits on: a MiniGPT language model (final_model/,
    a checkpoint or a run directory) or a Hugging Face folder (one file, or its shards). An adapter
    or a classifier is refused."""
    folder = identify(base_path)
    if folder.kind not in FULL_WEIGHTS:
        raise UserInputError(
            f"{base_path} holds {folder.kind.value}, but LoRA trains on a language model's whole weights; "
            + ("merge it with `minigpt merge-lora` and start from the merged folder." if folder.kind is FolderKind.LORA_ADAPTER
               else "start from a language model.")
        )
    return weight_files(folder.path) if folder.kind is FolderKind.HUGGING_FACE else [folder.path / WEIGHTS_FILE]


def base_model_checksum(base_path: str | Path) -> str:
    """The SHA-256 an adapter records of its base: of the weights file, or for a sharded Hugging
    Face folder, of its shards' checksums one after another."""
    files = base_model_files(base_path)
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(file) for file in files).encode()).hexdigest()


def _load_adapter(folder: ModelFolder, device: str | torch.device, merge_adapter: bool) -> LoadedModel:
    """The recorded base model with the adapter applied and loaded. Refused, in one sentence, when
    the base's weights are not the ones the adapter was trained on: an adapter is a correction to
    one exact set of weights."""
    adapter = read_adapter(folder.path)
    if not adapter.base_sha256:  # PEFT records no checksum: only check that the base holds a language model's weights
        base_model_files(adapter.base_path)
    elif base_model_checksum(adapter.base_path) != adapter.base_sha256:
        raise UserInputError(
            f"The base model in {adapter.base_path} has changed since the adapter in {folder.path} was trained on it "
            "(its SHA-256 differs); restore that base model or train the adapter again."
        )
    base = load(adapter.base_path, device)
    model = apply_lora(base.model, adapter.config)
    peft = not (folder.path / LORA_ADAPTER_CONFIG).is_file() and _is_peft(_read_json(folder.path / PEFT_CONFIG))  # as read_adapter decides
    weights = folder.path / (PEFT_WEIGHTS if peft else LORA_ADAPTER_WEIGHTS if (folder.path / LORA_ADAPTER_WEIGHTS).is_file()
                             else OLD_ADAPTER_WEIGHTS)
    try:
        state = load_file(str(weights), device=str(device))
    except (OSError, SafetensorError) as error:
        raise UserInputError(f"{weights} is unreadable or missing ({error}); save or train the adapter again.") from None
    if peft:
        state = lora_weights_from_peft(state, model.config, str(weights))
    load_lora_state_dict(model, state)
    if merge_adapter:
        model = merge_lora(model)
    config = load_config(str(folder.path / "config.json")) if (folder.path / "config.json").is_file() else base.config
    return LoadedModel(model.eval(), base.tokenizer, config, FolderKind.LORA_ADAPTER, folder.path, adapter)


# ----------------------------------------------------------------------------- saving


def save_model_directory(directory: str | Path, model: GPT, config: RunConfig, tokenizer: Tokenizer) -> Path:
    """A self-contained folder of MiniGPT weights (model.safetensors, config.json, tokenizer.json,
    manifest.json), written atomically: a language model's final_model/, a merged adapter, or a
    classifier's final_model/.

    A classifier's folder holds the same files; its config.json (stage "classify" and the label
    maps) is what `identify` knows it by, so the model and the configuration must agree.
    """
    classifier_config = config.train.stage == "classify" and bool(config.train.label_maps)
    if isinstance(model, GPTClassifier) != classifier_config or (classifier_config and model.label_maps != config.train.label_maps):
        raise ValueError("A classifier is saved with its own configuration (stage classify, its label maps), and only a classifier is.")

    def fill(temporary: Path) -> None:
        # save_model rather than a state dict: it stores a tied matrix once, and every weight,
        # frozen or not (a linear probe's frozen trunk is part of the model too).
        save_model(model, str(temporary / WEIGHTS_FILE), metadata=SAFETENSORS_METADATA)
        write_model_files(temporary, config, tokenizer)

    return write_directory_atomically(directory, fill, manifest=True)


def save_adapter(
    directory: str | Path, model: nn.Module, config: LoRAConfig, base_model_path: str | Path, base_checksum: str,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write lora_adapter.safetensors and lora_adapter.json atomically into `directory`.

    The JSON records the LoRA settings, the base model's absolute path and the SHA-256 of its
    weights (`base_model_checksum(path)`, computed once when training starts), so that
    loading refuses a base that has changed since. `extra_files(temporary_directory)` may add files
    to the same atomic write (a run's config.json and tokenizer.json, say).
    """
    record = {**asdict(config), "targets": list(config.targets),
              "base_model": str(Path(base_model_path).resolve()), "base_model_sha256": base_checksum}

    def fill(temporary: Path) -> None:
        tensors = {name: tensor.contiguous() for name, tensor in lora_state_dict(model).items()}
        save_file(tensors, str(temporary / LORA_ADAPTER_WEIGHTS), metadata=SAFETENSORS_METADATA)
        (temporary / LORA_ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        if extra_files is not None:
            extra_files(temporary)

    return write_directory_atomically(directory, fill)
