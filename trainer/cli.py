"""``asd-train`` command line: training, evaluation and publishing of model bundles."""

from __future__ import annotations

import sys
from typing import Sequence

from stream_asd.cli import dispatch

COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("trainer.fit", "train the ensemble (or the AE baseline) on normal audio and write a model bundle"),
    "evaluate": ("trainer.evaluate", "AUC/pAUC/recall per machine type and id, ROC and FAR-FRR plots, report"),
    "publish": ("trainer.publish", "quality-gate a bundle against the current model and publish it to a registry"),
    "rollback": ("trainer.publish_rollback", "move a registry's current pointer back to an earlier version"),
    "job": ("trainer.job", "the whole cycle for a CronJob: select archive data, fit, evaluate, gate, publish"),
    "synth": ("trainer.synth_cli", "write a synthetic machine-sound data set (DCASE2020 layout) for tests and demos"),
}


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(COMMANDS, "asd-train", "Train, evaluate and publish stream-asd model bundles.", argv)


if __name__ == "__main__":
    sys.exit(main())
