"""What the training tests share: a tiny training config, and a callback that interrupts a run."""

from __future__ import annotations

from pathlib import Path

from student.train import TrainConfig


def tiny_config(data: str | Path, out: str | Path, **kw) -> TrainConfig:
    """A psp_tiny run of 2 iterations on 64x64 crops, no workers, no evaluation, logging every step."""
    base = dict(
        data=str(data),
        out=str(out),
        student="psp_tiny",
        iters=2,
        batch_size=2,
        crop=(64, 64),
        workers=0,
        eval_split="none",
        log_every=1,
    )
    return TrainConfig(**{**base, **kw})


class Stop(Exception):
    """Raised by :func:`stop_at`: a run interrupted as a kill would interrupt it."""


def stop_at(stop_step: int):
    """A progress callback that interrupts training when it reaches ``stop_step``."""

    def callback(step, total, metrics):
        if step == stop_step:
            raise Stop

    return callback
