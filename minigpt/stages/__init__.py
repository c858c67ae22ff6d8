"""The training stages, one object each, and the rules every stage's settings follow.

    STAGES                  the registry: --stage's choices, in the order --help lists them
    stage_of(config)        the Stage object of a configuration
    check_stage_settings    refuse a setting that does not apply to the chosen stage

A new stage is one module (a `Stage` subclass, see minigpt/stages/base.py) and one entry below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from minigpt.config import PRESETS, RunConfig, TrainConfig, preset_config
from minigpt.errors import UserInputError
from minigpt.stages.base import Stage
from minigpt.stages.classify import ClassifyStage
from minigpt.stages.dpo import DPOStage
from minigpt.stages.pretrain import PretrainStage
from minigpt.stages.sft import SFTStage

STAGES: dict[str, Stage] = {stage.name: stage for stage in (PretrainStage(), SFTStage(), DPOStage(), ClassifyStage())}


def stage_named(name: str) -> Stage:
    if name not in STAGES:
        raise UserInputError(f"Unknown stage '{name}'; choose one of {', '.join(STAGES)}.")
    return STAGES[name]


def stage_of(config: RunConfig) -> Stage:
    return stage_named(config.train.stage)


def stages_with_setting(name: str) -> list[str]:
    """The stages a train.* setting applies to: those that list it, or every stage if none does."""
    listing = [stage.name for stage in STAGES.values() if name in stage.settings]
    return listing or list(STAGES)


def _is_off(value: Any) -> bool:
    """A value that asks for nothing: 0, empty, false, "none"."""
    return value in (0, "", False, "none") or value == {} or value == []


def check_stage_settings(config: RunConfig, given: Mapping[str, str] | None = None, source: str = "the configuration") -> None:
    """Refuse a setting that does not apply to the configuration's stage, in one sentence naming
    the stages it applies to.

    `given` maps the train.* settings the user gave on a command line (or a form) to the flag that
    set them: each of those is refused whatever its value. Any other setting is refused only if
    it asks for something: a value other than its default (or its preset's) and not off (0,
    empty, false). That lets a run's own config.json, which lists every setting, load for any
    stage, and a preset serve every stage.
    """
    stage = stage_of(config)
    foreign = [name for name in (spec.name for spec in dataclasses.fields(TrainConfig)) if stage.name not in stages_with_setting(name)]

    def applies_to(name: str) -> str:
        return " or ".join(f"--stage {other}" for other in stages_with_setting(name))

    for name in foreign:
        if given and f"train.{name}" in given:
            raise UserInputError(f"{given[f'train.{name}']} applies to {applies_to(name)} only, not to --stage {stage.name}; leave it out.")
    defaults = (preset_config(config.preset) if config.preset in PRESETS else RunConfig()).train  # what a preset sets is no request
    for name in foreign:
        value = getattr(config.train, name)
        if value != getattr(defaults, name) and not _is_off(value):
            raise UserInputError(f"{source} sets train.{name} = {value!r}, which applies to {applies_to(name)} only, "
                                 f"not to --stage {stage.name}; remove it.")
    stage.check(config)


__all__ = ["STAGES", "Stage", "check_stage_settings", "stage_named", "stage_of", "stages_with_setting"]
