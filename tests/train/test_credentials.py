"""A credential in a shard URL is used to read and written nowhere (dist_seg.data.format.urls.redacted_config at
config.yaml, the checkpoints' config, TensorBoard and metrics.json; redaction in every message), and a run
resumed from its own config.yaml gets the credential back the documented way (~/.netrc, named by NETRC),
against an HTTP server that refuses requests without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch_utils import REPO
from servers import ShardServer

from dist_seg.checkpoint import load_checkpoint
from dist_seg.config.loading import load_config
from dist_seg.config.schema import Config
from dist_seg.data.format import remote
from dist_seg.data.format.remote import RemoteError
from dist_seg.runtime.distributed import World
from dist_seg.train.loop import fit

TOKEN = "tok3n-5ecret-c0de"  # a token as the URL's user name, as GitHub and some artifact stores take it


def _files_with(root: Path, needle: bytes) -> list[str]:
    """Files under `root` whose bytes contain `needle` (checkpoints are zip archives of stored, uncompressed
    pickles, and TensorBoard events hold text as UTF-8, so a plain search sees what they hold)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _run(config: Path | str, overrides: list[str]) -> None:
    cfg = load_config(config, overrides)
    assert isinstance(cfg, Config)
    fit(cfg, World(0, 0, 1, torch.device("cpu"), None))


def test_a_url_token_is_never_written_and_a_resume_takes_it_from_netrc(
    tiny_shards: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # nothing from the tester's own ~/.netrc
    monkeypatch.setattr(remote, "_probed", {})
    root = tiny_shards["train4"].parent.parent
    out = tmp_path / "run"
    with ShardServer(root) as srv:
        srv.login = TOKEN  # 401 without it
        rel = tiny_shards["train4"].relative_to(root), tiny_shards["eval1"].relative_to(root)
        train, val = (f"http://{TOKEN}@127.0.0.1:{srv.port}/{r}" for r in rel)
        common = ["data.crop_size=32", "model.name=fcn8s", "data.batch_size=4", "train.log_every=1"]
        _run(
            REPO / "configs/cpu_small.yaml",
            [f"data.train_shards={train}", f"data.val_shards={val}", f"train.out_dir={out}", *common]
            + ["train.max_steps=2", "train.eval_every=2", "train.save_every=2"],
        )
        assert srv.requests  # it read through the server, with the token
        assert _files_with(out, TOKEN.encode()) == []
        ck = load_checkpoint(out / "last.pt", map_location="cpu")
        assert ck["config"]["data"]["train_shards"] == f"http://127.0.0.1:{srv.port}/{rel[0]}"
        assert f"http://127.0.0.1:{srv.port}/{rel[0]}" in (out / "config.yaml").read_text()

        # resumed from the run's own config.yaml, which has no token: refused by the server, and the error
        # names the URL (redacted) and the status
        resume = ["train.resume=auto", "train.max_steps=3"]
        with pytest.raises(RemoteError, match=r"401") as e:
            _run(out / "config.yaml", resume)
        assert f"127.0.0.1:{srv.port}" in str(e.value)
        # the documented way: a netrc entry for the host; the resume continues at step 2 and finishes
        (tmp_path / "netrc").write_text(f"machine 127.0.0.1 login {TOKEN} password unused\n")
        monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
        _run(out / "config.yaml", resume)
        assert load_checkpoint(out / "last.pt", map_location="cpu")["train_state"]["step"] == 3
        assert _files_with(out, TOKEN.encode()) == []
    printed = capsys.readouterr()
    assert TOKEN not in printed.out and TOKEN not in printed.err


def test_an_fsspec_config_supplies_the_credential_to_every_read(
    tiny_shards: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other documented way: an fsspec config (here as FSSPEC_HTTP would set it) whose headers every
    request carries, the ranged reads of shards included, which set a Range header of their own."""
    import base64

    import fsspec.config

    from dist_seg.data.format.reader import ShardReader
    from dist_seg.data.format.remote import RemoteOptions
    from dist_seg.data.format.shards import resolve_shards

    monkeypatch.setenv("NETRC", "/nonexistent")
    root = tiny_shards["train4"].parent.parent
    with ShardServer(root) as srv:
        srv.login = TOKEN
        url = srv.url(str(tiny_shards["train4"].relative_to(root)))
        with pytest.raises(RemoteError, match="401"):
            resolve_shards(url)
        basic = base64.b64encode(f"{TOKEN}:x".encode()).decode()
        monkeypatch.setitem(fsspec.config.conf, "http", {"headers": {"Authorization": f"Basic {basic}"}})
        shard_set = resolve_shards(url)
        reader = ShardReader(shard_set, RemoteOptions())
        keys = [raw.key for raw in reader.samples(shard_set.paths[1], 2, 7)]
        assert (
            len(keys) == 5
            and srv.requests[f"{tiny_shards['train4'].relative_to(root)}/shard-000001.tar"] >= 1
        )
