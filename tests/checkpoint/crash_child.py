"""Child process for the crash test: save step 1, then a slow save of step 2 that pauses at a hook.

    python -m tests.checkpoint.crash_child RUN_DIR STOP_AT MODE

The storage writer announces each hook (before writing a part's data, before writing
its metadata) in RUN_DIR/progress; at hook number STOP_AT it writes "PAUSED" and
sleeps, so the parent can SIGKILL it at a known point of the save.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter

from cosmos_train.checkpoint.manager import Checkpointer
from tests.checkpoint.toy import build, spec, train_steps


class PausingWriter(FileSystemWriter):
    """A FileSystemWriter with numbered hooks; pauses for good at hook `stop_at`."""

    counter = [0]

    def __init__(self, path, *, progress: Path, stop_at: int) -> None:
        super().__init__(path)
        self.progress, self.stop_at = progress, stop_at

    def _hook(self, what: str) -> None:
        n = self.counter[0]
        self.counter[0] += 1
        with open(self.progress, "a") as f:
            f.write(f"{n} {what} {self.path}\n")
        if n == self.stop_at:
            with open(self.progress, "a") as f:
                f.write("PAUSED\n")
            time.sleep(120)

    def write_data(self, plan, planner):
        self._hook("write_data")
        return super().write_data(plan, planner)

    def finish(self, metadata, results):
        self._hook("finish")
        return super().finish(metadata, results)


def main(run_dir: str, stop_at: int, mode: str) -> None:
    torch.set_num_threads(1)
    parts = build(3)
    train_steps(parts, 1)
    ck = Checkpointer(spec(async_mode=mode), run_dir, model=parts[0], optimizer=parts[1], scheduler=parts[2],
                      trainer_state=parts[4], ema=parts[3])
    ck.save(1)
    ck.wait()
    torch.save(parts[0].state_dict(), Path(run_dir) / "ref_step1.pt")
    train_steps(parts, 1)
    progress = Path(run_dir) / "progress"
    ck._writer_factory = lambda p: PausingWriter(p, progress=progress, stop_at=stop_at)
    ck.save(2)
    ck.close()
    with open(progress, "a") as f:
        f.write("DONE\n")
    time.sleep(120)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
