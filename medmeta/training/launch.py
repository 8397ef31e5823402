"""``medmeta train --nproc N``: the same run on N processes, started through ``torchrun``.

The run's settings, already checked, go to the processes as a YAML file (the run's own
``config.yaml`` format); torchrun (``python -m torch.distributed.run --standalone``: one machine,
a free port) starts ``python -m medmeta.cli train --config FILE`` N times, and each process
finds its place in the environment torchrun gives it (:mod:`medmeta.training.distributed`).
A launch over several machines is torchrun's own (see ``docs/distributed.md``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from medmeta.cores import available_cores
from medmeta.errors import MedmetaError
from medmeta.training.config import TrainConfig


def torchrun_command(config_file: str | Path, nproc: int, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> list[str]:
    """The torchrun command line that trains ``config_file`` on ``nproc`` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "medmeta.cli"]
    command += ["--quiet"] * quiet + ["train", "--config", str(config_file)]
    return command + ["--resume"] * resume + ["--overwrite"] * overwrite


def process_environment(nproc: int) -> dict[str, str]:
    """The environment of the processes: this one's, with the CPU cores shared between them
    (``OMP_NUM_THREADS``, unless set; torchrun's own default is 1 thread per process)."""
    env = dict(os.environ)
    cores = available_cores()
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    return env


def launch(config: TrainConfig, nproc: int, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> None:
    """Train ``config`` on ``nproc`` processes and wait for them; a failed process is a
    :class:`MedmetaError` (its own error was printed above by torchrun). A run to ``resume``
    goes with its stored settings, which the processes check the file against."""
    if resume:
        from medmeta.training.resume import resumed_config

        config = resumed_config(config)
    with tempfile.TemporaryDirectory(prefix="medmeta-launch-") as folder:
        config_file = Path(folder) / "config.yaml"
        config_file.write_text(config.to_yaml(), encoding="utf-8")
        done = subprocess.run(torchrun_command(config_file, nproc, resume, overwrite, quiet), env=process_environment(nproc))
    if done.returncode != 0:
        raise MedmetaError(f"training on {nproc} processes failed (exit status {done.returncode}); the processes' errors are above")
