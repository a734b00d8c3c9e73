"""train.loggers `wandb`: the run's reports in a Weights & Biases run (the `wandb` extra: pip install -e .[wandb]).

Where: project train.wandb_project, else WANDB_PROJECT, else `dist_seg`; entity train.wandb_entity, else
WANDB_ENTITY, else the API key's default. W&B's own variables apply as usual: WANDB_API_KEY (the only place
for the key), WANDB_MODE=offline (the run is written to train.out_dir/wandb/, for `wandb sync` later),
WANDB_BASE_URL for a W&B server of your own, WANDB_RUN_GROUP and WANDB_TAGS to group folds or sweeps.
What lands where in the W&B run:

- config: the resolved config, nested by section (URLs redacted);
- history: every scalar at its step, and the images (wandb.Image) at theirs;
- summary: final/<metric> (besides W&B's own last value of each scalar);
- exit: 0 finished, 75 preempted (marked preempting first, so W&B expects the resume), 1 failed.

The console is not captured (W&B's `console="off"`): the training log stays the process's own, and a stalled
W&B cannot hold up a print. The W&B run id is the training run's key (TrackerSetup.run_key, kept in every
checkpoint) with resume="allow", so a resume continues the same run (online, W&B itself refuses steps below
the run's current one; offline, the run directory's trackers.json tells which steps the interrupted attempt
already wrote).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dist_seg.runtime.preemption import PREEMPTED_EXIT_CODE
from dist_seg.train.tracker_api import ConfigReport, TrackedRun, TrackerSetup

DEFAULT_PROJECT = "dist_seg"
EXIT_CODES = {"finished": 0, "preempted": PREEMPTED_EXIT_CODE, "failed": 1}


class WandbTracker:
    def __init__(self, setup: TrackerSetup) -> None:
        self.setup = setup
        self.run: Any = None

    def open(self) -> TrackedRun:
        import wandb

        t, out = self.setup.cfg.train, self.setup.out_dir
        out.mkdir(parents=True, exist_ok=True)
        self.run = run = wandb.init(
            project=t.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            entity=t.wandb_entity,
            name=self.setup.run_name,
            id=self.setup.run_key,  # every attempt of the training run: the same W&B run
            resume="allow",  # continue it when it exists, else start it
            dir=str(out),
            reinit="create_new",  # the run is this object's, not the process's global one
            settings=wandb.Settings(console="off"),
        )
        if run.disabled:
            mode = "disabled by WANDB_MODE: nothing is recorded"
        else:
            mode = f"offline, in {out / 'wandb'}" if run.offline else run.url or "online"
        how = "new run" if self.setup.resumed_step is None else "run"
        where = f"{how} {run.id} in project {run.project!r} ({mode})"
        # online, a resumed run's step is the next one W&B expects; offline it is 0 (trackers.json knows more)
        return TrackedRun(run.id, max(run.step - 1, 0), where)

    def config(self, report: ConfigReport, step: int) -> None:
        self.run.config.update(report.tree, allow_val_change=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(image)}, step=step)

    def final(self, settings: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in metrics.items()})

    def close(self, outcome: str) -> None:
        if outcome == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=EXIT_CODES[outcome])
