"""The one way a piece of the step reaches a callback it works with: by type, from the trainer's callback list."""

from __future__ import annotations

from typing import Any

import lightning as L

from cipo_lightning.errors import ConfigError


def the_callback(trainer: L.Trainer, kind: type[L.Callback], section: str, needed_by: str, hint: str = "") -> Any:
    """The trainer's one callback of type `kind`; a ConfigError naming the CLI section that adds it otherwise."""
    found = [c for c in trainer.callbacks if isinstance(c, kind)]
    if len(found) != 1:
        raise ConfigError(
            f"{needed_by} needs exactly one {kind.__name__} callback in the trainer (the CLI's `{section}` "
            f"section adds it), found {len(found)}{hint}"
        )
    return found[0]
