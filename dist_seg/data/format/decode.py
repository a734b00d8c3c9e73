"""A sample's bytes, decoded and checked, and the data.on_error policy that counts what cannot be.

Only `jpg`/`jpeg`/`png`/`seg.png`/`json` members are ever read (READ_EXTS) and decoded (torchvision.io and
json; nothing is unpickled). A sample that cannot be used is a ShardError naming its shard (redacted) and key.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_png

from dist_seg.data import IGNORE_INDEX
from dist_seg.data.format.shards import ShardError
from dist_seg.data.format.urls import redact

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png")
READ_EXTS = frozenset((*IMAGE_EXTS, "seg.png", "json"))  # every other member stays unread
assert IGNORE_INDEX == 255, "decode_sample's label range check relies on uint8 wrap-around"


@dataclass
class RawSample:
    shard: str
    key: str
    members: dict[str, bytes]  # extension ("jpg", "seg.png", "json") -> bytes (a bytearray); only READ_EXTS
    index: int = -1  # position of the sample in its shard (tar order)


@dataclass
class Sample:
    key: str
    image: Tensor  # uint8 [3, H, W]
    mask: Tensor | None  # uint8 [H, W]
    meta: dict[str, Any] | None


def decode_sample(raw: RawSample, labelled: bool, num_classes: int) -> Sample:
    """Decode image (torchvision.io, libjpeg-turbo), label map and metadata json; ShardError on bad data."""
    where = f"shard {redact(raw.shard)}: sample {raw.key!r}"
    ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    if ext is None:
        raise ShardError(f"{where}: no .jpg/.png image member", raw.shard, raw.key)
    if labelled and "seg.png" not in raw.members:
        raise ShardError(f"{where}: no .seg.png label map in a labelled dataset", raw.shard, raw.key)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders for TorchCodec (pyproject pins < 0.30); they remain the
            # fastest way from JPEG bytes to a uint8 tensor here (benchmarks/input_pipeline.py measures it)
            warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
            image = decode_image(_tensor(raw.members[ext]), mode=ImageReadMode.RGB)
            seg = raw.members["seg.png"] if labelled else None
            mask = decode_png(_tensor(seg), mode=ImageReadMode.GRAY)[0] if seg is not None else None
        meta = json.loads(raw.members["json"]) if "json" in raw.members else None
    except (RuntimeError, ValueError) as e:
        raise ShardError(f"{where}: cannot decode: {e}", raw.shard, raw.key) from e
    if mask is not None:
        if mask.shape != image.shape[1:]:
            raise ShardError(
                f"{where}: label map {tuple(mask.shape)} vs image {tuple(image.shape[1:])}",
                raw.shard,
                raw.key,
            )
        # a map without ignore pixels passes on its max alone; with them, uint8 wraps 255 (ignore) to 0, so
        # valid maps have every value + 1 <= num_classes (~20x faster than comparing twice). A bad value would
        # otherwise surface as a device assert in the loss
        if int(mask.max()) >= num_classes and int((mask + 1).max()) > num_classes:
            raise ShardError(
                f"{where}: label map has values >= num_classes={num_classes}", raw.shard, raw.key
            )
    return Sample(raw.key, image, mask, meta)


def _tensor(data: bytes | bytearray) -> Tensor:
    if not isinstance(data, bytearray):
        data = bytearray(data)  # a copy: torch wants a writable buffer (the tar reader gives bytearrays)
    return torch.frombuffer(data, dtype=torch.uint8)


class ErrorPolicy:
    """on_error bookkeeping of one worker for one pass: raise, or count, warn once per shard and cap."""

    def __init__(self, mode: str, max_errors: int, already: int = 0):
        self.mode, self.cap, self.already = mode, max_errors, already
        self.count = 0
        self.warned: set[str | None] = set()

    def handle(self, err: ShardError, lost: int = 1) -> None:
        if self.mode == "raise":
            raise err
        self.count += lost
        if err.shard not in self.warned:
            self.warned.add(err.shard)
            log.warning(
                "on_error=skip: skipped %d sample(s): %s (later errors in this shard: counted only)",
                lost,
                err,
            )
        if self.already + self.count > self.cap:
            raise ShardError(
                f"{self.already + self.count} samples skipped, more than data.max_errors={self.cap}; last: {err}",
                err.shard,
                err.key,
            ) from err
