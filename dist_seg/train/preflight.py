"""Pre-flight: every name and path in a training config, checked before any process group starts.

A wrong path found inside fit() costs a rendezvous and prints one traceback per rank; found here it is one line
per node, `KEY=VALUE: what is wrong`, and exit code 2. The checks only read what every rank can read cheaply
and identically (the config, the local filesystem), so every rank reaches the same verdict without talking to
the others. Shards at URLs are left to the resolver in fit(): checking them here would make every rank read
every manifest and stat every shard over the network twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from dist_seg.config.schema import Config
from dist_seg.data.format.shards import ShardSet, resolve_shards
from dist_seg.data.format.urls import is_url, redact
from dist_seg.data.loading.augment import AugmentError, load_pipeline
from dist_seg.models import MODEL_NAMES
from dist_seg.train.losses import load_class_weights
from dist_seg.train.tracking import BUILTIN, tracker_class


class PreflightError(ValueError):
    """A config value that cannot work: `KEY=VALUE: what is wrong` (URLs redacted, None shown as null)."""

    def __init__(self, key: str, value: object, what: str) -> None:
        shown = "null" if value is None else redact(str(value))
        super().__init__(f"{key}={shown}: {what}")
        self.key = key


def find_problems(cfg: Config) -> list[PreflightError]:
    """Every problem found, in the order of the keys checked (a user fixes them all in one go)."""
    problems: list[PreflightError] = []

    def run(check: Callable[..., ShardSet | None], *args: object) -> ShardSet | None:
        try:
            return check(*args)
        except PreflightError as e:
            problems.append(e)
            return None

    run(check_model_name, cfg.model.name)
    train = run(check_shards, "data.train_shards", cfg.data.train_shards, True)
    run(check_shards, "data.val_shards", cfg.data.val_shards, False)
    run(check_num_classes, cfg.model.num_classes, train)
    run(check_pretrained, cfg.model.pretrained)
    run(check_class_weights, cfg.loss.class_weights, train, cfg.model.num_classes)
    run(check_resume, cfg.train.resume)
    run(check_augment, cfg.data.augment)
    run(check_loggers, cfg.train.loggers)
    run(check_tracking_uri, cfg.train.mlflow_tracking_uri)
    return problems


def check_model_name(name: str) -> None:
    """model.name must be registered (dist_seg.models.registry); the config layer cannot know the models."""
    if name not in MODEL_NAMES:
        raise PreflightError(
            "model.name", name, f"not a registered model; expected one of {', '.join(MODEL_NAMES)}"
        )


def check_shards(key: str, spec: str | None, required: bool) -> ShardSet | None:
    """The local shards of `spec` resolved against their manifests (directory exists, manifest.json readable,
    every shard it lists present); None when `spec` is unset (and optional) or names a URL."""
    if not spec or not spec.strip():
        if required:
            raise PreflightError(
                key, spec, "required for training: a shard directory made by `dist-seg convert`"
            )
        return None
    # a comma inside a brace pattern splits it here too, but each piece still starts with its scheme or not
    if any(is_url(part) for part in spec.split(",")):
        return None
    try:
        return resolve_shards(spec)
    except ValueError as e:
        raise PreflightError(key, spec, str(e)) from None


def check_num_classes(num_classes: int | None, train: ShardSet | None) -> None:
    """model.num_classes, when set, must be the local training shards' class count."""
    if num_classes is not None and train is not None and num_classes != train.num_classes:
        raise PreflightError(
            "model.num_classes", num_classes, f"the shards {train.spec} have {train.num_classes} classes"
        )


def check_pretrained(value: str | None) -> None:
    """model.pretrained must be an existing file (or `torchvision`, downloaded later; or null). Only its
    existence: reading hundreds of MB on every rank here would double the start-up time."""
    if value is not None and value != "torchvision" and not Path(value).is_file():
        raise PreflightError(
            "model.pretrained",
            value,
            "file not found (give a weights file, `torchvision` to download, or null)",
        )


def check_class_weights(spec: str | None, train: ShardSet | None, num_classes: int | None) -> None:
    """A weights file must exist; with the class count known (local shards or model.num_classes), the file,
    or `auto`'s manifest statistics, must give one valid weight per class, as the loss will read them."""
    if spec is None:
        return
    if spec != "auto" and not Path(spec).is_file():
        raise PreflightError("loss.class_weights", spec, "file not found (give a json file, `auto`, or null)")
    classes = train.num_classes if train is not None else (None if spec == "auto" else num_classes)
    if classes is None:
        return  # shards at a URL: fit() reads the manifest and checks the weights against it
    try:
        load_class_weights(spec, train.class_stats if train is not None else None, classes)
    except ValueError as e:
        what = str(e)
        for said in ("loss.class_weights: ", f"loss.class_weights={spec} "):
            what = what.removeprefix(said)  # the key and value lead the line already
        raise PreflightError("loss.class_weights", spec, what) from None


def check_augment(spec: str | None) -> None:
    """data.augment, when set, must import, name a factory that runs, and give a torchvision.transforms.v2 or
    albumentations pipeline (albumentations missing names its extra). Building it is cheap and local; how it
    treats samples is checked on each sample in the loader workers (dist_seg.data.loading.augment)."""
    if spec is None:
        return
    try:
        load_pipeline(spec)
    except AugmentError as e:
        raise PreflightError("data.augment", spec, str(e).removeprefix(f"data.augment={spec}: ")) from None


def check_loggers(loggers: list[str]) -> None:
    """train.loggers: each tracker's class must import here (a built-in one needs its pip extra), so that a
    missing package stops the run before the rendezvous rather than leaving the run without its tracker."""
    missing = []
    for spec in loggers:
        try:
            tracker_class(spec)
        except Exception as e:  # a module of your own may fail to import in any way: name it, no traceback
            missing.append(str(e) if spec in BUILTIN else f"{spec}: {type(e).__name__}: {e}")
    if missing:
        raise PreflightError("train.loggers", f"[{','.join(loggers)}]", "; ".join(missing))


def check_tracking_uri(uri: str | None) -> None:
    """train.mlflow_tracking_uri must not carry credentials (user info: `https://user:password@host`, or a
    token as user): a config key is written to config.yaml, the checkpoints and the trackers themselves."""
    if uri is not None and urlsplit(uri).username is not None:
        raise PreflightError(
            "train.mlflow_tracking_uri",
            uri,
            "carries credentials; give them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN), or the whole URI in MLFLOW_TRACKING_URI, which is never written",
        )


def check_resume(value: str | None) -> None:
    """train.resume, when an explicit path, must be an existing file (`auto` is decided by rank 0 in fit)."""
    if value is not None and value != "auto" and not Path(value).is_file():
        raise PreflightError(
            "train.resume",
            value,
            "checkpoint file not found (give a checkpoint file, `auto` for train.out_dir/last.pt, or null)",
        )
