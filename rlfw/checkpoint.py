"""Checkpoints that survive a crash at any point, and rlfw's own state in them.

A ``checkpoint-N`` directory only ever appears complete. transformers/TRL write the checkpoint under a staging
directory (``tmp-checkpoint-N/checkpoint-N``), rlfw adds its state (``rlfw_state.json``), every file and directory
is fsynced, and only then is it renamed to ``checkpoint-N`` (a rename within one file system is atomic). A process
killed while saving leaves a ``tmp-checkpoint-N`` directory behind, which neither :func:`latest_checkpoint` nor
transformers' ``get_last_checkpoint`` looks at and the next save removes. Rotation (``save_total_limit``) runs
after the rename, never deletes the newest checkpoint, and renames a doomed checkpoint to ``tmp-...`` before
deleting it, so a crash in the middle of a deletion cannot leave a half-deleted ``checkpoint-N`` either.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from rlfw.advantages.base import Stateful

logger = logging.getLogger(__name__)

STATE_FILE = "rlfw_state.json"
FORMAT_VERSION = 1
STAGING_PREFIX = "tmp-"
TRAINER_STATE_FILE = "trainer_state.json"  # written last by transformers' own _save_checkpoint
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"  # transformers' JIT checkpointing marks unfinished saves so


# ---------------------------------------------------------------- atomic files and directories
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # file systems that cannot open directories: nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and directory under ``root`` to disk (a rename must not outrun the data it publishes)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where transformers writes ``checkpoint-<step>`` until it is complete: ``<run_dir>/tmp-checkpoint-<step>``."""
    return Path(run_dir) / f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-{step}"


def prepare_staging(run_dir: str | os.PathLike, step: int) -> Path:
    """An empty staging directory for ``step``, after removing what crashed saves left behind (main process)."""
    for stale in Path(run_dir).glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
        logger.warning("Removing %s, left by a save that did not finish.", stale)
        shutil.rmtree(stale, ignore_errors=True)
    root = staging_dir(run_dir, step)
    root.mkdir(parents=True)
    return root


def publish(staged: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Rename the complete checkpoint ``staged`` to ``<run_dir>/<its name>`` after flushing it to disk.

    An existing checkpoint of that name (an earlier save of the same step, or one left by a run that went further
    before this one resumed from an earlier checkpoint) is renamed away first and deleted after.
    """
    staged, run_dir = Path(staged), Path(run_dir)
    _fsync_tree(staged)
    target = run_dir / staged.name
    replaced = None
    if target.exists():
        replaced = run_dir / f"{STAGING_PREFIX}{staged.name}-replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(target, replaced)
    os.rename(staged, target)
    _fsync_dir(run_dir)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    if staged.parent.name.startswith(STAGING_PREFIX):
        shutil.rmtree(staged.parent, ignore_errors=True)
    return target


def rotate(run_dir: str | os.PathLike, save_total_limit: int | None, newest: str | os.PathLike,
           best_model_checkpoint: str | None = None) -> None:
    """Keep at most ``save_total_limit`` checkpoints (transformers' order and rules), never ``newest`` or the best."""
    if not save_total_limit or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(str(run_dir), use_mtime=True, best_model_checkpoint=best_model_checkpoint)
    protected = {str(Path(newest))} | ({str(Path(best_model_checkpoint))} if best_model_checkpoint else set())
    excess = len(checkpoints) - max(save_total_limit, len(protected))
    for path in [c for c in checkpoints if c not in protected][:max(excess, 0)]:
        doomed = Path(path).with_name(f"{STAGING_PREFIX}{Path(path).name}-deleted")
        os.rename(path, doomed)  # gone from checkpoint-* at once; a crash mid-delete leaves only a tmp-* directory
        shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------- finding checkpoints to resume from
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a directory named ``checkpoint-N``, else None."""
    prefix, _, step = Path(path).name.rpartition("-")
    return int(step) if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() else None


def incomplete_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a checkpoint training can resume from, or None when it is one."""
    path = Path(path)
    if not path.is_dir():
        return "it is not a directory"
    if (path / INCOMPLETE_SENTINEL).exists():
        return f"it contains {INCOMPLETE_SENTINEL} (its save did not finish)"
    try:
        json.loads((path / TRAINER_STATE_FILE).read_text())
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE_FILE} (its save did not finish)"
    except (OSError, ValueError) as err:
        return f"its {TRAINER_STATE_FILE} is unreadable ({err})"
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete ``checkpoint-N`` with the largest N in ``output_dir``, or None; incomplete ones are skipped."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = sorted((step, p) for p in output_dir.iterdir() if (step := checkpoint_step(p)) is not None)
    for _, path in reversed(candidates):
        reason = incomplete_reason(path)
        if reason is None:
            return str(path)
        logger.warning("Skipping %s: %s.", path, reason)
    return None


# ---------------------------------------------------------------- rlfw's own state
def save_state(checkpoint_dir: str | os.PathLike, estimator: Any) -> None:
    """Save the estimator's state (``state_dict()``, JSON-serialisable) into the checkpoint directory."""
    state = {
        "format_version": FORMAT_VERSION,
        "estimator": estimator.name,
        "estimator_state": estimator.state_dict() if isinstance(estimator, Stateful) else {},
    }
    atomic_write_text(Path(checkpoint_dir) / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))


def load_state(checkpoint_dir: str | os.PathLike, estimator: Any) -> bool:
    """Restore the estimator's state from a checkpoint; False when the checkpoint has none (e.g. plain TRL)."""
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    name = estimator.name
    if state.get("estimator") != name:
        raise ValueError(
            f"Checkpoint {checkpoint_dir} was written with advantage_estimator={state.get('estimator')!r}, but this "
            f"run uses {name!r}. Resume with the same estimator, or start a new output_dir."
        )
    if isinstance(estimator, Stateful):
        estimator.load_state_dict(state["estimator_state"])
    return True
