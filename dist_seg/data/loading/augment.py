"""User augmentation pipelines: `data.augment = "package.module:factory"`, a torchvision.transforms.v2 or an
albumentations pipeline run in the loader workers on every training sample, image and label map together.

Where it runs. In a loader worker, per training sample: decode -> the user's pipeline (`UserAugment`, on the
whole decoded image) -> the built-in scale, crop, flip and padding (transforms.TrainTransform) -> the batch.
On the device, the colour step (jitter and normalisation, colour.py) and then the pixels that no source pixel
landed on are set to 0.0 (TrainBatch.model_input), as the padding is. The pipeline costs loader time only.

The factory. `package.module:name` is imported in each rank's main process (loader workers inherit the object)
and `name` is called with no arguments; it returns the pipeline (a pipeline object itself may be named too).
Which library it is, is read from the object: an instance of `torchvision.transforms.v2.Transform` (v2.Compose
included) or of albumentations' `BasicTransform` / `BaseCompose` (A.Compose included). torchvision's v1
transforms move the image only and are refused. albumentations is an optional extra: a module that needs it
without it installed is an error naming `pip install -e .[albumentations]`.

Calls. The sample goes in as uint8, with a third plane, the coverage (uint8 1 everywhere):

    torchvision     pipeline(tv_tensors.Image [3, H, W], tv_tensors.Mask [H, W] (labels),
                             tv_tensors.Mask [H, W] (coverage))
    albumentations  pipeline(image=[H, W, 3] numpy, mask=[H, W] (labels), dist_seg_coverage=[H, W])
                    (the coverage registered as an extra target of type mask, with add_targets)

Geometric transforms move the coverage with the label map (nearest), so wherever it does not come back as 1,
the output pixel has no source: whatever fill the transform used there, the label becomes IGNORE_INDEX (no
loss, no metric), and the image, which keeps the transform's fill on the host, becomes 0.0 in the model
input: the device step multiplies by the coverage after the colour step, so those pixels get the mean colour
in normalised units, as the bottom/right padding does. Rotation corners and elastic borders are never trained
on, never jittered and never part of the contrast's grey level (transforms.TrainTransform leaves them out).
Only a pixel on the border of the covered area can carry some of the fill, blended in by the transform's own
(or the built-in resize's) bilinear interpolation, as with any warp. A transform that fills the label map
inside the image (a dropout's `fill_mask`) fills the coverage too: its holes are treated the same way.
Plain callables inside a v2.Compose receive the three planes and must return them.

Checks, on every sample. What comes back must be a uint8 image [3, h, w], a uint8 label map [h, w] and a
coverage plane [h, w] (any size, the same for all three), and the label map may hold only the values the
sample had, plus IGNORE_INDEX: a label map resized with a smoothing interpolation invents in-between classes.
(A class remap belongs in `dist-seg convert --classes`.) A failure, or an exception raised by a transform,
is an AugmentError naming the transform (the pipeline's top-level steps are replayed with the sample's seeds
to find which), the sample and the key `data.augment`. torch's DataLoader re-raises a worker's exception in
the main process with the worker's traceback as its message; AugmentError keeps only its own message.

Randomness. Each sample's draws come from (train.seed, epoch, sample id), as the built-in ones do: the four
words of SeedSequence((TAG_USER_AUG, seed, epoch, sample id)) seed torch's global generator (torchvision),
numpy's and python's global generators, and the albumentations pipeline's own generators (which ignore the
global ones), right before the call; with data.num_workers=0 the global states are put back after it. So
a sample gets the same augmentation whichever worker, rank, world size or resume reads it, and the built-in
draws (their own stream, TAG_AUG) are the same with or without a pipeline.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from dist_seg.data import IGNORE_INDEX

# derive-seed tag of this stream; dist_seg.data.loading.plan's tags are 1..5 (tests check that it is new)
TAG_USER_AUG = 6
ALBUMENTATIONS_EXTRA = "pip install -e .[albumentations]"
KEY = "data.augment"
COVERAGE_TARGET = "dist_seg_coverage"  # the albumentations target name of the coverage plane
_REPR_CHARS = 160  # a transform's repr in a message: albumentations' list every parameter


class AugmentError(ValueError):
    """`data.augment=SPEC: what is wrong` (loading the pipeline, or a sample it got wrong)."""

    def __init__(self, message: str) -> None:
        # torch's DataLoader re-raises a worker's exception as type(e)("Caught ... Original Traceback ...
        # AugmentError: MESSAGE"): keep MESSAGE, which names the transform, and the rest as an attribute
        marker = f"{type(self).__name__}: "
        self.worker_traceback = None
        if message.startswith("Caught ") and marker in message:
            self.worker_traceback = message
            message = message[message.rindex(marker) + len(marker) :].rstrip()
        super().__init__(message)


def _error(spec: str, what: str) -> AugmentError:
    return AugmentError(f"{KEY}={spec}: {what}")


# ------------------------------------------------------------------------------------------ loading
def load_pipeline(spec: str) -> object:
    """Import `package.module:name` and return the pipeline it names (calling `name` when it is a factory);
    AugmentError saying what is wrong (preflight turns it into `data.augment=...: ...`)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise _error(
            spec, "expected MODULE:FACTORY, e.g. dist_seg.data.loading.augment_recipes:albumentations_common"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise _import_error(spec, module_name, e) from None
    except Exception as e:  # the user's module failed while importing
        raise _error(spec, f"importing {module_name} raised {type(e).__name__}: {e}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise _error(spec, f"module {module_name} has no attribute {attr}")
        target = getattr(target, part)
    if pipeline_kind(target, spec) is not None:
        return target
    if not callable(target):
        raise _error(spec, f"{attr} is a {type(target).__name__}, not a factory or a pipeline")
    try:
        pipeline = target()
    except ModuleNotFoundError as e:
        raise _import_error(spec, module_name, e) from None
    except Exception as e:
        raise _error(spec, f"{attr}() raised {type(e).__name__}: {e}") from None
    if pipeline_kind(pipeline, spec) is None:
        raise _error(
            spec,
            f"{attr}() returned a {type(pipeline).__module__}.{type(pipeline).__name__}: expected a "
            "torchvision.transforms.v2 transform (e.g. v2.Compose) or an albumentations one (e.g. A.Compose)",
        )
    return pipeline


def _import_error(spec: str, module_name: str, e: ModuleNotFoundError) -> AugmentError:
    missing = e.name or ""
    if missing.split(".")[0] in ("albumentations", "albucore", "cv2"):
        return _error(
            spec,
            f"needs albumentations ({missing} is not installed), an optional extra: {ALBUMENTATIONS_EXTRA}",
        )
    if module_name == missing or module_name.startswith(missing + "."):
        return _error(spec, f"no module named {missing} (is its directory on PYTHONPATH?)")
    return _error(spec, f"importing {module_name} failed: {e}")


def pipeline_kind(obj: object, spec: str = "") -> str | None:
    """ "torchvision" (a transforms.v2 transform), "albumentations", or None; AugmentError for torchvision's
    v1 transforms. Only libraries already imported are asked: a pipeline's module imports its library."""
    albumentations = sys.modules.get("albumentations")
    if albumentations is not None and isinstance(
        obj, (albumentations.BasicTransform, albumentations.BaseCompose)
    ):
        return "albumentations"
    v2 = sys.modules.get("torchvision.transforms.v2")
    if v2 is not None and isinstance(obj, v2.Transform):
        return "torchvision"
    if type(obj).__module__ == "torchvision.transforms.transforms":
        raise _error(
            spec,
            f"{type(obj).__name__} is a torchvision.transforms (v1) transform, which moves the image only; "
            "use torchvision.transforms.v2, which moves the label map with it",
        )
    return None


# ------------------------------------------------------------------------------------------ seeding
def sample_seeds(seed: int, epoch: int, sample_id: int) -> tuple[int, int, int, int]:
    """The four 32-bit seeds of one sample's pipeline call: torch, numpy, python, the albumentations
    pipeline's own generators (distinct words, so that no two generators draw the same stream)."""
    values = [v % (1 << 63) for v in (TAG_USER_AUG, seed, epoch, sample_id)]
    words = np.random.SeedSequence(values).generate_state(4)
    return tuple(int(w) for w in words)  # type: ignore[return-value]


@contextlib.contextmanager
def seeded_globals(seeds: Sequence[int]) -> Iterator[None]:
    """torch's, numpy's and python's global generators seeded for one call. In a loader worker nothing else
    draws from them; in the training process (data.num_workers=0) they are put back after the call, so the
    run's own draws (dropout) do not depend on the pipeline."""
    saved = (
        None
        if get_worker_info() is not None
        else (torch.get_rng_state(), np.random.get_state(), random.getstate())
    )
    torch.default_generator.manual_seed(seeds[0])  # the CPU generator only: no CUDA call in a worker
    np.random.seed(seeds[1])
    random.seed(seeds[2])
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


# ------------------------------------------------------------------------------------------ the call
Planes = tuple[Any, Any, Any]  # (image, label map, coverage) in the library's own types


class _Torchvision:
    """transforms.v2: tv_tensors in and out, randomness from torch's global generator."""

    def __init__(self, pipeline: Any) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.pipeline, self.tv = pipeline, tv_tensors
        self.steps = list(pipeline.transforms) if isinstance(pipeline, v2.Compose) else [pipeline]

    def seed(self, seeds: Sequence[int]) -> None:
        pass  # torch's global generator, seeded by seeded_globals

    def inputs(self, image: Tensor, mask: Tensor, coverage: Tensor) -> Planes:
        return self.tv.Image(image), self.tv.Mask(mask), self.tv.Mask(coverage)

    def call(self, fn: Callable[..., Any], planes: Planes) -> Planes:
        return fn(*planes)

    def replay_start(self, planes: Planes) -> Planes:
        return planes  # v2.Compose calls its transforms in turn and draws nothing itself

    def outputs(self, planes: Any) -> tuple[Any, Any, Any]:
        if not isinstance(planes, (tuple, list)) or len(planes) != 3:
            raise TypeError(
                f"returned {type(planes).__name__}, not the (image, label map, coverage) it was given"
            )
        return tuple(_plain(x) for x in planes)  # type: ignore[return-value]


class _Albumentations:
    """albumentations: numpy HWC in and out, randomness from the pipeline's own generators."""

    def __init__(self, pipeline: Any) -> None:
        import albumentations

        self.pipeline = pipeline
        # the coverage as an extra target moved like `mask` (cheaper than `masks=[...]`, which stacks arrays
        # in every transform); registered on the pipeline and its transforms once
        pipeline.add_targets({COVERAGE_TARGET: "mask"})
        self.compose = type(pipeline) is albumentations.Compose
        self.steps = list(pipeline.transforms) if self.compose else [pipeline]

    def seed(self, seeds: Sequence[int]) -> None:
        # one numpy and one python generator shared by every transform of the pipeline, drawn in turn (its own
        # set_random_seed would give each transform the same stream)
        self.pipeline.set_random_state(
            np.random.Generator(np.random.PCG64(seeds[3])), random.Random(seeds[3])
        )

    def inputs(self, image: Tensor, mask: Tensor, coverage: Tensor) -> Planes:
        return image.permute(1, 2, 0).contiguous().numpy(), mask.numpy(), coverage.numpy()  # HWC: a copy

    def call(self, fn: Callable[..., Any], planes: Planes) -> Planes:
        out = fn(image=planes[0], mask=planes[1], **{COVERAGE_TARGET: planes[2]})
        return out["image"], out["mask"], out[COVERAGE_TARGET]

    def replay_start(self, planes: Planes) -> Planes:
        if self.compose:  # what A.Compose.__call__ does before its transforms: its own p draw
            self.pipeline.py_random.random()
        return planes

    def outputs(self, planes: Planes) -> tuple[Any, Any, Any]:
        image, mask, coverage = (_plain(x) for x in planes)
        if isinstance(image, Tensor) and image.ndim == 3:
            image = image.permute(2, 0, 1)  # HWC -> CHW, a view
        return image, mask, coverage


def _own(out: Tensor, given: Tensor) -> Tensor:
    """`out`, or a copy of it when it shares memory with `given` (what the pipeline was called with)."""
    return out.clone() if out.untyped_storage().data_ptr() == given.untyped_storage().data_ptr() else out


def _plain(x: Any) -> Any:
    """A torch tensor of what a transform returned (tv_tensors unwrapped, numpy arrays shared); else as is."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor):
        return x.as_subclass(Tensor)
    return x


class UserAugment:
    """The pipeline of `data.augment`, called on one training sample at a time (see the module docstring)."""

    def __init__(self, spec: str, pipeline: object | None = None) -> None:
        self.spec = spec
        self.pipeline = load_pipeline(spec) if pipeline is None else pipeline
        self.kind = pipeline_kind(self.pipeline, spec)
        if self.kind is None:
            raise _error(
                spec,
                f"{type(self.pipeline).__name__} is not a torchvision.transforms.v2 or an albumentations one",
            )
        self.lib = (
            _Torchvision(self.pipeline) if self.kind == "torchvision" else _Albumentations(self.pipeline)
        )
        if self.kind == "albumentations" and (cv2 := sys.modules.get("cv2")) is not None:
            # OpenCV would start a thread per core in every loader worker, as torch would without the
            # DataLoader's one thread: data.num_workers is the parallelism. Set here, in the process that
            # forks the workers: calling it in a forked worker, whose parent had started OpenCV's threads,
            # waits forever on threads that were not forked.
            cv2.setNumThreads(1)

    def __call__(
        self, image: Tensor, mask: Tensor, seeds: Sequence[int], where: str
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(uint8 image [3, H, W], uint8 label map [H, W], sample_seeds(...), where: the sample, for messages)
        -> (image [3, h, w], label map [h, w], coverage [h, w] uint8 1/0 or None when every pixel is covered)."""
        coverage = torch.ones(mask.shape, dtype=torch.uint8)
        before = torch.bincount(mask.reshape(-1), minlength=256) > 0
        try:
            with seeded_globals(seeds):
                self.lib.seed(seeds)
                got = self.lib.outputs(self.lib.call(self.pipeline, self.lib.inputs(image, mask, coverage)))
        except Exception as e:
            raise self._diagnose(image, mask, seeds, where, f"raised {type(e).__name__}: {e}") from e
        if (problem := check_planes(*got, before)) is not None:
            raise self._diagnose(image, mask, seeds, where, problem)
        out_image, out_mask, coverage = got
        if int(torch.bincount(coverage.reshape(-1), minlength=256)[1]) == coverage.numel():
            return out_image, out_mask, None  # every pixel has a source
        covered = coverage == 1
        uncovered = ~covered
        # in place, on a tensor of our own (a transform that did nothing hands back its input, the decoded
        # sample); the image is left as the transform filled it: the device step sets it to 0.0 there
        out_mask = _own(out_mask, mask).masked_fill_(uncovered, IGNORE_INDEX)
        return out_image, out_mask, covered.view(torch.uint8)

    def _diagnose(
        self, image: Tensor, mask: Tensor, seeds: Sequence[int], where: str, problem: str
    ) -> AugmentError:
        """The error for a sample the pipeline got wrong, naming the top-level step that went wrong first: the
        steps are replayed one by one with the sample's seeds (the draws of the call that failed)."""
        before = torch.bincount(mask.reshape(-1), minlength=256) > 0
        culprit, what = f"the pipeline {_short(self.pipeline)}", problem
        steps = self.lib.steps
        try:
            with seeded_globals(seeds):
                self.lib.seed(seeds)
                planes = self.lib.replay_start(
                    self.lib.inputs(image, mask, torch.ones(mask.shape, dtype=torch.uint8))
                )
                for i, step in enumerate(steps):
                    name = (
                        _short(step) if len(steps) == 1 else f"step {i + 1} of {len(steps)}, {_short(step)},"
                    )
                    try:
                        planes = self.lib.call(step, planes)
                        found = check_planes(*self.lib.outputs(planes), before)
                    except Exception as e:
                        found = f"raised {type(e).__name__}: {e}"
                    if found is not None:
                        culprit, what = name, found
                        break
        except Exception:  # the replay itself failed: name the pipeline
            pass
        return _error(self.spec, f"{culprit} {what} ({where})")


def check_planes(image: Any, mask: Any, coverage: Any, labels_before: Tensor) -> str | None:
    """What is wrong with a pipeline's output, or None: uint8 image [3, h, w], uint8 label map [h, w] holding
    only labels_before's values (a bool [256] presence table) or IGNORE_INDEX, coverage [h, w]."""
    for name, x in (("the image", image), ("the label map", mask), ("the coverage plane", coverage)):
        if not isinstance(x, Tensor):
            return f"returned {name} as a {type(x).__name__}, not an array"
    if image.dtype != torch.uint8:
        return (
            f"returned the image as {image.dtype}, not uint8: hand back uint8 pixels (normalisation runs on "
            "the device from data.mean and data.std, so ToDtype, Normalize and ToTensorV2 are left out)"
        )
    if image.ndim != 3 or image.shape[0] != 3:
        return f"returned an image of shape {tuple(image.shape)}, not 3 colour planes"
    if mask.dtype != torch.uint8:
        return f"changed the label map's dtype to {mask.dtype} (it is uint8, 255 = ignore)"
    size = tuple(image.shape[1:])
    if tuple(mask.shape) != size or tuple(coverage.shape) != size:
        return (
            f"returned an image of {size[0]}x{size[1]} but a label map of {'x'.join(map(str, mask.shape))} "
            f"(coverage {'x'.join(map(str, coverage.shape))}): geometric transforms must move all of them"
        )
    new = (torch.bincount(mask.reshape(-1), minlength=256) > 0) & ~labels_before
    new[IGNORE_INDEX] = False
    if bool(new.any()):
        added = new.nonzero().view(-1).tolist()
        had = labels_before.nonzero().view(-1).tolist()
        return (
            f"put label values {added} into a label map that held {had}: label maps must move with nearest "
            "interpolation (albumentations: mask_interpolation=cv2.INTER_NEAREST; torchvision does it for "
            "tv_tensors.Mask) and fill with 255"
        )
    return None


def _short(obj: object) -> str:
    text = " ".join(repr(obj).split())
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 3] + "..."
