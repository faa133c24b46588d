"""Multi-process training with torchrun: environment, process group, critic gradient averaging.

``skdstudent train --nproc N`` re-launches itself under ``torch.distributed.run`` (the same as the
documented ``torchrun --nproc-per-node N -m student.cli train ...``). Each rank trains the student
under DDP on its own slice of the draw stream; gloo on CPU, NCCL on GPU.

The critic is kept identical on every rank by averaging its gradients after each critic backward
(what DDP would do). It is not wrapped in DDP because the WGAN gradient penalty needs
``torch.autograd.grad`` with ``create_graph=True`` and several critic forwards per step, which DDP
does not support.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "dist_env",
    "init_distributed",
    "shutdown_distributed",
    "all_reduce_grads",
    "check_in_sync",
    "launch",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()


def dist_env() -> DistEnv:
    """Rank and world size from the torchrun environment (1 process when absent)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(env: DistEnv) -> None:
    if env.world <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend)


def shutdown_distributed(env: DistEnv) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(module: nn.Module, env: DistEnv) -> None:
    """Average the gradients of ``module`` over all ranks (in place)."""
    if env.world <= 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= env.world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def check_in_sync(modules: dict[str, nn.Module], env: DistEnv) -> None:
    """Raise if a module's parameters differ between ranks (a cheap fingerprint, all-gathered).

    Called at checkpoints: DDP keeps the student identical and :func:`all_reduce_grads` the critic;
    this catches any future change that breaks either.
    """
    if env.world <= 1:
        return
    for name, module in modules.items():
        params = [p.detach().double().reshape(-1) for p in module.parameters()]
        flat = torch.cat(params) if params else torch.zeros(1, dtype=torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64) % 9973 + 1
        fp = torch.stack([flat.sum(), (flat * weights).sum()]).to(env.device)
        gathered = [torch.zeros_like(fp) for _ in range(env.world)]
        dist.all_gather(gathered, fp)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"the {name} replicas differ between processes; distributed training is out of sync")


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``skdstudent`` with ``argv`` under torch.distributed.run with ``nproc`` processes."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "student.cli",
        *argv,
    ]
    env = dict(os.environ)
    # each rank gets its share of the CPU threads
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    # Ranks report user errors as one "error: ..." line; when one did, the launcher's own multi-line
    # failure report after it adds nothing and is dropped. Anything else (a real crash) is shown whole.
    user_error = False
    held: list[str] = []
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if user_error or held or line.startswith("Traceback (most recent call last):"):
                held.append(line)
                continue
            if line.startswith("error:"):
                user_error = True
            if "torch.distributed.run" in line and "OMP_NUM_THREADS" in line:
                continue  # torchrun's note that it set OMP_NUM_THREADS: we set it on purpose
            sys.stderr.write(line)
    except KeyboardInterrupt:
        # Ctrl-C reached the ranks too (one process group): let them stop, drop their own
        # "interrupted" lines and torchrun's report, and say it once (skdstudent's run_app)
        proc.send_signal(signal.SIGINT)
        proc.communicate()
        raise
    code = proc.wait()
    if code and not user_error:
        sys.stderr.writelines(held)
    return 1 if code and user_error else code
