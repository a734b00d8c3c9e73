"""URL names and credential redaction (dist_seg.data.format.urls): what `redact` removes from any text, what it
keeps byte for byte, what `check_url` refuses, and that errors from a real server never carry the credential
of the URL they name (not even in a chained exception)."""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path

import pytest
from servers import ShardServer

from dist_seg.config.schema import Config
from dist_seg.data.format.shards import resolve_shards
from dist_seg.data.format.urls import REDACTED, check_url, has_credentials, redact, redacted_config, server

SIGNED = (
    "https://bucket.s3.amazonaws.com/ds/shard-000001.tar?versionId=a%2Fb&X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20250101&X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE"
    "&X-Amz-Signature=0123abcd&X-Amz-Expires=3600"
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://TOKEN@host.example/shards", "https://host.example/shards"),
        ("https://alice:pw@host.example:8443/a/b.tar", "https://host.example:8443/a/b.tar"),
        ("http://[::1]:8000/x.tar", "http://[::1]:8000/x.tar"),
        ("gs://bucket/path/{000000..000009}.tar", "gs://bucket/path/{000000..000009}.tar"),
        ("https://h.example/x.tar?sig=abc&sv=2022-11-02", f"https://h.example/x.tar?sig={REDACTED}&sv=2022-11-02"),
        ("https://h.example/x.tar?access_token=t&key=k&page=2", f"https://h.example/x.tar?access_token={REDACTED}&key={REDACTED}&page=2"),
        ("https://h.example/x.tar?password=p&code=c&encoding=utf8", f"https://h.example/x.tar?password={REDACTED}&code={REDACTED}&encoding=utf8"),
        ("/data/shards/train", "/data/shards/train"),
        ("file:///data/shards/train", "file:///data/shards/train"),
        # no credential: the URL exactly as typed (an MLflow store; re-assembled it would lose a slash)
        ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
        ("sqlite:///runs/mlflow.db", "sqlite:///runs/mlflow.db"),
        ("https://h.example:8443/a%2Fb.tar?page=2", "https://h.example:8443/a%2Fb.tar?page=2"),
    ],
)  # fmt: skip
def test_redact_removes_user_info_and_secret_parameters_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert has_credentials(url) == (url != shown)
    assert redact(shown) == shown  # idempotent


def test_signed_urls_keep_their_other_parameters_byte_for_byte() -> None:
    shown = redact(SIGNED)
    for secret in ("AKIAEXAMPLE", "FQoGZXIvYXdzEXAMPLE", "0123abcd"):
        assert secret not in shown
    # kept exactly as given (re-encoding versionId's %2F would name another object)
    assert "versionId=a%2Fb&X-Amz-Algorithm=AWS4-HMAC-SHA256" in shown and "X-Amz-Expires=3600" in shown


def test_every_url_in_a_text_is_redacted() -> None:
    spec = "https://T1@a.example/d/shard-{000000,000001}.tar,https://T2@b.example/e?token=T3"
    assert (
        redact(spec)
        == f"https://a.example/d/shard-{{000000,000001}}.tar,https://b.example/e?token={REDACTED}"
    )
    message = f"cannot read 'https://T4@c.example/x.tar?sig=T5' (404) or <http://u:T6@d.example/y>: {spec}"
    shown = redact(message)
    assert not any(f"T{i}" in shown for i in range(1, 7))
    assert (
        shown.startswith("cannot read 'https://c.example/x.tar?sig=")
        and "(404) or <http://d.example/y>" in shown
    )
    assert redact("no url here: a=b, c") == "no url here: a=b, c"


def test_check_url_refuses_passwords_and_redacted_values() -> None:
    check_url("https://TOKEN@h.example/d", "data.train_shards")  # a token alone is used, never written
    with pytest.raises(ValueError, match="carries a password") as e:
        check_url("https://alice:s3cret@h.example/d", "data.train_shards")
    assert "s3cret" not in str(e.value) and "alice" not in str(e.value)
    with pytest.raises(ValueError, match="redacted when it saved a config"):
        check_url(redact("https://h.example/d?sig=abc"), "data.train_shards")
    with pytest.raises(ValueError, match="redacted when it saved a config"):
        resolve_shards(redact("https://h.example/d?sig=abc"))


def test_redacted_config_redacts_every_string_of_every_section() -> None:
    cfg = Config()
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            train_shards="https://T1@h.example/train,https://h.example/more?token=T2",
            val_shards="s3://bucket/val?X-Amz-Signature=T3",
        ),
        model=dataclasses.replace(cfg.model, pretrained="https://u:T4@h.example/vgg16_bn.pth"),
    )
    shown = redacted_config(cfg)
    assert isinstance(shown, Config)
    text = repr(shown)
    assert not any(f"T{i}" in text for i in range(1, 5))
    assert shown.data.train_shards == f"https://h.example/train,https://h.example/more?token={REDACTED}"
    assert shown.model.pretrained == "https://h.example/vgg16_bn.pth"
    assert dataclasses.replace(shown, data=cfg.data, model=cfg.model) == cfg  # nothing else changed
    assert cfg.data.train_shards.startswith("https://T1@")  # the run's own config keeps its credentials


def test_server_names_scheme_host_and_port_only() -> None:
    assert server("https://TOKEN@h.example:8443/a?b=c") == "https://h.example:8443"


def test_errors_from_a_real_server_never_carry_the_token(tiny_shards: dict[str, Path]) -> None:
    root = tiny_shards["train4"].parent.parent
    with ShardServer(root) as srv:
        srv.missing.add("manifest.json")
        url = f"http://SECRET@127.0.0.1:{srv.port}/{tiny_shards['train4'].relative_to(root)}?sig=SIGSECRET"
        with pytest.raises(ValueError) as e:
            resolve_shards(url)
        shown = "".join(traceback.format_exception(e.value))  # the whole chain, as a crash would print it
        assert "SECRET" not in shown and f"127.0.0.1:{srv.port}" in shown
        srv.missing.clear()
        srv.login = "someone-else"  # 401 for this token: an error from aiohttp, which quotes the URL
        with pytest.raises(OSError) as e:
            resolve_shards(url)
        shown = "".join(traceback.format_exception(e.value))
        assert "401" in shown and "SECRET" not in shown
