"""The cache commands of ``skdcache`` that need no torch: info (and the team tools).

:func:`register_commands` adds them to the ``skdcache`` typer app defined in ``pipeline.cli``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .clikit import console, parse_storage_options, print_json

__all__ = ["register_commands"]

_StorageOpt = Annotated[
    list[str] | None, typer.Option("--storage-option", "-S", help="fsspec option KEY=VALUE (repeatable).")
]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def info(
    url: Annotated[str, typer.Argument(help="Cache URL (path or fsspec URL).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    storage_option: _StorageOpt = None,
) -> None:
    """Summarise a cache: format, teacher, dataset, arrays, bytes, fidelity."""
    from rich.table import Table

    from .inspect import describe_cache

    d = describe_cache(url, storage_options=parse_storage_options(storage_option))
    if json_out:
        print_json(d)
        return
    t = d["teacher"]
    ds = d["dataset"]
    console.print(f"[bold]{d['url']}[/]  skd-cache format v{d['format_version']}  status [bold]{d['status']}[/]")
    console.print(
        f"mode [bold]{d['mode']}[/]: {d['entries']} entries ({d['entries_done']} done), "
        f"{d['entries_per_image']} per image, {d['shards']} shards of {d['shard_entries']}"
    )
    if d["views"]:
        v = d["views"]
        console.print(f"views: seed {v['seed']}, crop {v['crop'][0]}x{v['crop'][1]}, scales {v['scales'][0]}–{v['scales'][-1]}, flip {v['flip']}")
    if d["dense"]:
        v = d["dense"]
        console.print(f"dense: inference {v['inference']}, mirrored pass {v['flip']}")
    weights = t["weights_sha256"][:16] + "…" if t["weights_sha256"] else ("random (seed %s)" % t["seed"])
    console.print(
        f"teacher [bold]{t['name']}[/] {t['architecture']}, {t['parameters'] / 1e6:.2f} M params, weights {weights}, "
        f"input {t['normalization'].get('order')} mean {[round(x, 2) for x in t['normalization'].get('mean', [])]} "
        f"std {[round(x, 2) for x in t['normalization'].get('std', [])]}"
    )
    console.print(
        f"dataset [bold]{ds['name']}[/] splits {','.join(ds['splits'])}: {ds['num_images']} images, "
        f"{ds['num_classes']} classes, ignore {ds['ignore_index']}"
    )
    lg, ft = d["logits"], d["features"]
    console.print(f"logits: codec {lg['codec']} {lg['params'] or ''} grid {lg['grid'][0]}x{lg['grid'][1]}")
    if ft:
        console.print(
            f"features: codec {ft['codec']} {ft['stored_channels']}/{ft['channels']} ch, {ft['pool']}-pooled "
            f"{ft['block'][0]}x{ft['block'][1]} cells on the grid"
        )
    else:
        console.print("features: none (no pair-wise loss from this cache)")
    table = Table(show_header=True, header_style="bold")
    for col in ("array", "shape", "dtype", "chunks / shards", "codecs", "bytes"):
        table.add_column(col)
    for a in d["arrays"]:
        cs = str(a["chunks"]) + (f" / {a['shards']}" if a["shards"] else "")
        table.add_row(a["path"], str(a["shape"]), a["dtype"], cs, " + ".join(a["codecs"]), _fmt_bytes(a["bytes"]))
    console.print(table)
    unit = "view" if d["mode"] == "views" else "image"
    console.print(
        f"on disk {_fmt_bytes(d['bytes_total'])}; targets {_fmt_bytes(d['bytes_per_entry'])} per {unit} "
        f"(logits {_fmt_bytes(d['bytes_logits_per_entry'])}, features {_fmt_bytes(d['bytes_features_per_entry'])})"
    )
    fid = d["fidelity"]
    if fid.get("sampled_entries"):
        line = (
            f"fidelity ({fid['sampled_entries']} entries): KL T=1 mean {fid['kl_t1_mean']:.2e} max {fid['kl_t1_max']:.2e}; "
            f"T=4 mean {fid['kl_t4_mean']:.2e} max {fid['kl_t4_max']:.2e}; argmax {100 * fid['argmax_agreement']:.3f}%"
        )
        if "pair_cos_err_max" in fid:
            line += f"; pair cosine err mean {fid['pair_cos_err_mean']:.1e} max {fid['pair_cos_err_max']:.1e}"
        console.print(line)
    b = d["build"]
    if b:
        console.print(
            f"built with skd {d['tool_version']} on {b.get('device', '?')} in {b.get('seconds', '?')} s "
            f"({d['created']} → {d['completed'] or 'unfinished'}); clipped values {b.get('clipped_values', 0)}"
        )


def register_commands(app: typer.Typer) -> None:
    """Add the cache commands to an app."""
    app.command("info")(info)
