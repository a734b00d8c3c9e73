"""Typed configuration: the schema (dataclasses with defaults), its choices and its serialisation (the value
checks: dist_seg.config.validation).

Every field has a docstring; the README's config reference lists them. Reading a config (defaults -> YAML
file -> command-line `key=value` overrides) is dist_seg.config.loading.load_config; unknown keys and wrong
types are `ValueError`s that name the dotted key, raised before any process group starts.

Batch arithmetic: global batch = data.batch_size x world size x train.grad_accum images per optimizer step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DataConfig:
    train_shards: str | None = None
    """Shard directory (with manifest.json), several joined by commas, or a brace pattern
    `dir/shard-{000000..000009}.tar` (the manifest is read from the pattern's directory); each may be a URL
    (`https://...`, `s3://bucket/prefix`, any fsspec protocol) instead of a local path; a URL's token (user
    info, `?token=`, a signature) is used to read and redacted wherever the config is written."""
    val_shards: str | None = None
    """Same forms as `train_shards`; evaluated exactly once per sample across all ranks."""
    crop_size: int = 512
    """Square training crop in pixels (images smaller than this are padded; mask padding is 255)."""
    batch_size: int = 8
    """Images per process per micro-step."""
    eval_batch_size: int = 4
    """Images per process per evaluation batch (images are padded to a common size)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_shards: bool = True
    """Shuffle the shard order every epoch (seeded by train.seed and the epoch)."""
    shuffle_buffer: int = 256
    """Shuffle window: each loader worker emits this many consecutive samples of its range in a random
    order (so a resume can start at any batch); 0 or 1 disables sample shuffling."""
    scale_min: float = 0.5
    """Lower bound of the random rescale factor (training)."""
    scale_max: float = 2.0
    """Upper bound of the random rescale factor (training)."""
    hflip_prob: float = 0.5
    """Probability of a horizontal flip (training)."""
    color_jitter: float = 0.2
    """Strength of brightness/contrast/saturation jitter (training); 0 disables."""
    augment: str | None = None
    """Your own augmentations: `package.module:factory` returning a torchvision.transforms.v2 or an
    albumentations pipeline, run in the loader workers on each whole training sample (image and label map)
    before the built-in scale, crop and flip; seeded per sample, so resumes stay exact. See README "Your own
    augmentations" and dist_seg.data.loading.augment_recipes."""
    eval_resize: int | None = None
    """Resize the shorter side to this before evaluation (masks: nearest); null keeps the original size."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    """Per-channel normalisation mean (RGB, 0..1 scale)."""
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    """Per-channel normalisation std (RGB, 0..1 scale)."""
    on_error: str = "raise"
    """`raise`: a corrupt sample stops the run naming shard and key; `skip`: drop it, count it, warn."""
    max_errors: int = 100
    """With on_error=skip, raise after this many skipped samples on one rank."""
    remote_retries: int = 5
    """Shards at URLs: retries of a transient fault (connection reset, timeout, HTTP 5xx) per request, with
    exponential backoff from 0.5 s; then the read fails as corrupt data does (see on_error)."""
    remote_timeout_s: float = 60.0
    """Shards at URLs: seconds a connection or a read may stall before it counts as a transient fault."""
    cache_dir: str | None = None
    """Shards at URLs: a local directory caching whole shards, named by sha256 and checked against the
    manifest before use; shared safely by the ranks and workers of one machine. null reads ranges directly
    (from a server that ignores Range: one stream per shard and loader worker)."""
    cache_max_gb: float = 100.0
    """Size bound of data.cache_dir: least recently used shards are deleted beyond it."""
    pin_memory: bool = True
    """Pin host memory for faster host-to-GPU copies (ignored on CPU)."""
    persistent_workers: bool = True
    """Keep DataLoader workers alive between epochs."""


@dataclass
class ModelConfig:
    name: str = "deconvnet"
    """deconvnet | deeplab_v1 | fcn8s | deeplabv3_resnet50 | fcn_resnet50 | lraspp_mobilenet_v3_large."""
    width_mult: float = 1.0
    """Scales every channel count (0.125 for CPU tests and the demo)."""
    num_classes: int | None = None
    """Number of classes including background; null takes it from the training manifest."""
    pretrained: str | None = None
    """Path to torchvision's ImageNet weights of the model's encoder (vgg16_bn for deconvnet, deeplab_v1 and
    fcn8s; resnet50 or mobilenet_v3_large for the torchvision models), `torchvision` to download them, or null."""
    aux_loss: float = 0.0
    """Weight of an auxiliary loss, VGG16-BN models only (0 = none): a head (3x3 conv, BN, ReLU, 1x1 conv) on
    pool4 also predicts the labels, and training minimises loss + aux_loss x the same loss on its output, as
    torchvision's references do (0.5). Training only: evaluation, prediction and export use the main head.
    DeconvNet from scratch needs it (README, "DeconvNet from scratch")."""


@dataclass
class OptimGroup:
    params: str = "*"
    """fnmatch pattern on parameter names (e.g. `encoder.*`); groups match in order, first match wins."""
    lr_mult: float = 1.0
    """Multiplier on optim.lr for this group."""
    weight_decay: float | None = None
    """Weight decay for this group; null uses optim.weight_decay."""


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd | adamw | adam."""
    lr: float = 0.01
    """Base learning rate (the implicit default group's lr)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam/AdamW betas."""
    weight_decay: float = 5.0e-4
    """Default weight decay."""
    groups: list[OptimGroup] = field(default_factory=list)
    """Parameter groups matched in order; unmatched parameters go to the default group at optim.lr."""
    no_decay_norm_and_bias: bool = True
    """Put normalisation weights and all biases in weight-decay-free copies of their groups."""


@dataclass
class SchedConfig:
    name: str = "poly"
    """poly | cosine | step | constant."""
    warmup_steps: int = 0
    """Linear warm-up from warmup_factor x lr to lr over this many optimizer steps."""
    warmup_factor: float = 0.001
    """Starting fraction of the lr during warm-up."""
    power: float = 0.9
    """Exponent of the poly schedule."""
    min_lr_ratio: float = 0.0
    """Final lr as a fraction of the base lr (poly, cosine)."""
    step_size: int = 1000
    """step schedule: multiply the lr by gamma every step_size optimizer steps."""
    gamma: float = 0.1
    """step schedule: decay factor."""


@dataclass
class LossConfig:
    name: str = "ce"
    """ce | ce+dice | focal."""
    class_weights: str | None = None
    """null, `auto` (median-frequency weights from the training manifest), or a path to a json list
    or an EDA summary.json (its `suggested_class_weights`)."""
    dice_weight: float = 1.0
    """Weight of the dice term in ce+dice."""
    focal_gamma: float = 2.0
    """Focusing parameter of the focal loss."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy term (ce, ce+dice; with focal it is a config error)."""


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    """Run directory: resolved config, TensorBoard events, checkpoints, metrics."""
    epochs: int = 1
    """Number of epochs (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Total optimizer steps; overrides epochs when set."""
    eval_every: int | None = None
    """Evaluate every N optimizer steps; null evaluates at the end of each epoch."""
    log_every: int = 10
    """Log scalars and a progress line every N optimizer steps."""
    amp: str = "bf16"
    """bf16 | fp16 | off. Autocast dtype; parameters stay fp32. fp16 uses a GradScaler."""
    sync_bn: bool = True
    """Convert BatchNorm to SyncBatchNorm when world size > 1."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value; null disables."""
    channels_last: bool = False
    """Use channels-last memory format for model and inputs."""
    compile: bool = False
    """torch.compile the model."""
    grad_compression: str = "none"
    """none | fp16 | bf16 | powersgd: DDP communication hook for the gradient all-reduce (torch's own hooks;
    see README "Running on many GPUs and nodes"). fp16/bf16 halve the bytes sent; powersgd sends a rank-
    train.powersgd_rank approximation after train.powersgd_start_step plain steps (its error-feedback state
    is not checkpointed: a resumed powersgd run restarts it). Ignored in one process."""
    powersgd_rank: int = 1
    """PowerSGD's matrix approximation rank (higher: more accurate, more bytes)."""
    powersgd_start_step: int = 1000
    """Optimizer steps of plain all-reduce before PowerSGD starts (PowerSGD paper: warm up uncompressed)."""
    seed: int = 0
    """Seed for model init, data order and augmentation (per rank and worker derived from it)."""
    resume: str | None = "auto"
    """`auto` resumes from out_dir/last.pt when present; a path resumes from that file; null starts fresh."""
    save_every: int | None = None
    """Save last.pt every N optimizer steps (also at the end of every epoch); null: only per epoch."""
    keep_last: int = 2
    """Keep this many step-stamped checkpoints besides last.pt and best.pt; 0 keeps none."""
    max_nonfinite: int = 5
    """Stop the run after this many consecutive non-finite losses."""
    early_stop_patience: int | None = None
    """Stop training once val mIoU has not improved for this many evaluations in a row (a checkpoint is
    written at that step); null never stops early. Every rank sees the same all-reduced mIoU, so every rank
    stops at the same step."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999; warm-up
    min(decay, (1+n)/(10+n)) after n updates; BatchNorm buffers copied). Evaluations then report both
    weights (TensorBoard val/ and val_ema/); best.pt, early stopping and the returned metrics follow the EMA,
    which evaluate/predict use by default (--weights). null: off."""
    timeout_s: int = 600
    """Collective timeout in seconds: a dead or stalled peer ends the run with an error after this."""
    stop_signals: str = "SIGTERM,SIGUSR1"
    """Signals that stop the run with a checkpoint of the step reached and exit code 75 (see README
    "Preemption, node loss and resize"); comma-separated names, empty for none."""
    num_vis_images: int = 4
    """Validation images shown in the trackers (input | ground truth | prediction) at every eval."""
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where rank 0 reports the run: any of tensorboard, mlflow, wandb (the extras `pip install -e
    .[mlflow]`, `.[wandb]`), or `package.module:Class` of your own tracker. Each gets the same scalars,
    per-class IoU, images, config and final metrics from one reporting path, in its own thread: a tracker
    that fails or stalls loses its reports (counted, said once), never the run. See README "Run tracking"."""
    run_name: str | None = None
    """The run's name in MLflow and W&B; null: the last part of train.out_dir."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking server or store (`http://host:5000`, `sqlite:///runs/mlflow.db`); null: the
    MLFLOW_TRACKING_URI environment variable, else MLflow's default (sqlite:///mlflow.db in the working
    directory). No passwords here: credentials go in MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN."""
    mlflow_experiment: str | None = None
    """MLflow experiment (created when missing); null: MLFLOW_EXPERIMENT_NAME, else `dist_seg`."""
    wandb_project: str | None = None
    """W&B project; null: WANDB_PROJECT, else `dist_seg`. WANDB_MODE=offline writes under train.out_dir."""
    wandb_entity: str | None = None
    """W&B team or user; null: WANDB_ENTITY, else the API key's default entity."""
    logger_timeout_s: float = 60.0
    """Seconds the end of a run waits for the trackers to deliver what they still hold; a tracker still
    busy then is left behind, and what it had not delivered is counted in the log."""
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""


@dataclass
class CRFConfig:
    """DeepLab v1's fully connected CRF (`--crf` in evaluate and predict); defaults are DeepLab-LargeFOV's
    published values for PASCAL VOC."""

    iterations: int = 10
    """Mean-field iterations."""
    bilateral_weight: float = 4.0
    """w1: weight of the appearance (position + colour) kernel."""
    bilateral_xy_std: float = 121.0
    """theta_alpha: spatial std of the appearance kernel, in pixels."""
    bilateral_rgb_std: float = 5.0
    """theta_beta: colour std of the appearance kernel, in 0..255 intensity units."""
    gaussian_weight: float = 3.0
    """w2: weight of the smoothness (position only) kernel."""
    gaussian_xy_std: float = 3.0
    """theta_gamma: spatial std of the smoothness kernel, in pixels."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.on_error": ("raise", "skip"),
    "optim.name": ("sgd", "adamw", "adam"),
    "sched.name": ("poly", "cosine", "step", "constant"),
    "loss.name": ("ce", "ce+dice", "focal"),
    "train.amp": ("bf16", "fp16", "off"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.grad_compression": ("none", "fp16", "bf16", "powersgd"),
}


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))
