"""rlfw's own state in checkpoints, next to TRL's model/optimizer/scheduler/RNG/trainer state.

Written atomically (temporary file, fsync, rename), so a crash while saving never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "rlfw_state.json"
FORMAT_VERSION = 1


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(checkpoint_dir: str | os.PathLike, estimator: Any) -> None:
    """Save the estimator's state (``state_dict()``, JSON-serialisable) into the checkpoint directory."""
    state_dict = getattr(estimator, "state_dict", None)
    state = {
        "format_version": FORMAT_VERSION,
        "estimator": getattr(estimator, "name", type(estimator).__name__),
        "estimator_state": state_dict() if state_dict is not None else {},
    }
    atomic_write_text(Path(checkpoint_dir) / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))


def load_state(checkpoint_dir: str | os.PathLike, estimator: Any) -> bool:
    """Restore the estimator's state from a checkpoint; False when the checkpoint has none (e.g. plain TRL)."""
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    name = getattr(estimator, "name", type(estimator).__name__)
    if state.get("estimator") != name:
        raise ValueError(
            f"Checkpoint {checkpoint_dir} was written with advantage_estimator={state.get('estimator')!r}, but this "
            f"run uses {name!r}. Resume with the same estimator, or start a new output_dir."
        )
    load = getattr(estimator, "load_state_dict", None)
    if load is not None:
        load(state["estimator_state"])
    return True
