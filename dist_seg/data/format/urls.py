"""URL names and credentials: what is a URL, joining its parts, and the one redaction of secrets in URLs.

Credentials reach a URL in three places: its user info (`https://TOKEN@host/...`, `https://user:pw@host/`),
its query string (signed or token URLs: `?X-Amz-Signature=...`, `?sig=...`, `?token=...`) and, for a
password, a config file that holds such a URL. `redact` removes them from any text (a URL, a shard spec of
several, an exception message that quotes one), and `redacted_config` from a whole config before it is
written anywhere (config.yaml, TensorBoard, a checkpoint). A password in a URL is refused (`check_url`);
a user-info token or a secret query parameter is used for reading and never written.

What a redacted URL keeps: scheme, host, port, path, and the query parameters that are not secret; user
info is dropped (so the URL still works once the credential comes from the protocol's own source: ~/.netrc
or an fsspec config for https://, AWS_* variables or profiles for s3://), and a secret parameter's value
becomes `REDACTED` (no other source can supply it: `check_url` says so when such a URL is read back).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote_plus, urlsplit, urlunsplit

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# a URL inside any text: from its scheme to the next blank, quote or bracket, or to a comma that starts the
# next URL of a comma-joined shard spec (commas inside brace patterns stay part of the URL)
_URL_IN_TEXT = re.compile(
    r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]*?(?=[\s'\"<>]|,[a-zA-Z][a-zA-Z0-9+.-]*://|$)"
)
# query parameter names that carry secrets: S3/GCS/Azure signed URLs (X-Amz-Signature, X-Amz-Security-Token,
# X-Amz-Credential, X-Goog-Signature, sig), OAuth and API tokens (token, access_token, key, api_key, ...)
_SECRET_PARAM = re.compile(r"sig|token|secret|passw|pwd|key|credential|auth|session|^code$", re.IGNORECASE)
REDACTED = "REDACTED"

T = TypeVar("T")


def is_url(spec: str) -> bool:
    """True for `scheme://...` other than file://, which is a local path."""
    m = _SCHEME.match(spec.strip())
    return bool(m) and m.group(1).lower() != "file"


def local_path(spec: str) -> str:
    """A local path for `spec`: file:// prefixes removed."""
    s = spec.strip()
    return s[len("file://") :] if s.lower().startswith("file://") else s


def _redact_url(url: str) -> str:
    try:
        p = urlsplit(url)
        port = p.port
    except ValueError:  # not parseable as a URL (a bad port...): keep only the scheme
        return url.split("://", 1)[0] + "://" + REDACTED
    # parameters kept byte for byte (a re-encoded query could name another object); secret values replaced
    params = [_redact_param(part) for part in p.query.split("&")] if p.query else []
    if "@" not in p.netloc and "&".join(params) == p.query:
        # nothing to remove: the URL as typed (re-assembling it would drop the empty authority of
        # `sqlite:////abs/path` or `file:///x`, and name another location)
        return url
    host = p.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((p.scheme, netloc, p.path, "&".join(params), p.fragment))


def _redact_param(part: str) -> str:
    name, eq, _ = part.partition("=")
    return f"{name}={REDACTED}" if eq and _SECRET_PARAM.search(unquote_plus(name)) else part


def redact(text: str) -> str:
    """`text` with every URL in it redacted: user info removed, secret query values replaced by REDACTED.
    Works on one URL, a comma-joined shard spec, or a message that quotes URLs; other text is unchanged."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: _redact_url(m.group(0)), text)


def has_credentials(url: str) -> bool:
    """True when the URL carries user info or a secret query parameter (what `redact` removes)."""
    return _redact_url(url) != url


def check_url(url: str, what: str) -> None:
    """Refuse a URL that carries a password (it belongs to the protocol's own sources, not a config file) or a
    value that `redact` wrote in place of a secret (a URL read back from a saved config.yaml)."""
    p = urlsplit(url)
    if p.password is not None:
        raise ValueError(
            f"{what}: the URL {redact(url)} carries a password; remove it and give credentials the "
            "protocol's own way (~/.netrc or an fsspec config for https://, AWS_* variables or profiles for s3://)"
        )
    if any(v == REDACTED for _, v in parse_qsl(p.query, keep_blank_values=True)):
        raise ValueError(
            f"{what}: the URL {redact(url)} has a parameter that dist_seg redacted when it saved a config; "
            "give the URL with its credential again (on the command line), or a URL without one"
        )


def redacted_config(cfg: T) -> T:
    """A copy of a config dataclass (dist_seg.config.schema.Config or any part of it) with every string value
    passed through `redact`: what config.yaml, TensorBoard and checkpoints store. Nothing needed to resume
    is lost: a resumed run reads its shards through the URLs of its own config, and the credential from the
    protocol's own source (README, "Shards at URLs")."""
    return _redacted(cfg)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_redacted(v) for v in value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _redacted(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def join(base: str, name: str) -> str:
    """`base/name` for a URL or a local path (a URL keeps its `//`)."""
    return base.rstrip("/") + "/" + name if is_url(base) else os.path.join(base, name)


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def server(url: str) -> str:
    """`scheme://host[:port]` of a URL, without user info: what a message names as the server."""
    p = urlsplit(url)
    host = p.hostname or ""
    return f"{p.scheme}://{host}" + (f":{p.port}" if p.port else "")
