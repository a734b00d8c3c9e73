"""Shards in object storage and over HTTP, end to end: `dist-seg convert` publishing to an S3-compatible server
(moto, a real process) that training then reads, and a 2-process torchrun run that trains and evaluates from
shards behind an HTTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_utils import REPO, torchrun
from servers import moto_server, url
from tiny_shards import assert_same, batches, cfg, make_coco

from dist_seg.data.format.shards import resolve_shards
from dist_seg.data.loading.train_loader import build_train_loader


def test_convert_publishes_to_s3_and_training_reads_it(tmp_path: Path) -> None:
    pytest.importorskip("s3fs", reason="the s3 extra (pip install 'dist-seg[s3]') is not installed")
    pytest.importorskip("moto", reason="moto[server] (a test dependency) is not installed")
    ann, imgs = make_coco(tmp_path / "coco", list(range(1, 13)))
    local = tmp_path / "local"
    with moto_server():
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("datasets")
        convert = [sys.executable, "-m", "dist_seg.cli", "convert", "--coco", str(ann), "--images", str(imgs)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for out, extra in (
            (str(local), []),
            ("s3://datasets/trash/train", []),
            ("s3://datasets/trash/train", []),
        ):
            r = subprocess.run(
                [*convert, "--out", out, "--samples-per-shard", "4", "--quiet", *extra],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert r.returncode == 0, r.stderr[-2000:]
        listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls("datasets/trash/train", refresh=True))
        assert listed == sorted(p.name for p in local.iterdir())
        want = batches(build_train_loader(cfg(train_shards=str(local)), 0, 1, seed=0))
        loader = build_train_loader(cfg(train_shards="s3://datasets/trash/train"), 0, 1, seed=0)
        assert_same(batches(loader), want)
        # re-publishing fewer shards deletes the stale ones
        r = subprocess.run(
            [*convert, "--out", "s3://datasets/trash/train", "--samples-per-shard", "6", "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("datasets/trash/train", refresh=True))
        assert names == [
            "manifest.json",
            *[f"shard-{i:06d}.{e}" for i in range(2) for e in ("idx.json", "tar")],
        ]
        assert len(resolve_shards("s3://datasets/trash/train").paths) == 2


def test_two_process_torchrun_trains_and_evaluates_from_http(server, tiny_shards, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = torchrun(
        [
            "--module",
            "dist_seg.train",
            "--config",
            str(REPO / "configs/cpu_small.yaml"),
            f"data.train_shards={url(server, tiny_shards, 'train4')}",
            f"data.val_shards={url(server, tiny_shards, 'eval5')}",
            f"train.out_dir={out}",
            "data.crop_size=32",
            "model.name=fcn8s",
            "data.num_workers=1",
            "train.max_steps=6",
            "train.eval_every=6",
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "final val mIoU" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 6
    assert 0.0 <= metrics["miou"] <= 1.0
    served = {p for p in server.requests if p.endswith(".tar")}
    assert served == {
        str((tiny_shards[n] / f"shard-{i:06d}.tar").relative_to(server.root))
        for n, k in (("train4", 4), ("eval5", 5))
        for i in range(k)
    }
    # evaluate and predict take the same URLs as the trainer, from the command line
    cli = [sys.executable, "-m", "dist_seg.cli"]
    common = ["--config", str(REPO / "configs/cpu_small.yaml"), "--checkpoint", str(out / "last.pt")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ev = tmp_path / "eval"
    r = subprocess.run(
        [*cli, "evaluate", *common, "--shards", url(server, tiny_shards, "eval1"), "--out", str(ev)]
        + ["data.crop_size=32", "model.name=fcn8s"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((ev / "metrics.json").read_text())["num_images"] == 23
    pred = tmp_path / "pred"
    r = subprocess.run(
        [
            *cli,
            "predict",
            *common,
            "--shards",
            url(server, tiny_shards, "test"),
            "--out",
            str(pred),
            "--quiet",
        ]
        + ["data.crop_size=32", "model.name=fcn8s"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(pred.glob("*.png"))) == 7
