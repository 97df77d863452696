"""Conditions: modules that turn a batch's condition fields into prefix tokens (class labels, prompts)."""

from typing import Any

from lina_pl.conditions.base import Condition
from lina_pl.conditions.class_label import ClassCondition
from lina_pl.conditions.text import TextCondition

CONDITIONS = {"class": ClassCondition, "text": TextCondition}


def create_condition(name: str, dim: int, **options: Any) -> Condition:
    """Build a condition by config name (``class``, ``text``) for a generator of width ``dim``."""
    if name not in CONDITIONS:
        raise ValueError(f"unknown condition {name!r}; choose from {', '.join(CONDITIONS)}")
    try:
        return CONDITIONS[name](dim, **options)
    except TypeError as err:
        raise ValueError(f"bad options for the {name!r} condition: {err}") from err


__all__ = ["CONDITIONS", "ClassCondition", "Condition", "TextCondition", "create_condition"]
