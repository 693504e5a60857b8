"""Restoring trials: the checkpoint Tune restores a trial from exists when Tune looks for it.

Tune deletes a trial's older checkpoint (`CheckpointConfig(num_to_keep)`) as soon as it
registers a newer one, but writes the experiment state only at its next step. A driver killed
in between leaves a state that restores the trial from a checkpoint that is gone: Tune's
`Trainable.restore` raises "Could not recover from checkpoint as it does not exist on storage
anymore" on every retry and the trial fails (tests/test_resume.py: in both CI attempts on a
2-core machine, and once in five runs here with the other core busy). The newer checkpoint was
written in full before Tune registered it, so `CheckpointRepair` copies it back under the name
Tune remembers, on the driver, after the trial's actor starts and before Tune restores it. The
trial goes on from there; Tune's own bookkeeping, which deletes that name when the trial
reports again, stays consistent.
"""

from __future__ import annotations

import logging
import posixpath
import re
from typing import Any

from ray.tune import Callback

from jobs.training import STATE_FILE

log = logging.getLogger(__name__)

_CHECKPOINT_DIR = re.compile(r"checkpoint_\d+")


def restorable(checkpoint: Any) -> Any:
    """`checkpoint` (a `ray.tune.Checkpoint`), rebuilt from the trial's next complete
    checkpoint where it is gone; a clear error where nothing can rebuild it."""
    import pyarrow.fs as pafs

    filesystem, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        return checkpoint
    parent, name = posixpath.split(path)
    newer = sorted(
        info.path
        for info in filesystem.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        if info.type == pafs.FileType.Directory
        and _CHECKPOINT_DIR.fullmatch(info.base_name)
        and info.base_name > name
        and filesystem.get_file_info(posixpath.join(info.path, STATE_FILE)).type
        == pafs.FileType.File
    )
    if not newer:
        raise FileNotFoundError(
            f"the checkpoint to restore this trial from, {path}, is gone and no later "
            f"checkpoint (with {STATE_FILE}) is beside it in {parent}"
        )
    # The first later one is the one Tune registered (a later one may be half written).
    log.warning("checkpoint %s is gone (deleted by Tune); restoring from %s", path, newer[0])
    # Staged under another name and moved: a process killed mid-copy leaves no half checkpoint.
    staged = f"{path}.restoring"
    filesystem.delete_dir_contents(staged, missing_dir_ok=True)
    filesystem.create_dir(staged)
    pafs.copy_files(
        newer[0], staged, source_filesystem=filesystem, destination_filesystem=filesystem
    )
    filesystem.move(staged, path)
    return checkpoint


class CheckpointRepair(Callback):
    """Tune callback: before a (re)started trial is restored, its checkpoint exists."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        try:
            restorable(checkpoint)
        except Exception as error:  # Tune's own restore then fails the trial, with its error
            log.error("trial %s: %s", trial.trial_id, error)
