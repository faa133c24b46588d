"""``skdstudent``: train students from a cache (or an online teacher) and evaluate them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cache_tools.clikit import (
    Opt,
    check_destination,
    config_from_flags,
    console,
    err_console,
    floats,
    hw,
    in_range,
    names,
    new_app,
    parse_storage_options,
    print_json,
    progress_bar,
    run_app,
    set_interrupt_hint,
    with_options,
)
from cache_tools.errors import ConfigError
from cache_tools.schema import parse_hw

app = new_app(
    "skdstudent",
    "Train segmentation students with structured knowledge distillation from a teacher cache.",
    "Log details.",
)


@app.command("students")
def students(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the registered students."""
    from rich.table import Table

    from .models import list_students

    entries = list_students()
    if json_out:
        print_json([{"name": e.name, "description": e.description} for e in entries])
        return
    table = Table(title="students")
    table.add_column("name", style="bold")
    table.add_column("description")
    for e in entries:
        table.add_row(e.name, e.description)
    console.print(table)


def _parse_losses(text: str, flag: str) -> tuple[str, ...]:
    """``--losses`` text -> loss names in order, duplicates dropped; ``none`` (or nothing) -> ()."""
    text = text.strip().lower()
    if text in ("none", ""):
        return ()
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


#: ``skdstudent train``'s options in --help order. Each but json/nproc is the TrainConfig field of the same flag
#: (cache_tools.options.flag_of); tests/student/test_cli.py fails when a flag, default or choice drifts from
#: the field. The defaults are written here, not read from TrainConfig, because that module imports
#: torch, and reading it would add seconds to every skdstudent command, --help included.
TRAIN_OPTIONS = {
    "data": Opt(Path, ..., "Dataset root (Cityscapes or folder layout)."),
    "out": Opt(Path, ..., "Run directory (checkpoints, metrics.jsonl, model.safetensors)."),
    "student": Opt(str, "psp18", "Student name (skdstudent students) or package.module:factory."),
    "cache": Opt(str | None, None, "Teacher cache URL (path or fsspec URL)."),
    "teacher": Opt(str | None, None, "Online teacher name (instead of --cache)."),
    "weights": Opt(Path | None, None, "Online teacher checkpoint."),
    "losses": Opt(
        str, "pixel,pair,holistic", "Any of pixel,pair,holistic (SKD) and kd,cwd,dist,ifvd, comma separated, or none."
    ),
    "split": Opt(str, "train", "Training split(s), comma separated (unlabelled ones too)."),
    "labelled_share": Opt(
        float | None, None, "Share of labelled samples in each batch (default: the splits' natural proportion)."
    ),
    "iters": Opt(int, 40000, "Iterations."),
    "batch_size": Opt(int, 8, "Batch per process."),
    "crop": Opt(str, "512x512", "Crop HxW (views caches use their stored crop)."),
    "scales": Opt(str | None, None, "Random scales, comma separated (default 0.7..2.1)."),
    "no_flip": Opt(bool, False, "No random mirroring."),
    "photometric": Opt(float, 0.0, "Colour jitter of the student input only (0 = off)."),
    "lr": Opt(float, 0.01, "Student SGD learning rate (poly decay)."),
    "momentum": Opt(float, 0.9, "SGD momentum (student and sgd critic)."),
    "weight_decay": Opt(float, 5e-4, "Weight decay."),
    "poly_power": Opt(float, 0.9, "Power of the poly learning-rate decay."),
    "pretrained": Opt(
        Path | None,
        None,
        "ImageNet backbone file (mmcv v1c, CSAIL/CIRKD deep-stem, timm/torchvision where the stem fits).",
    ),
    "lambda_pi": Opt(float, 10.0, "Pixel-wise weight."),
    "lambda_pa": Opt(float, 0.5, "Pair-wise weight."),
    "lambda_d": Opt(float, 0.1, "Holistic weight (student term and critic loss)."),
    "lambda_gp": Opt(float, 10.0, "Gradient-penalty weight inside the critic loss."),
    "aux_weight": Opt(float, 0.4, "Auxiliary head CE weight."),
    "pixel_mode": Opt(str, "official", "official (batch-summed soft CE) | kl (CIRKD)."),
    "temperature": Opt(float, 1.0, "Pixel-wise temperature (kl mode)."),
    "pair": Opt(str, "official", "official (3x3 max nodes) | paper (avg) | cirkd (2x2 max)."),
    "adversarial": Opt(str, "wgan-gp", "wgan-gp (official) | hinge (CIRKD)."),
    "critic_optimizer": Opt(str, "sgd", "sgd (official) | adam."),
    "critic_lr": Opt(float, 4e-4, "Critic learning rate."),
    "critic_image": Opt(bool, False, "Condition the critic on the image (paper)."),
    "lambda_kd": Opt(float, 1.0, "kd weight (CIRKD train_kd.sh: 1)."),
    "kd_temperature": Opt(float, 1.0, "kd temperature (CIRKD: 1)."),
    "lambda_cwd": Opt(float, 3.0, "cwd weight (CIRKD train_cwd.sh --lambda-cwd-logit: 3)."),
    "cwd_temperature": Opt(float, 4.0, "cwd temperature (CIRKD CriterionCWD: 4)."),
    "lambda_dist": Opt(float, 1.0, "dist weight (DIST_KD segmentation: 1)."),
    "dist_beta": Opt(float, 1.0, "dist inter-class weight beta (DIST: 1)."),
    "dist_gamma": Opt(float, 1.0, "dist intra-class weight gamma (DIST: 1)."),
    "dist_temperature": Opt(float, 1.0, "dist temperature (DIST segmentation: 1)."),
    "lambda_ifvd": Opt(float, 20.0, "ifvd weight (CIRKD train_ifvd.sh --lambda-ifv: 20)."),
    "sync_bn": Opt(bool, False, "SyncBatchNorm across processes."),
    "seed": Opt(int, 0, "Seed."),
    "workers": Opt(int, 2, "DataLoader workers."),
    "device": Opt(str, "auto", "auto | cpu | cuda."),
    "no_amp": Opt(bool, False, "Disable the student's autocast on CUDA."),
    "teacher_precision": Opt(
        str, "fp32", "Online teacher arithmetic: fp32 (default, as a default cache) | tf32 | fp16 | bf16."
    ),
    "eval_every": Opt(int, 0, "Evaluate every N iterations (0: at the end)."),
    "eval_split": Opt(str, "val", "Evaluation split."),
    "eval_mode": Opt(str, "whole", "whole (official) | slide (tiles of the crop size)."),
    "ckpt_every": Opt(int, 0, "Checkpoint every N iterations (0: at evaluations)."),
    "log_every": Opt(int, 10, "Log every N iterations."),
    "resume": Opt(bool, False, "Continue the run in --out."),
    "nproc": Opt(int, 1, "Processes (torchrun DDP; gloo on CPU, NCCL on GPU)."),
    "storage_option": Opt(list[str] | None, None, "fsspec option KEY=VALUE (repeatable).", ("--storage-option", "-S")),
    "cache_dir": Opt(Path | None, None, "Local read-through cache for a remote --cache."),
    "tensorboard": Opt(bool, False, "Also log to TensorBoard (if installed)."),
    "deterministic": Opt(
        bool,
        False,
        "Only deterministic kernels (slower; on CUDA some PSPNet backward ops have none and stop the run).",
    ),
    "json_out": Opt(bool, False, "Print the result as JSON.", ("--json",)),
}


@app.command("train")
@with_options(TRAIN_OPTIONS)
def train(**flags: Any) -> None:
    """Train a student (task loss + the chosen distillation losses)."""
    out, nproc = flags["out"], flags["nproc"]
    set_interrupt_hint(f": checkpoints are kept; add --resume to the same command to continue the run in {out}")
    in_range("--nproc", nproc, 1, 1024)
    check_destination(str(out), "--out")
    from .train import TrainConfig, check_out_dir

    flags["storage_option"] = parse_storage_options(flags["storage_option"])
    config = config_from_flags(
        TrainConfig, flags, {"losses": _parse_losses, "splits": names, "crop": hw, "scales": floats}
    )
    if nproc > 1:
        from .distributed import launch

        check_out_dir(config)  # fail here, in one line, rather than in every rank
        raise typer.Exit(launch(nproc, _strip_nproc(sys.argv[1:])))
    from .distributed import dist_env

    main_rank = dist_env().rank == 0  # only rank 0 shows progress and the summary
    result = _run_training(config, show_progress=main_rank)
    if not main_rank:
        return
    if flags["json_out"]:
        print_json(_train_summary(result))
        return
    _summary_table(config, result)


def _run_training(config, show_progress: bool):
    """Train ``config``, with a progress bar on stderr (so --json output on stdout stays machine-readable)."""
    from .train import train as run_train

    if not show_progress:
        return run_train(config)
    with progress_bar("train", total=config.iters, unit="iters") as update:

        def show(step: int, total: int, m: dict) -> None:
            terms = " ".join(f"{k}={m[k]:.3f}" for k in ("loss", "task", "pixel", "pair", "adv", "critic") if k in m)
            update(step, rate=f"lr={m['lr']:.2e}", extra=terms)

        return run_train(config, progress=show)


def _train_summary(result) -> dict:
    """The --json summary of a training run."""
    return {
        "out": result.out,
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "step_seconds": round(result.step_seconds, 4),
        "last": result.last,
        "miou": None if result.eval is None else result.eval["miou"],
        "checkpoint": result.checkpoint,
        "weights": result.weights,
    }


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def _summary_table(config, result) -> None:
    from rich.table import Table

    table = Table(title=f"{config.student} · {', '.join(config.losses) or 'task loss only'}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("iterations", str(result.steps))
    table.add_row("wall time", f"{result.seconds:.1f} s")
    table.add_row("step time", f"{1000 * result.step_seconds:.0f} ms")
    for k in ("loss", "task", "pixel", "pair", "adv", "critic"):
        if k in result.last:
            table.add_row(f"final {k}", f"{result.last[k]:.4f}")
    if result.eval is not None:
        table.add_row(f"{config.eval_split} mIoU", f"{100 * result.eval['miou']:.2f}")
    console.print(table)
    console.print(f"checkpoint {result.checkpoint}\nweights    {result.weights}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="checkpoints/last.pt or model.safetensors of a run.")],
    data: Annotated[Path, typer.Option(help="Dataset root.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val",
    mode: Annotated[str, typer.Option(help="whole (official) | slide.")] = "whole",
    tile: Annotated[str, typer.Option(help="Slide tile HxW.")] = "512x512",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    save_predictions: Annotated[
        Path | None, typer.Option(help="Write predictions as PNG under this directory.")
    ] = None,
    prediction_format: Annotated[
        str,
        typer.Option(
            help="trainid: <dir>/<id>.png class indices | labelid: Cityscapes label ids at "
            "<dir>/<id>_leftImg8bit.png (official evaluator, benchmark server) | color: dataset palette."
        ),
    ] = "trainid",
    color: Annotated[bool, typer.Option("--color", help="Same as --prediction-format color.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Evaluate a checkpoint: mIoU and per-class IoU (cityscapesscripts definition)."""
    from pipeline.inference import pick_device

    from .evaluate import PREDICTION_FORMATS, evaluate_checkpoint

    if mode not in ("whole", "slide"):
        raise ConfigError(f"--mode must be whole or slide, got {mode!r}")
    if prediction_format not in PREDICTION_FORMATS:
        raise ConfigError(
            f"--prediction-format must be one of {', '.join(PREDICTION_FORMATS)}, got {prediction_format!r}"
        )
    if color and prediction_format not in ("trainid", "color"):
        raise ConfigError(f"--color contradicts --prediction-format {prediction_format}; give one of them")
    result = evaluate_checkpoint(
        str(checkpoint),
        str(data),
        split=split,
        mode=mode,
        tile=parse_hw(tile, "--tile"),
        device=pick_device(device),
        save_predictions=str(save_predictions) if save_predictions else None,
        prediction_format="color" if color else prediction_format,
    )
    if json_out:
        print_json(result.to_dict() if hasattr(result, "to_dict") else result.__dict__)
        return
    from rich.table import Table

    table = Table(title=f"{checkpoint} on {split} ({mode}, {result.images} images)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, iou in result.per_class.items():
        table.add_row(name, "—" if iou is None else f"{100 * iou:.2f}")
    table.add_row("[bold]mIoU[/]", f"[bold]{100 * result.miou:.2f}[/]")
    table.add_row("pixel accuracy", f"{100 * result.pixel_accuracy:.2f}")
    console.print(table)
    if save_predictions:
        err_console.print(f"predictions written under {save_predictions}")


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)


if __name__ == "__main__":
    main()
