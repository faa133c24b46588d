"""``skdcache``: build a teacher cache, and inspect, verify, preview and share caches.

Commands are thin: each turns its options into a config and calls one library function.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import typer

from cache_tools.cli import register_commands as register_cache_commands
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
    verbose,
    with_options,
)
from cache_tools.errors import ConfigError

app = new_app(
    "skdcache", "Run a segmentation teacher once and share its targets as a Zarr v3 cache.", "Log progress details."
)


@app.command("sample-data")
def sample_data(
    out: Annotated[Path, typer.Argument(help="Directory to write (Cityscapes layout).")],
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Training images.")] = 200,
    num_val: Annotated[int | None, typer.Option(help="Validation images (default: a quarter of --num-images).")] = None,
    num_extra: Annotated[
        int, typer.Option(help="Unlabelled images (split train_extra: images only, for distillation).")
    ] = 0,
    size: Annotated[str, typer.Option(help="Image size HxW.")] = "256x512",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Write the built-in sample dataset: procedural street scenes in the Cityscapes layout."""
    from cache_tools.datasets import write_sample_dataset

    in_range("--num-images", num_images, 1, 1_000_000)
    in_range("--num-val", num_val, 0, 1_000_000)
    in_range("--num-extra", num_extra, 0, 1_000_000)
    in_range("--seed", seed, 0, 2**63 - 1)
    h, w = hw(size, "--size")
    in_range("--size (height)", h, 8, 8192)
    in_range("--size (width)", w, 8, 8192)
    check_destination(str(out), "OUT")
    n_val = num_val if num_val is not None else max(1, num_images // 4)
    summary = write_sample_dataset(
        out, num_train=num_images, num_val=n_val, size=(h, w), seed=seed, num_extra=num_extra
    )
    if json_out:
        print_json(summary)
        return
    console.print(f"wrote {summary['splits']} images of {size} to [bold]{out}[/] (seed {seed})")


@app.command("teachers")
def teachers(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the registered teachers (any registered model can be a teacher)."""
    from rich.table import Table

    from .registry import list_teachers

    entries = list_teachers()
    families = {e.name: _family_of_name(e.name) for e in entries}
    if json_out:
        print_json(
            [
                {"name": e.name, "family": families[e.name], "description": e.description, "roles": list(e.roles)}
                for e in entries
            ]
        )
        return
    table = Table(title="teachers", show_lines=False)
    table.add_column("name", style="bold")
    table.add_column("family")
    table.add_column("roles")
    table.add_column("description")
    for e in entries:
        table.add_row(e.name, families[e.name], ", ".join(e.roles), e.description)
    console.print(table)
    console.print("Custom teachers: --teacher package.module:factory")


def _family_of_name(name: str) -> str:
    """A registered model's family (the families module names its models ``mmseg_*`` / ``cirkd_*``)."""
    from .families import FAMILIES

    prefix = name.split("_", 1)[0]
    return prefix if prefix in FAMILIES else "skd"


@app.command("weights")
def weights_cmd(
    file: Annotated[Path, typer.Argument(help="Checkpoint: .pth / .pt / .safetensors.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Say what a weights file holds: container, tensors, family and model, and whether and how it loads."""
    from .recognize import describe_weights_file, weights_lines

    info = describe_weights_file(file)
    if json_out:
        print_json(info)
        return
    for line in weights_lines(info):
        console.print(line, markup=False, highlight=False)  # lines hold [1, 1, 1, 1] shapes


#: ``skdcache build``'s options in --help order. Each but json/workers/scheduler is the BuildConfig field of the same flag
#: (cache_tools.options.flag_of); tests/pipeline/test_cli.py fails when a flag, default or choice drifts from
#: the field. The defaults are written here, not read from BuildConfig, because that module imports
#: torch, and reading it would add seconds to every skdcache command, --help included.
BUILD_OPTIONS = {
    "data": Opt(Path, ..., "Dataset root (Cityscapes or folder layout)."),
    "out": Opt(str, ..., "Store URL: a path or any fsspec URL (s3://bucket/x.zarr)."),
    "teacher": Opt(
        str | None,
        None,
        "Registered model name, or package.module:factory (default: the model recognised from --weights).",
    ),
    "weights": Opt(
        Path | None, None, "Teacher checkpoint (.safetensors or .pth/.pt; skd, SKD official, mmseg or CIRKD)."
    ),
    "random_weights": Opt(bool, False, "Use seeded random weights (smoke tests only)."),
    "seed": Opt(int, 0, "Seed of --random-weights."),
    "weights_format": Opt(str, "auto", "auto | skd | official (InPlace-ABN checkpoints)."),
    "no_teacher_check": Opt(bool, False, "Skip the teacher sanity gate (mIoU on labelled images first)."),
    "check_split": Opt(str | None, None, "Labelled split the teacher check runs on (default: the cached split)."),
    "check_images": Opt(int, 8, "Labelled images the teacher check evaluates."),
    "split": Opt(str, "train", "Split(s), comma separated."),
    "mode": Opt(str, "dense", "dense: one pass per image | views: K augmented views per image."),
    "views": Opt(int, 4, "views mode: views per image."),
    "crop": Opt(str, "512x512", "views mode: crop HxW."),
    "view_seed": Opt(int, 0, "views mode: seed of the view draw."),
    "scales": Opt(str | None, None, "views mode: scales, comma separated (default 0.7..2.1)."),
    "no_flip": Opt(bool, False, "views mode: never mirror views."),
    "dense_flip": Opt(bool, False, "dense mode: also run the mirrored image."),
    "inference": Opt(str, "whole", "dense mode: whole | slide (tiled, for memory)."),
    "tile": Opt(str | None, None, "slide inference tile HxW."),
    "overlap": Opt(float, 1.0 / 3.0, "slide inference overlap."),
    "logits_codec": Opt(str, "gap-u8", "fp32 | fp16 | int8-pixel | int8-channel | gap-u8 | gap-u16."),
    "logits_clip": Opt(float | None, None, "gap codecs: largest stored gap (default 48 for gap-u8, 64 for gap-u16)."),
    "features_codec": Opt(str, "fp16", "fp16 | int8 (per entry and channel) | fp32 | pcaK (e.g. pca64)."),
    "no_features": Opt(bool, False, "Store logits only (no pair-wise loss)."),
    "features_pool": Opt(str, "max", "max (official) | avg (paper)."),
    "features_block": Opt(str | None, None, "Feature pooling cell HxW on the teacher grid (1x1 = full map)."),
    "compressor": Opt(str, "zstd:1", "zstd[:level] | blosc-lz4[:level] | blosc-zstd[:level] | none."),
    "shard_size": Opt(int | None, None, "Images per shard (default: ~32 MB shards)."),
    "batch_size": Opt(int, 8, "Teacher batch (views mode)."),
    "queue_size": Opt(int, 8, "Teacher outputs queued for the encode/write threads."),
    "pca_samples": Opt(int, 16, "pcaK feature codecs: entries the PCA basis is fitted on."),
    "loader_workers": Opt(int, 2, "Image-decoding processes."),
    "writer_threads": Opt(int, 2, "Encode/write threads."),
    "device": Opt(str, "auto", "auto | cpu | cuda | cuda:N."),
    "precision": Opt(
        str, "fp32", "Teacher precision: fp32 | tf32 | fp16 | bf16 (its error against fp32 is measured and recorded)."
    ),
    "no_amp": Opt(bool, False, "Deprecated: the same as --precision fp32."),
    "fidelity_samples": Opt(int, 64, "Entries whose codec error is measured."),
    "skip_unreadable": Opt(bool, False, "Skip (and report) images that cannot be decoded."),
    "overwrite": Opt(bool, False, "Replace a store built with another configuration."),
    "storage_option": Opt(list[str] | None, None, "fsspec option KEY=VALUE (repeatable).", ("--storage-option", "-S")),
    "threads": Opt(int | None, None, "torch CPU threads."),
    "workers": Opt(int | None, None, "Build on a dask LocalCluster with N workers (one per GPU when GPUs exist)."),
    "scheduler": Opt(str | None, None, "Use an existing dask scheduler (tcp://host:port)."),
    "json_out": Opt(bool, False, "Print the result as JSON.", ("--json",)),
}


@app.command("build")
@with_options(BUILD_OPTIONS)
def build(**flags: Any) -> None:
    """Run the teacher once and write a compressed, provenance-stamped cache (resumable)."""
    set_interrupt_hint(": written shards are kept; re-run the same command to resume the build")
    from .build import BuildConfig, build_cache

    flags["storage_option"] = parse_storage_options(flags["storage_option"])
    config = config_from_flags(
        BuildConfig,
        flags,
        {"splits": names, "crop": hw, "scales": floats, "tile": hw, "features_block": hw},
    )
    check_destination(config.out, "--out")
    workers, scheduler = flags["workers"], flags["scheduler"]
    in_range("--workers", workers, 1, 4096)
    run = build_cache
    if workers is not None or scheduler is not None:
        from .distributed import build_cache_distributed

        run = functools.partial(build_cache_distributed, workers=workers, scheduler=scheduler, quiet=not verbose())

    # the progress bar goes to stderr, so --json output on stdout stays machine-readable
    with progress_bar("build", total=None, unit="entries") as update:

        def progress(p) -> None:
            rate = p.entries_done / max(p.seconds, 1e-9)
            update(p.entries_done, total=p.entries_total, rate=f"{rate:.1f}/s", extra=f"{p.bytes_written / 1e6:.1f} MB")

        result = run(config, progress=progress)
    if flags["json_out"]:
        print_json(_build_summary(result))
        return
    _print_build(result)


def _print_build(result) -> None:
    """The human summary of a build: what was written (or that nothing was needed), fidelity, skips."""
    s = result.schema
    _print_teacher_lines(result)
    if result.already_complete:
        console.print(
            f"[bold]{result.url}[/] is already a complete {s.mode} cache of this configuration "
            f"({s.num_entries} entries, teacher {s.teacher.name}): nothing to do, nothing written"
        )
        return
    verb = "resumed" if result.resumed else "built"
    console.print(
        f"{verb} [bold]{s.mode}[/] cache [bold]{result.url}[/]: {s.num_entries} entries "
        f"({s.num_images} images), teacher {s.teacher.name}, {result.seconds:.1f} s"
    )
    fid = s.fidelity
    if fid.get("sampled_entries"):
        line = (
            f"fidelity on {fid['sampled_entries']} entries: KL(T=1) mean {fid['kl_t1_mean']:.2e} max "
            f"{fid['kl_t1_max']:.2e}, KL(T=4) mean {fid['kl_t4_mean']:.2e}, argmax agreement "
            f"{100 * fid['argmax_agreement']:.3f}%"
        )
        if "pair_cos_err_max" in fid:
            line += f", pair-wise cosine error mean {fid['pair_cos_err_mean']:.1e} max {fid['pair_cos_err_max']:.1e}"
        console.print(line)
    if result.skipped_images:
        err_console.print(
            f"[yellow]skipped {len(result.skipped_images)} unreadable image(s):[/] "
            + ", ".join(result.skipped_images[:10])
            + (" ..." if len(result.skipped_images) > 10 else "")
        )


def _print_teacher_lines(result) -> None:
    """What --weights was recognised as and which model was built, and the sanity gate's measurement."""
    rec, tc, t = result.recognised, result.teacher_check, result.schema.teacher
    if rec is not None:
        how = "as given by --teacher" if rec.get("given") else "recognised from --weights"
        console.print(f"teacher {rec['chosen']} ({how}): {rec['description']}", markup=False, highlight=False)
    console.print(
        f"teacher family {t.family}: {t.grid} grid, align_corners={t.align_corners}, "
        f"input {t.normalization.get('order', '?')} mean {t.normalization.get('mean')} std {t.normalization.get('std')}",
        markup=False,
        highlight=False,
    )
    if tc is not None:
        console.print(_check_line(tc), markup=False, highlight=False)


def _check_line(tc: dict) -> str:
    return (
        f"teacher check: mIoU {100 * (tc.get('miou') or 0.0):.1f}% on {tc.get('images')} labelled images of "
        f"{tc.get('split')} (chance {100 * (tc.get('chance_miou') or 0.0):.1f}%): {tc.get('verdict')}"
    )


def _build_summary(result) -> dict:
    s = result.schema
    return {
        "url": result.url,
        "resumed": result.resumed,
        "already_complete": result.already_complete,
        "mode": s.mode,
        "entries": s.num_entries,
        "images": s.num_images,
        "entries_written": result.entries_written,
        "seconds": round(result.seconds, 3),
        "teacher_seconds": round(result.teacher_seconds, 3),
        "bytes_encoded": result.bytes_encoded,
        "fidelity": s.fidelity,
        "skipped_images": result.skipped_images,
        "teacher": s.teacher.name,
        "family": s.teacher.family,
        "recognised": result.recognised,
        "teacher_check": result.teacher_check,
    }


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Fresh directory for everything the demo writes.")] = Path("demo-run"),
    preset: Annotated[str, typer.Option(help="full (~7-12 min on 2 CPU cores) | smoke (a minute).")] = "full",
) -> None:
    """Sample data -> shipped teacher -> one cache -> students (alone, from the cache, online; several seeds) -> table with measured noise."""
    from .demo import run_demo

    if preset not in ("full", "smoke"):
        raise ConfigError(f"--preset must be full or smoke, got {preset!r}")
    check_destination(str(out), "--out")
    # the demo prints its own table, with the noise it measured, as it goes
    summary = run_demo(out, preset, log=lambda m: err_console.print(m, highlight=False))
    console.print(
        f"summary {out / 'summary.json'}; chart {summary['chart']}; total {summary['total_seconds'] / 60:.1f} min"
    )


register_cache_commands(app)


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)


if __name__ == "__main__":
    main()
