"""The cache commands of ``skdcache`` that need no torch: info, verify, preview, copy, subset, merge, diff.

:func:`register_commands` adds them to the ``skdcache`` typer app defined in ``pipeline.cli``. Each
command turns its options into arguments of one library function (``cache_tools.inspect``,
``verify``, ``preview``, ``transfer``, ``diff``) and prints the result; errors a user can fix
arrive as :class:`~cache_tools.errors.SkdError` and are printed as one line by ``run_app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .clikit import check_destination, console, err_console, in_range, parse_storage_options, print_json, progress_bar
from .errors import ConfigError, SkdError

__all__ = ["register_commands"]

_StorageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        "-S",
        help="fsspec option KEY=VALUE for remote URLs (repeatable; defaults from $SKD_STORAGE_OPTIONS).",
    ),
]
_DstStorageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--dst-storage-option",
        "-D",
        help="fsspec option KEY=VALUE for the destination only (default: the --storage-option ones).",
    ),
]
_CacheDir = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Local read-through cache for a remote store (each object downloaded once)."),
]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _fmt_bytes(n: float | None) -> str:
    """``n`` bytes in decimal units: ``812 B``, ``1.19 KB`` ... up to TB."""
    if n is None:
        return "?"
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


def _exit(code: int) -> None:
    """End the command with ``code``.

    ``SystemExit``, not ``typer.Exit``: ``clikit.run_app`` runs the app with ``standalone_mode=False``,
    where click returns a ``typer.Exit`` code instead of exiting, and run_app drops it.
    """
    if code:
        raise SystemExit(code)


# ------------------------------------------------------------------------------------------------
# info


def info(
    url: Annotated[str, typer.Argument(help="Cache URL (path or fsspec URL).")],
    json_out: _Json = False,
    storage_option: _StorageOpt = None,
    cache_dir: _CacheDir = None,
) -> None:
    """Summarise a cache: format, teacher, dataset, layout, arrays, bytes, fidelity, provenance."""
    from .inspect import describe_cache

    d = describe_cache(
        url, storage_options=parse_storage_options(storage_option), cache_dir=str(cache_dir) if cache_dir else None
    )
    if json_out:
        print_json(d)
        return
    _print_layout(d)
    _print_teacher(d)
    _print_targets(d)
    console.print(_arrays_table(d["arrays"]))
    if d["bytes_total"] is None:
        console.print("on disk: unknown (this location cannot be listed)")
    else:
        per = "view" if d["mode"] == "views" else "entry"
        console.print(
            f"on disk {_fmt_bytes(d['bytes_total'])}; targets {_fmt_bytes(d['bytes_per_image'])} per image, "
            f"{_fmt_bytes(d['bytes_per_entry'])} per {per} (logits {_fmt_bytes(d['bytes_logits_per_entry'])}, "
            f"features {_fmt_bytes(d['bytes_features_per_entry'])})"
        )
    console.print(_fidelity_line(d["fidelity"]))
    b = d["build"]
    console.print(_precision_line(b))
    secs = b.get("seconds")
    took = f"{secs:.1f} s" if isinstance(secs, (int, float)) else "?"
    console.print(
        f"built by skd {d['tool_version'] or '?'} on {b.get('device', '?')} in {took} "
        f"({d['created'] or '?'} → {d['completed'] or 'unfinished'}); clipped values {b.get('clipped_values', 0)}"
    )
    derived = b.get("derived_from")
    if isinstance(derived, dict):
        console.print(f"derived: {derived.get('operation')} of {derived.get('source') or derived.get('sources')}")


def _print_layout(d: dict) -> None:
    """The store's URL, format, status, entries and shards, and how its views were made."""
    done = "" if d["entries_done"] == d["entries"] else f" ({d['entries_done']} written)"
    console.print(f"[bold]{d['url']}[/]  skd-cache format v{d['format_version']}, status [bold]{d['status']}[/]")
    unit = "views" if d["mode"] == "views" else "entries"
    console.print(
        f"mode [bold]{d['mode']}[/]: {d['entries']} entries{done}, {d['entries_per_image']} {unit} per image, "
        f"{d['shards']} shards of {d['shard_entries']} entries"
    )
    if d["views"]:
        v = d["views"]
        scales = f"{v['scales'][0]}–{v['scales'][-1]}" if len(v["scales"]) > 1 else str(v["scales"][0])
        console.print(
            f"views: crop {v['crop'][0]}x{v['crop'][1]}, scales {scales}, mirrored {v['flip']}, seed {v['seed']}"
        )
    if d["dense"]:
        v = d["dense"]
        tile = f", tile {v['tile'][0]}x{v['tile'][1]}" if v.get("tile") else ""
        console.print(f"dense: {v['inference']} inference{tile}, mirrored pass {v['flip']}")


def _print_teacher(d: dict) -> None:
    """The teacher: name, size, weights, input convention, and its check against the labels."""
    t = d["teacher"]
    weights = (t["weights_sha256"][:16] + "…") if t["weights_sha256"] else f"random (seed {t['seed']})"
    norm = t["normalization"]
    console.print(
        f"teacher [bold]{t['name']}[/] ({t['architecture']}), {t['parameters'] / 1e6:.2f} M parameters, "
        f"{t['feature_channels']} feature channels, weights sha256 {weights}"
    )
    console.print(
        f"  family {t.get('family', 'skd')}: input {norm.get('order', '?')}, mean "
        f"{[round(x, 3) for x in norm.get('mean', [])]}, std {[round(x, 3) for x in norm.get('std', [])]} (0–255 units); "
        f"{t.get('grid', '8k+1')} grid, align_corners={t.get('align_corners', True)}, "
        f"its ignore label {t.get('ignore_index', 255)}",
        markup=False,
        highlight=False,
    )
    if d["build"].get("recognised"):
        console.print(f"  recognised from its weights: {d['build']['recognised']}", markup=False, highlight=False)
    tc = d.get("teacher_check")
    if isinstance(tc, dict):
        console.print(
            f"teacher check: mIoU {100 * (tc.get('miou') or 0.0):.1f}%, pixel accuracy "
            f"{100 * (tc.get('pixel_accuracy') or 0.0):.1f}% on {tc.get('images')} labelled images of "
            f"{tc.get('split', '?')} (chance {100 * (tc.get('chance_miou') or 0.0):.1f}%): {tc.get('verdict')}"
        )
    elif not t.get("random_weights"):
        console.print("teacher check: not run (--no-teacher-check, or a store built before the check existed)")


def _print_targets(d: dict) -> None:
    """The dataset the targets label, and how the logits and features are stored."""
    ds = d["dataset"]
    names = ", ".join(ds["class_names"][:8]) + (", …" if len(ds["class_names"]) > 8 else "")
    console.print(
        f"dataset [bold]{ds['name']}[/], split(s) {', '.join(ds['splits'])}: {ds['num_images']} images, "
        f"{ds['num_classes']} classes ({names}), ignore index {ds['ignore_index']}"
    )
    lg, ft = d["logits"], d["features"]
    params = ", ".join(f"{k}={v}" for k, v in (lg["params"] or {}).items())
    console.print(
        f"logits: codec [bold]{lg['codec']}[/]{f' ({params})' if params else ''}, canvas {lg['grid'][0]}x{lg['grid'][1]}, "
        f"{lg['compressor']['name']} level {lg['compressor']['level']}"
    )
    if ft:
        console.print(
            f"features: codec [bold]{ft['codec']}[/], {ft['stored_channels']} of {ft['channels']} channels stored, "
            f"{ft['pool']}-pooled {ft['block'][0]}x{ft['block'][1]} cells on the grid"
        )
    else:
        console.print("features: none (this cache cannot drive the pair-wise loss)")


def _arrays_table(arrays: list[dict]) -> Any:
    """A table of the store's arrays: shape, dtype, chunking, codecs and bytes on disk."""
    from rich.table import Table

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("array", "shape", "dtype", "chunk / shard", "codecs", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for a in arrays:
        cs = str(a["chunks"]) + (f" / {a['shards']}" if a["shards"] else "")
        codecs = " + ".join(
            c.replace("sharding_indexed", "shards").replace("(level=", "(") for c in a["codecs"] if c != "bytes"
        )
        table.add_row(a["path"], str(a["shape"]), a["dtype"], cs, codecs, _fmt_bytes(a["bytes"]))
    return table


def _fidelity_line(fid: dict) -> str:
    """The codec's measured fidelity, as the build recorded it."""
    if not fid.get("sampled_entries"):
        return "fidelity: not measured"
    line = (
        f"fidelity on {fid['sampled_entries']} entries: KL T=1 mean {fid['kl_t1_mean']:.2e} max {fid['kl_t1_max']:.2e}; "
        f"T=4 mean {fid['kl_t4_mean']:.2e} max {fid['kl_t4_max']:.2e}; argmax agreement {100 * fid['argmax_agreement']:.3f}%"
    )
    if "pair_cos_err_max" in fid:
        line += f"; pair-wise cosine error mean {fid['pair_cos_err_mean']:.1e} max {fid['pair_cos_err_max']:.1e}"
    return line


def _precision_line(b: dict) -> str:
    """The teacher's precision and, for anything but fp32, its measured error against fp32."""
    err = b.get("precision_error") or {}
    line = f"teacher precision {b.get('precision', 'unrecorded')}"
    if err.get("exact"):
        return line + " (exact: the reference)"
    if "kl_t1_mean" in err:
        line += (
            f"; vs fp32: KL T=1 mean {err['kl_t1_mean']:.2e}, argmax {100 * err.get('argmax_agreement', 0.0):.3f}%, "
            f"max |Δlogit| {err.get('max_abs_logit_diff', float('nan')):.3g}"
        )
    return line


# ------------------------------------------------------------------------------------------------
# verify


def verify(
    url: Annotated[str, typer.Argument(help="Cache URL (path or fsspec URL).")],
    dataset: Annotated[
        Path | None, typer.Option("--dataset", help="Dataset root: also check the image files' sha256 fingerprints.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Shards checked in parallel.")] = 8,
    show: Annotated[int, typer.Option(help="Problems to list (all with --json).")] = 20,
    json_out: _Json = False,
    storage_option: _StorageOpt = None,
    cache_dir: _CacheDir = None,
) -> None:
    """Decode every entry and compare it with its build-time checksum; exit 1 unless the cache is sound."""
    from .verify import verify_cache

    in_range("--workers", workers, 1, 1024)
    in_range("--show", show, 0)
    opts = parse_storage_options(storage_option)
    kwargs = dict(
        dataset_root=str(dataset) if dataset is not None else None,
        storage_options=opts,
        cache_dir=str(cache_dir) if cache_dir else None,
        workers=workers,
    )
    if json_out:
        report = verify_cache(url, **kwargs)  # type: ignore[arg-type]
        print_json(report.to_dict())
        _exit(0 if report.sound else 1)
        return
    with progress_bar("verify", total=None, unit="entries") as update:

        def progress(done: int, total: int, nbytes: int) -> None:
            update(done, total=total, extra=f"{nbytes / 1e6:.1f} MB")

        report = verify_cache(url, progress=progress, **kwargs)  # type: ignore[arg-type]
    rate = report.bytes_read / max(report.seconds, 1e-9) / 1e6
    console.print(
        f"checked {report.num_entries} entries in {report.num_shards} shards, {_fmt_bytes(report.bytes_read)} "
        f"in {report.seconds:.1f} s ({rate:.1f} MB/s)"
        + (f"; {report.images_checked} image files fingerprinted" if dataset is not None else "")
    )
    for p in report.problems[: max(0, show)]:
        where = f" entry {p.entry}" if p.entry is not None else ""
        err_console.print(f"  [yellow]{p.kind}[/] {p.image_id}{where}: {p.reason}", highlight=False)
    if len(report.problems) > show:
        err_console.print(f"  … {len(report.problems) - show} more (see --json)")
    if report.dataset_extra:
        console.print(f"the dataset holds {report.dataset_extra} image(s) of these splits that the cache does not")
    if report.sound:
        console.print(f"[green]{report.summary()}[/]")
        return
    err_console.print(f"[bold red]{report.summary()}[/]", highlight=False, soft_wrap=True)
    _exit(1)


# ------------------------------------------------------------------------------------------------
# preview


def preview(
    url: Annotated[str, typer.Argument(help="Cache URL (path or fsspec URL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")],
    index: Annotated[list[int] | None, typer.Option("--index", "-i", help="Entry index (repeatable).")] = None,
    image_id: Annotated[list[str] | None, typer.Option("--id", help="Image id: all its entries (repeatable).")] = None,
    sheet: Annotated[int | None, typer.Option(help="A contact sheet of N entries spread over the cache.")] = None,
    dataset: Annotated[
        Path | None, typer.Option("--dataset", help="Dataset root, to draw the images under the maps.")
    ] = None,
    dpi: Annotated[int, typer.Option(help="Resolution of the PNG.")] = 110,
    json_out: _Json = False,
    storage_option: _StorageOpt = None,
    cache_dir: _CacheDir = None,
) -> None:
    """Draw entries as one PNG: image + crop box, teacher argmax, uncertainty, features (PCA)."""
    from .preview import render_preview

    in_range("--dpi", dpi, 10, 1200)
    in_range("--sheet", sheet, 1, 1024)
    for i in index or ():
        in_range("--index", i, 0)
    check_destination(str(out), "--out")
    report = render_preview(
        url,
        out,
        indices=index,
        ids=image_id,
        sheet=sheet,
        dataset_root=dataset,
        storage_options=parse_storage_options(storage_option),
        cache_dir=str(cache_dir) if cache_dir else None,
        dpi=dpi,
    )
    if json_out:
        print_json(report.to_dict())
        return
    for w in report.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    what = f"{len(report.entries)} entr{'y' if len(report.entries) == 1 else 'ies'}"
    hint = "" if report.with_images else " (maps only; pass --dataset ROOT to draw the images)"
    console.print(f"wrote [bold]{report.out}[/]: {what}{hint}")


# ------------------------------------------------------------------------------------------------
# copy, subset, merge


def copy(
    src: Annotated[str, typer.Argument(help="Cache to copy (path or fsspec URL).")],
    dst: Annotated[str, typer.Argument(help="Destination (path or fsspec URL); a partial copy is continued.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different cache at DST.")] = False,
    checksum: Annotated[
        bool, typer.Option("--checksum", help="Compare objects already at DST by content, not size (repairs a copy).")
    ] = False,
    workers: Annotated[int, typer.Option(help="Objects copied in parallel.")] = 8,
    json_out: _Json = False,
    storage_option: _StorageOpt = None,
    dst_storage_option: _DstStorageOpt = None,
) -> None:
    """Copy a cache between any two locations (local ↔ s3 ↔ gcs ...), resumably, verifying every object."""
    from .transfer import copy_cache

    in_range("--workers", workers, 1, 1024)
    check_destination(dst, "DST")
    kwargs = dict(
        **_both_options(storage_option, dst_storage_option),
        overwrite=overwrite,
        checksum=checksum,
        workers=workers,
    )
    if json_out:
        print_json(copy_cache(src, dst, **kwargs).to_dict())  # type: ignore[arg-type]
        return
    with progress_bar("copy", total=None, unit="objects") as update:

        def progress(nbytes: int, total_bytes: int, done: int, total: int) -> None:
            update(done, total=total, extra=f"{nbytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB")

        rep = copy_cache(src, dst, progress=progress, **kwargs)  # type: ignore[arg-type]
    rate = rep.bytes_copied / max(rep.seconds, 1e-9) / 1e6
    console.print(
        f"copied {rep.copied} of {rep.objects} objects ({_fmt_bytes(rep.bytes_copied)}, {rate:.1f} MB/s), "
        f"{rep.skipped} already there; every copied object read back and compared. "
        f"[bold]{rep.dst}[/] opens as a cache"
    )


def _both_options(storage_option, dst_storage_option) -> dict:
    """storage_options of the source and of the destination, as the transfer functions take them."""
    return {
        "storage_options": parse_storage_options(storage_option),
        "dst_storage_options": parse_storage_options(dst_storage_option) if dst_storage_option else None,
    }


def _rewrite(fn, args: tuple, kwargs: dict, json_out: bool, label: str, verb: str) -> None:
    """Run subset_cache / merge_caches with a progress bar and a summary, or print its JSON report."""
    if json_out:
        print_json(fn(*args, **kwargs).to_dict())
        return
    with progress_bar(label, total=None, unit="entries") as update:
        rep = fn(*args, progress=lambda d, t: update(d, total=t), **kwargs)
    _write_summary(rep, verb)


def _write_summary(rep, verb: str) -> None:
    s = rep.schema
    resumed = f" (resumed: {rep.shards_written} shard(s) left to write)" if rep.resumed else ""
    console.print(
        f"{verb} [bold]{rep.dst}[/]: {rep.images} images, {rep.entries} entries in {rep.shards} shards, "
        f"splits {', '.join(s.dataset.splits)}, {rep.seconds:.1f} s{resumed}"
    )
    fid = s.fidelity
    if fid.get("sampled_entries"):
        console.print(
            f"fidelity recomputed on {fid['sampled_entries']} entries: KL(T=1) mean {fid['kl_t1_mean']:.2e}, "
            f"argmax agreement {100 * fid['argmax_agreement']:.3f}%"
        )


def _read_ids(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SkdError(f"cannot read the id list {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _rewrite_options(shard_size: int | None, workers: int, seed: int = 0) -> None:
    """The numeric options subset and merge share, checked in one line each."""
    in_range("--seed", seed, 0, 2**63 - 1)
    in_range("--shard-size", shard_size, 1, 65536)
    in_range("--workers", workers, 1, 1024)


def subset(
    src: Annotated[str, typer.Argument(help="Cache to cut (path or fsspec URL).")],
    dst: Annotated[str, typer.Argument(help="New cache to write.")],
    split: Annotated[str | None, typer.Option(help="Keep the images of this split (ids 'split/...').")] = None,
    ids: Annotated[
        Path | None, typer.Option("--ids", help="Keep the image ids listed in this file (one per line).")
    ] = None,
    fraction: Annotated[float | None, typer.Option(help="Keep a random fraction of the images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of --fraction.")] = 0,
    shard_size: Annotated[int | None, typer.Option(help="Images per shard (default: the source's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different cache at DST.")] = False,
    workers: Annotated[int, typer.Option(help="Shards written in parallel.")] = 4,
    json_out: _Json = False,
    storage_option: _StorageOpt = None,
    dst_storage_option: _DstStorageOpt = None,
) -> None:
    """Write a new cache with some images of SRC (encoded parts copied as they are; resumable)."""
    from .transfer import subset_cache

    if sum(x is not None for x in (split, ids, fraction)) != 1:
        raise ConfigError("choose exactly one of --split, --ids and --fraction")
    if fraction is not None and not 0 < fraction <= 1:  # also refuses NaN
        raise ConfigError(f"--fraction must be in (0, 1], got {fraction}")
    _rewrite_options(seed=seed, shard_size=shard_size, workers=workers)
    check_destination(dst, "DST")
    kwargs = dict(
        split=split,
        ids=_read_ids(ids) if ids is not None else None,
        fraction=fraction,
        seed=seed,
        **_both_options(storage_option, dst_storage_option),
        shard_images=shard_size,
        overwrite=overwrite,
        workers=workers,
    )
    _rewrite(subset_cache, (src, dst), kwargs, json_out, "subset", "wrote")


def merge(
    dst: Annotated[str, typer.Argument(help="New cache to write.")],
    srcs: Annotated[list[str], typer.Argument(help="Caches built in parts with the same configuration.")],
    shard_size: Annotated[int | None, typer.Option(help="Images per shard (default: the largest source's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different cache at DST.")] = False,
    workers: Annotated[int, typer.Option(help="Shards written in parallel.")] = 4,
    json_out: _Json = False,
    storage_option: _StorageOpt = None,
    dst_storage_option: _DstStorageOpt = None,
) -> None:
    """Merge caches built in parts (same teacher and configuration, disjoint images) into DST."""
    from .transfer import merge_caches

    _rewrite_options(shard_size=shard_size, workers=workers)
    check_destination(dst, "DST")
    kwargs = dict(
        **_both_options(storage_option, dst_storage_option),
        shard_images=shard_size,
        overwrite=overwrite,
        workers=workers,
    )
    _rewrite(merge_caches, (dst, srcs), kwargs, json_out, "merge", f"merged {len(srcs)} caches into")


# ------------------------------------------------------------------------------------------------
# diff


def diff(
    a: Annotated[str, typer.Argument(help="First cache (the reference: KL is measured from A to B).")],
    b: Annotated[str, typer.Argument(help="Second cache of the same images.")],
    max_entries: Annotated[int | None, typer.Option(help="Compare this many entries, spread evenly.")] = None,
    workers: Annotated[int, typer.Option(help="Entries compared in parallel.")] = 4,
    json_out: _Json = False,
    storage_option: _StorageOpt = None,
) -> None:
    """Compare two teachers' targets on the same images: argmax agreement, KL, pair-wise cosines."""
    from rich.table import Table

    from .diff import diff_caches

    in_range("--max-entries", max_entries, 1)
    in_range("--workers", workers, 1, 1024)
    opts = parse_storage_options(storage_option)
    if json_out:
        print_json(diff_caches(a, b, storage_options=opts, max_entries=max_entries, workers=workers).to_dict())
        return
    with progress_bar("diff", total=None, unit="entries") as update:
        rep = diff_caches(
            a,
            b,
            storage_options=opts,
            max_entries=max_entries,
            workers=workers,
            progress=lambda d, t: update(d, total=t),
        )
    console.print(
        f"A = {rep.a} (teacher [bold]{rep.teacher_a}[/]), B = {rep.b} (teacher [bold]{rep.teacher_b}[/]): "
        f"{rep.entries} of {rep.entries_total} {rep.mode} entries, {rep.nodes} grid nodes"
    )
    console.print(
        f"argmax agreement [bold]{100 * rep.argmax_agreement:.2f}%[/]; KL(A‖B) at T=1 mean {rep.kl_t1_mean:.3e}, "
        f"max {rep.kl_t1_max:.3e}"
    )
    if rep.pair_cos_diff_mean is not None:
        console.print(f"pair-wise cosine difference mean {rep.pair_cos_diff_mean:.3e}, max {rep.pair_cos_diff_max:.3e}")
    else:
        console.print("pair-wise: not compared (a cache without features)")
    table = Table(title="agreement per class of A's argmax", box=None, header_style="bold")
    table.add_column("class")
    table.add_column("agreement", justify="right")
    for name, v in sorted(rep.class_agreement.items(), key=lambda kv: kv[1]):
        table.add_row(name, f"{100 * v:.2f}%")
    console.print(table)
    if rep.worst:
        console.print(
            "most different entries: "
            + "; ".join(
                f"{w['image_id']} (entry {w['entry']}, KL {w['kl_t1_mean']:.2e}, {100 * w['argmax_agreement']:.1f}%)"
                for w in rep.worst
            )
        )


def register_commands(app: typer.Typer) -> None:
    """Add the cache commands to an app."""
    app.command("info")(info)
    app.command("verify")(verify)
    app.command("preview")(preview)
    app.command("copy")(copy)
    app.command("subset")(subset)
    app.command("merge")(merge)
    app.command("diff")(diff)
