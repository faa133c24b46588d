"""From a teacher's exact outputs to what a store holds for one entry, and shards of such entries.

Every tool that writes entries goes through :func:`encode_entry` (encode -> checksum -> fidelity)
and :func:`write_encoded_shard` (stack the parts of a shard's entries, write the shard whole): the
build (``pipeline/build.py``) and the test-store helper (``cache_tools/testing.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .codecs import FeatureCodec, LogitCodec
from .fidelity import compose_nodes, entry_fidelity, official_kernel
from .schema import FIDELITY_COLUMNS, TargetLayout
from .store import CacheWriter, entry_checksum

__all__ = ["EncodedEntry", "encode_entry", "write_encoded_shard"]


@dataclass(frozen=True)
class EncodedEntry:
    """What a store holds for one entry besides its view.

    Attributes:
        parts: target ("logits", "features") -> part name -> encoded array.
        checksum: :func:`~cache_tools.store.entry_checksum` of ``parts``.
        fidelity: one row of :data:`~cache_tools.schema.FIDELITY_COLUMNS` (NaN when not measured).
        clipped: values the lossy codecs clipped.
    """

    parts: dict[str, dict[str, np.ndarray]]
    checksum: int
    fidelity: np.ndarray
    clipped: int


def encode_entry(
    logits: np.ndarray,
    cells: np.ndarray | None,
    grid: tuple[int, int],
    *,
    logit_codec: LogitCodec,
    feature_codec: FeatureCodec | None = None,
    features: TargetLayout | None = None,
    measure: bool = True,
) -> EncodedEntry:
    """Encode one entry's exact outputs, checksum the parts and (if ``measure``) measure the fidelity.

    Args:
        logits: ``(K, H, W)`` on the store's canvas; the entry's valid part is ``[:, :h, :w]``.
        cells: ``(C, hp, wp)`` pooled feature cells on the canvas' cells, or None without features.
        grid: ``(h, w)`` the valid extent of the entry's logit grid (``entries/grid``).
        feature_codec: the features codec (with its tables), when ``cells`` is given.
        features: the store's features layout (block, pool), when ``cells`` is given.
        measure: compute the fidelity row (decode and compare); else the row is NaN.
    """
    parts = {}
    parts["logits"], clipped = logit_codec.encode(logits)
    if cells is not None:
        assert feature_codec is not None and features is not None
        parts["features"], over = feature_codec.encode(cells)
        clipped += over
    row = np.full(len(FIDELITY_COLUMNS), np.nan, dtype=np.float32)
    if measure:
        h, w = grid
        ref_nodes = dec_nodes = None
        if cells is not None:
            kernel = official_kernel(h, w)
            valid = cells[:, : -(-h // features.block[0]), : -(-w // features.block[1])]  # type: ignore[union-attr]
            decoded = feature_codec.decode(parts["features"])[:, : valid.shape[1], : valid.shape[2]]  # type: ignore[union-attr]
            ref_nodes, dec_nodes = (
                compose_nodes(c, features.block, (h, w), kernel, features.pool)  # type: ignore[union-attr]
                for c in (valid, decoded)
            )
        row = entry_fidelity(logits[:, :h, :w], logit_codec.decode(parts["logits"])[:, :h, :w], ref_nodes, dec_nodes)
    return EncodedEntry(parts, entry_checksum(parts), row, clipped)


def write_encoded_shard(writer: CacheWriter, shard: int, entries: list[EncodedEntry], image_sha256: np.ndarray) -> int:
    """Write one whole shard from its entries in order; returns the bytes of encoded values written.

    Args:
        image_sha256: ``(images of the shard, 32)`` uint8 digests of the image files.
    """

    def stacked(target: str) -> dict[str, np.ndarray] | None:
        if target not in entries[0].parts:
            return None
        return {name: np.stack([e.parts[target][name] for e in entries]) for name in entries[0].parts[target]}

    return writer.write_shard(
        shard,
        logits=stacked("logits"),  # type: ignore[arg-type]
        features=stacked("features"),
        image_sha256=image_sha256,
        checksums=np.array([e.checksum for e in entries], dtype=np.uint64),
        fidelity=np.stack([e.fidelity for e in entries]),
        clipped=np.array([e.clipped for e in entries], dtype=np.uint32),
    )
