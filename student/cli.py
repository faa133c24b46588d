"""``skdstudent``: train students from a cache (or an online teacher) and evaluate them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cache_tools.clikit import (
    check_destination,
    config_from_flags,
    console,
    err_console,
    floats,
    hw,
    in_range,
    names,
    parse_storage_options,
    print_json,
    run_app,
    set_interrupt_hint,
    setup_logging,
)
from cache_tools.errors import ConfigError
from cache_tools.schema import parse_hw

app = typer.Typer(
    name="skdstudent",
    help="Train segmentation students with structured knowledge distillation from a teacher cache.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False) -> None:
    setup_logging(verbose)


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


def _parse_losses(text: str) -> tuple[str, ...]:
    text = text.strip().lower()
    if text in ("none", ""):
        return ()
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


@app.command("train")
def train(
    data: Annotated[Path, typer.Option(help="Dataset root (Cityscapes or folder layout).")],
    out: Annotated[Path, typer.Option(help="Run directory (checkpoints, metrics.jsonl, model.safetensors).")],
    student: Annotated[
        str, typer.Option(help="Student name (skdstudent students) or package.module:factory.")
    ] = "psp18",
    cache: Annotated[str | None, typer.Option(help="Teacher cache URL (path or fsspec URL).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Online teacher name (instead of --cache).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Online teacher checkpoint.")] = None,
    losses: Annotated[
        str, typer.Option(help="Any of pixel,pair,holistic (SKD) and kd,cwd,dist,ifvd, comma separated, or none.")
    ] = "pixel,pair,holistic",
    split: Annotated[str, typer.Option(help="Training split(s), comma separated (unlabelled ones too).")] = "train",
    labelled_share: Annotated[
        float | None,
        typer.Option(help="Share of labelled samples in each batch (default: the splits' natural proportion)."),
    ] = None,
    iters: Annotated[int, typer.Option(help="Iterations.")] = 40000,
    batch_size: Annotated[int, typer.Option(help="Batch per process.")] = 8,
    crop: Annotated[str, typer.Option(help="Crop HxW (views caches use their stored crop).")] = "512x512",
    scales: Annotated[str | None, typer.Option(help="Random scales, comma separated (default 0.7..2.1).")] = None,
    no_flip: Annotated[bool, typer.Option("--no-flip", help="No random mirroring.")] = False,
    photometric: Annotated[float, typer.Option(help="Colour jitter of the student input only (0 = off).")] = 0.0,
    lr: Annotated[float, typer.Option(help="Student SGD learning rate (poly decay).")] = 0.01,
    momentum: Annotated[float, typer.Option(help="SGD momentum (student and sgd critic).")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 5e-4,
    poly_power: Annotated[float, typer.Option(help="Power of the poly learning-rate decay.")] = 0.9,
    pretrained: Annotated[
        Path | None,
        typer.Option(
            help="ImageNet backbone file (mmcv v1c, CSAIL/CIRKD deep-stem, timm/torchvision where the stem fits)."
        ),
    ] = None,
    lambda_pi: Annotated[float, typer.Option(help="Pixel-wise weight.")] = 10.0,
    lambda_pa: Annotated[float, typer.Option(help="Pair-wise weight.")] = 0.5,
    lambda_d: Annotated[float, typer.Option(help="Holistic weight (student term and critic loss).")] = 0.1,
    lambda_gp: Annotated[float, typer.Option(help="Gradient-penalty weight inside the critic loss.")] = 10.0,
    aux_weight: Annotated[float, typer.Option(help="Auxiliary head CE weight.")] = 0.4,
    pixel_mode: Annotated[str, typer.Option(help="official (batch-summed soft CE) | kl (CIRKD).")] = "official",
    temperature: Annotated[float, typer.Option(help="Pixel-wise temperature (kl mode).")] = 1.0,
    pair: Annotated[str, typer.Option(help="official (3x3 max nodes) | paper (avg) | cirkd (2x2 max).")] = "official",
    adversarial: Annotated[str, typer.Option(help="wgan-gp (official) | hinge (CIRKD).")] = "wgan-gp",
    critic_optimizer: Annotated[str, typer.Option(help="sgd (official) | adam.")] = "sgd",
    critic_lr: Annotated[float, typer.Option(help="Critic learning rate.")] = 4e-4,
    critic_image: Annotated[
        bool, typer.Option("--critic-image", help="Condition the critic on the image (paper).")
    ] = False,
    lambda_kd: Annotated[float, typer.Option(help="kd weight (CIRKD train_kd.sh: 1).")] = 1.0,
    kd_temperature: Annotated[float, typer.Option(help="kd temperature (CIRKD: 1).")] = 1.0,
    lambda_cwd: Annotated[float, typer.Option(help="cwd weight (CIRKD train_cwd.sh --lambda-cwd-logit: 3).")] = 3.0,
    cwd_temperature: Annotated[float, typer.Option(help="cwd temperature (CIRKD CriterionCWD: 4).")] = 4.0,
    lambda_dist: Annotated[float, typer.Option(help="dist weight (DIST_KD segmentation: 1).")] = 1.0,
    dist_beta: Annotated[float, typer.Option(help="dist inter-class weight beta (DIST: 1).")] = 1.0,
    dist_gamma: Annotated[float, typer.Option(help="dist intra-class weight gamma (DIST: 1).")] = 1.0,
    dist_temperature: Annotated[float, typer.Option(help="dist temperature (DIST segmentation: 1).")] = 1.0,
    lambda_ifvd: Annotated[float, typer.Option(help="ifvd weight (CIRKD train_ifvd.sh --lambda-ifv: 20).")] = 20.0,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", help="SyncBatchNorm across processes.")] = False,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader workers.")] = 2,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    no_amp: Annotated[bool, typer.Option("--no-amp", help="Disable the student's autocast on CUDA.")] = False,
    teacher_precision: Annotated[
        str,
        typer.Option(help="Online teacher arithmetic: fp32 (default, as a default cache) | tf32 | fp16 | bf16."),
    ] = "fp32",
    eval_every: Annotated[int, typer.Option(help="Evaluate every N iterations (0: at the end).")] = 0,
    eval_split: Annotated[str, typer.Option(help="Evaluation split.")] = "val",
    eval_mode: Annotated[str, typer.Option(help="whole (official) | slide (tiles of the crop size).")] = "whole",
    ckpt_every: Annotated[int, typer.Option(help="Checkpoint every N iterations (0: at evaluations).")] = 0,
    log_every: Annotated[int, typer.Option(help="Log every N iterations.")] = 10,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    nproc: Annotated[int, typer.Option(help="Processes (torchrun DDP; gloo on CPU, NCCL on GPU).")] = 1,
    storage_option: Annotated[
        list[str] | None, typer.Option("--storage-option", "-S", help="fsspec option KEY=VALUE (repeatable).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Local read-through cache for a remote --cache.")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log to TensorBoard (if installed).")] = False,
    deterministic: Annotated[
        bool,
        typer.Option(
            "--deterministic",
            help="Only deterministic kernels (slower; on CUDA some PSPNet backward ops have none and stop the run).",
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train a student (task loss + the chosen distillation losses)."""
    set_interrupt_hint(f": checkpoints are kept; add --resume to the same command to continue the run in {out}")
    in_range("--nproc", nproc, 1, 1024)
    check_destination(str(out), "--out")
    from .train import TrainConfig, check_out_dir
    from .train import train as run_train

    # every flag maps onto the TrainConfig field of the same flag (cache_tools.options.flag_of)
    flags = {**locals(), "storage_option": parse_storage_options(storage_option)}
    config = config_from_flags(
        TrainConfig,
        flags,
        {"losses": lambda v, _: _parse_losses(v), "splits": names, "crop": hw, "scales": floats},
    )
    if nproc > 1:
        from .distributed import launch

        check_out_dir(config)  # fail here, in one line, rather than in every rank
        raise typer.Exit(launch(nproc, _strip_nproc(sys.argv[1:])))
    from .distributed import dist_env

    # the progress bar goes to stderr, so --json output on stdout stays machine-readable
    if dist_env().rank != 0:
        result = run_train(config)
    else:
        from cache_tools.clikit import progress_bar

        with progress_bar("train", total=config.iters, unit="iters") as update:

            def progress(step: int, total: int, m: dict) -> None:
                terms = " ".join(
                    f"{k}={m[k]:.3f}" for k in ("loss", "task", "pixel", "pair", "adv", "critic") if k in m
                )
                update(step, rate=f"lr={m['lr']:.2e}", extra=terms)

            result = run_train(config, progress=progress)
    if dist_env().rank != 0:
        return
    summary = {
        "out": result.out,
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "step_seconds": round(result.step_seconds, 4),
        "last": result.last,
        "miou": None if result.eval is None else result.eval["miou"],
        "checkpoint": result.checkpoint,
        "weights": result.weights,
    }
    if json_out:
        print_json(summary)
        return
    _summary_table(config, result)


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
