"""webdataset itself reads dist_seg's shards, locally and over HTTP (a server with Range and `python -m http.server`
without it), as the README shows: every sample the manifest counts, shard by shard, with the image decoded as
RGB and the label map as one channel, equal to what dist_seg's own reader decodes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from servers import ShardServer, http_server_process

from dist_seg.data.format.reader import ShardReader, decode_sample
from dist_seg.data.format.remote import RemoteOptions
from dist_seg.data.format.shards import resolve_shards

wds = pytest.importorskip("webdataset", reason="webdataset is a test dependency (pip install -e .[test])")


def label_map(data: bytes) -> np.ndarray:
    """KEY.seg.png as the README decodes it: 8-bit, one channel (webdataset's image decoders would make RGB)."""
    return np.asarray(Image.open(io.BytesIO(data)))


def read_with_webdataset(urls: list[str]) -> list[tuple[str, torch.Tensor, np.ndarray, dict]]:
    dataset = (
        wds.WebDataset(urls, shardshuffle=False)
        .decode(wds.handle_extension("seg.png", label_map), "torchrgb8")
        .to_tuple("__key__", "jpg;png", "seg.png", "json")
    )
    return list(dataset)


def dist_seg_samples(shard_dir: Path) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    shard_set = resolve_shards(str(shard_dir))
    reader = ShardReader(shard_set, RemoteOptions())
    out = []
    for shard in shard_set.paths:
        for raw in reader.samples(shard):
            s = decode_sample(raw, True, shard_set.num_classes)
            assert s.mask is not None
            out.append((s.key, s.image, s.mask))
    return out


def check(got: list[tuple[str, torch.Tensor, np.ndarray, dict]], shard_dir: Path) -> None:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert len(got) == manifest["total_samples"] == sum(s["samples"] for s in manifest["shards"])
    want = dist_seg_samples(shard_dir)
    assert [k for k, *_ in got] == [k for k, *_ in want]
    for (key, image, mask, meta), (_, image_ds, mask_ds) in zip(got, want, strict=True):
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and torch.equal(image, image_ds)
        assert mask.dtype == np.uint8 and mask.ndim == 2 and np.array_equal(mask, mask_ds.numpy())
        assert meta["key"] == key and (meta["height"], meta["width"]) == tuple(mask.shape)
        assert int(mask[mask != 255].max(initial=0)) < manifest["num_classes"]


def test_webdataset_reads_the_shards_from_disk(tiny_shards: dict[str, Path]) -> None:
    shard_dir = tiny_shards["train4"]
    check(read_with_webdataset([str(p) for p in sorted(shard_dir.glob("shard-*.tar"))]), shard_dir)


@pytest.mark.parametrize("server", ["ranges", "python -m http.server"])
def test_webdataset_reads_the_shards_over_http(tiny_shards: dict[str, Path], server: str) -> None:
    shard_dir = tiny_shards["eval5"]
    root = shard_dir.parent.parent
    rel = shard_dir.relative_to(root)
    names = [s["name"] for s in json.loads((shard_dir / "manifest.json").read_text())["shards"]]
    if server == "ranges":
        with ShardServer(root) as srv:
            got = read_with_webdataset([srv.url(f"{rel}/{n}") for n in names])
            assert {p for p in srv.requests if p.endswith(".tar")} == {f"{rel}/{n}" for n in names}
    else:
        with http_server_process(root) as base:
            got = read_with_webdataset([f"{base}/{rel}/{n}" for n in names])
    check(got, shard_dir)
