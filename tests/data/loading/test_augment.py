"""User augmentation pipelines (dist_seg.data.loading.augment, `data.augment`): loading and detection, a
rotation through the loader against the same rotation applied by hand, the checks that name the transform,
and per-sample seeding: the same augmented sample whoever reads it, whenever a pass starts."""

from __future__ import annotations

import hashlib
import random
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_shards import cfg
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dist_seg.data import IGNORE_INDEX
from dist_seg.data.loading import plan
from dist_seg.data.loading.augment import TAG_USER_AUG, AugmentError, UserAugment, load_pipeline, sample_seeds
from dist_seg.data.loading.colour import plain_colour
from dist_seg.data.loading.train_loader import DataPosition, build_train_loader
from dist_seg.data.loading.transforms import TrainTransform

MEAN = (0.485, 0.456, 0.406)
MODULE = "augment_test_pipelines"
PIPELINES = '''
import random

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

ANGLE = 30.0


def rotate_v2():
    return v2.Compose([v2.RandomRotation((ANGLE, ANGLE))])  # nearest for the image too: exact comparisons


def rotate_albumentations():
    import albumentations as A
    import cv2

    return A.Compose([A.Rotate(limit=(ANGLE, ANGLE), interpolation=cv2.INTER_NEAREST, p=1.0)])


def random_albumentations():
    import albumentations as A

    return A.Compose([A.Rotate(limit=45, p=0.7), A.GridDistortion(p=0.5), A.CLAHE(p=0.5)])


def _shift(image, mask, coverage):
    """Draws from torch's, numpy's and python's global generators: a roll of all three planes."""
    dy, dx = int(torch.randint(-4, 5, ()).item()), int(np.random.randint(-4, 5))
    flip = random.random() < 0.5
    out = []
    for x in (image, mask, coverage):
        y = torch.roll(x.as_subclass(torch.Tensor), (dy, dx), (-2, -1))
        out.append(tv_tensors.wrap(y.flip(-2) if flip else y, like=x))
    return tuple(out)


def global_generators_v2():
    return v2.Compose([v2.RandomRotation(20), _shift])


def identity_v2():
    return v2.Compose([v2.Identity()])


PIPELINE_OBJECT = v2.Compose([v2.RandomRotation(10)])


def float_image_v2():
    return v2.Compose([v2.RandomRotation(10), v2.ToDtype(torch.float32, scale=True)])


def int64_labels_v2():
    return v2.ToDtype({tv_tensors.Image: None, tv_tensors.Mask: torch.int64, "others": None})


def linear_labels_albumentations():
    import albumentations as A
    import cv2

    return A.Compose([A.CLAHE(p=1.0), A.Rotate(limit=(20, 20), mask_interpolation=cv2.INTER_LINEAR, p=1.0)])


def _crop_image_only(image, mask, coverage):
    return image[:, 2:, 2:], mask, coverage


def crop_image_only_v2():
    return v2.Compose([v2.Identity(), _crop_image_only])


def _boom(*planes):
    raise RuntimeError("boom")


def raising_v2():
    return v2.Compose([v2.RandomRotation(10), _boom])


def v1_transforms():
    import torchvision.transforms as T

    return T.Compose([T.RandomRotation(10)])


def returns_a_number():
    return 42


def fails():
    raise RuntimeError("needs a config")
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as in a loader worker: in-process passes of tiny samples otherwise spend most of
    their time in OpenMP hand-offs when other jobs share the cores (measured: 4 s instead of 0.25 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The module of test pipelines, importable (loader workers are forked, so they inherit sys.path)."""
    folder = tmp_path_factory.mktemp("pipelines")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(PIPELINES))
    (folder / "needs_albumentations.py").write_text(
        "import albumentations\n\ndef build():\n    return None\n"
    )
    sys.path.insert(0, str(folder))
    yield MODULE
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


def spec(name: str) -> str:
    return f"{MODULE}:{name}"


def plain_cfg(shards: Path, name: str, **kw: object):
    """A loader config whose built-in augmentation does nothing: scale 1, no flip, no jitter, and a crop that
    holds a whole 40x30 tiny sample (padded bottom/right), so what comes out is the user pipeline's work."""
    base = dict(
        train_shards=str(shards), crop_size=48, batch_size=4, scale_min=1.0, scale_max=1.0,
        hflip_prob=0.0, color_jitter=0.0, augment=spec(name),
    )  # fmt: skip
    return cfg(**(base | kw))


def raw_samples(shards: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """key -> (image [3, H, W], label map [H, W]) decoded from the tar members directly, not by the reader."""
    members: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]

    def decode(data: bytes, mode: ImageReadMode) -> torch.Tensor:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode)

    return {
        k: (decode(v["jpg"], ImageReadMode.RGB), decode(v["seg.png"], ImageReadMode.GRAY)[0])
        for k, v in members.items()
    }


def by_hand(kind: str, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 30-degree rotation applied directly with the library: the image with the transform's own fill (the
    loader keeps it on the host), the label map filled with IGNORE_INDEX, as the loader promises."""
    if kind == "v2":
        return TF.rotate(image, 30.0), TF.rotate(mask[None], 30.0, fill=IGNORE_INDEX)[0]
    import albumentations as A
    import cv2

    rotate = A.Rotate(limit=(30, 30), interpolation=cv2.INTER_NEAREST, fill_mask=IGNORE_INDEX, p=1.0)
    out = rotate(image=np.ascontiguousarray(image.permute(1, 2, 0).numpy()), mask=mask.numpy())
    return torch.from_numpy(out["image"]).permute(2, 0, 1), torch.from_numpy(out["mask"])


def sample_hashes(loader, epoch: int = 0, start_batch: int = 0) -> list[tuple[str, str]]:
    """(key, sha256 of everything the batch holds for the sample) in the order of one pass."""
    loader.set_position(DataPosition(epoch, start_batch=start_batch))
    out = []
    for b in loader:
        for i, key in enumerate(b.keys):
            h = hashlib.sha256()
            for t in (b.images[i], b.masks[i], b.colour[i], b.sizes[i], b.coverage[i]):
                h.update(t.contiguous().numpy().tobytes())
            out.append((key, h.hexdigest()))
    return out


# ------------------------------------------------------------------------------- rotation by hand
@pytest.mark.parametrize("kind", ["v2", "albumentations"])
def test_a_rotation_through_the_loader_is_the_rotation_by_hand(
    tiny_shards: dict[str, Path], pipelines: str, kind: str
) -> None:
    shards = tiny_shards["train4"]
    name = "rotate_v2" if kind == "v2" else "rotate_albumentations"
    loader = build_train_loader(plain_cfg(shards, name), 0, 1, seed=0)
    raw = raw_samples(shards)
    seen = 0
    for batch in loader:
        inputs, _ = batch.model_input()
        for i, key in enumerate(batch.keys):
            image, mask = raw[key]
            assert IGNORE_INDEX not in mask.unique().tolist()  # so label 255 below means "uncovered"
            h, w = mask.shape
            want_image, want_mask = by_hand(kind, image, mask)
            assert batch.sizes[i].tolist() == [h, w]
            assert torch.equal(batch.masks[i, :h, :w], want_mask), key
            assert torch.equal(batch.images[i, :, :h, :w], want_image), key
            uncovered = want_mask == IGNORE_INDEX
            assert 0.1 < uncovered.float().mean() < 0.5  # the corners of a 30-degree rotation
            assert torch.equal(batch.coverage[i, :h, :w], (~uncovered).to(torch.uint8))
            assert not batch.coverage[i, h:].any() and not batch.coverage[i, :, w:].any()  # the padding
            # the device step: normalised where covered, exactly 0.0 (the mean colour) where not
            rows = plain_colour(MEAN, cfg().std)
            normalised = (want_image.permute(1, 2, 0).reshape(-1, 3).float() @ rows[:3] + rows[3]).reshape(
                h, w, 3
            )
            got = inputs[i, :, :h, :w].permute(1, 2, 0)
            # float32 rounding of a 3-term product of values <= 255 by rows <= 1/(255 * 0.224): ~1e-6
            assert torch.allclose(got[~uncovered], normalised[~uncovered], atol=1e-5)
            assert not got[uncovered].any() and not inputs[i, :, h:].any()
            seen += 1
    assert seen == 40


def test_train_transform_moves_coverage_like_the_label_map_and_leaves_it_out_of_the_contrast() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=g)
    mask = torch.randint(0, 4, (37, 53), dtype=torch.uint8, generator=g)
    coverage = (mask != 3).to(torch.uint8)  # class 3 plays "uncovered": the two must land on the same pixels
    t = TrainTransform(cfg(crop_size=40, scale_min=0.5, scale_max=2.0, hflip_prob=0.5, color_jitter=0.4))
    # at scale 1 no resize blends covered and uncovered pixels: only the uncovered ones change with painting
    same_scale = TrainTransform(
        cfg(crop_size=40, scale_min=1.0, scale_max=1.0, hflip_prob=0.5, color_jitter=0.4)
    )
    painted = image.masked_fill(coverage == 0, 255)
    for seed in range(20):
        out, out_mask, out_cov = (
            torch.empty(s, dtype=torch.uint8) for s in ((3, 40, 40), (40, 40), (40, 40))
        )
        rows, (h, w) = t.apply(image, mask, random.Random(seed), out, out_mask, coverage, out_cov)
        assert torch.equal(out_cov[:h, :w], (out_mask[:h, :w] != 3).to(torch.uint8))
        assert not out_cov[h:].any() and not out_cov[:, w:].any()
        # with every pixel covered the rows are the built-in ones
        covered = t.apply(image, mask, random.Random(seed), out.clone(), out_mask.clone(), None, out_cov)
        plain = t.apply(image, mask, random.Random(seed), out.clone(), out_mask.clone())
        assert torch.equal(covered[0], plain[0]) and bool((out_cov[:h, :w] == 1).all())
        # the contrast's grey level reads covered pixels only: other colours under the uncovered ones, the
        # same colour rows
        a = same_scale.apply(image, mask, random.Random(seed), out, out_mask, coverage, out_cov)[0]
        b = same_scale.apply(painted, mask, random.Random(seed), out, out_mask, coverage, out_cov)[0]
        assert torch.equal(a, b)
        assert not torch.equal(a, same_scale.apply(painted, mask, random.Random(seed), out, out_mask)[0])


# ------------------------------------------------------------------------------- checks and messages
@pytest.mark.parametrize(
    ("name", "wants"),
    [
        ("float_image_v2", ["step 2 of 2, ToDtype", "torch.float32, not uint8", "Normalize"]),
        ("int64_labels_v2", ["ToDtype", "label map's dtype to torch.int64"]),
        ("linear_labels_albumentations", ["step 2 of 2, Rotate", "into a label map that held [0, 2, 10]"]),
        (
            "crop_image_only_v2",
            ["step 2 of 2, <function _crop_image_only", "image of 28x38 but a label map of 30x40"],
        ),
        ("raising_v2", ["step 2 of 2, <function _boom", "raised RuntimeError: boom"]),
    ],
)
def test_a_pipeline_that_breaks_the_contract_is_an_error_naming_the_transform(
    pipelines: str, name: str, wants: list[str]
) -> None:
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(30, 40, dtype=torch.uint8)
    mask[5:20, 5:20], mask[10:25, 22:35] = 2, 10  # a linear resize of these borders makes 1, 5, ... appear
    augment = UserAugment(spec(name))
    with pytest.raises(AugmentError) as e:
        augment(image, mask, sample_seeds(0, 0, 0), "sample 'k'")
    message = str(e.value)
    assert message.startswith(f"data.augment={spec(name)}: ") and message.endswith("(sample 'k')"), message
    for want in wants:
        assert want in message, message


def test_an_error_in_a_loader_worker_reaches_the_rank_as_its_message(
    tiny_shards: dict[str, Path], pipelines: str
) -> None:
    loader = build_train_loader(plain_cfg(tiny_shards["train4"], "float_image_v2", num_workers=1), 0, 1, 0)
    with pytest.raises(AugmentError) as e:
        next(iter(loader))
    message = str(e.value)
    assert message.startswith(f"data.augment={spec('float_image_v2')}: step 2 of 2, ToDtype"), message
    assert "Traceback" not in message and "Traceback" in e.value.worker_traceback


def test_loading_names_what_is_wrong(pipelines: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = {
        "no_colon": "expected MODULE:FACTORY",
        "nosuch_module_xyz:build": "no module named nosuch_module_xyz",
        spec("nosuch"): f"module {MODULE} has no attribute nosuch",
        spec("fails"): "fails() raised RuntimeError: needs a config",
        spec("returns_a_number"): "returns_a_number() returned a builtins.int: expected a torchvision",
        spec("v1_transforms"): "Compose is a torchvision.transforms (v1) transform",
        spec("ANGLE"): "ANGLE is a float, not a factory or a pipeline",
    }
    for bad, want in cases.items():
        with pytest.raises(AugmentError, match="^" + f"data.augment={bad}: ") as e:
            load_pipeline(bad)
        assert want in str(e.value), str(e.value)
    assert isinstance(load_pipeline(spec("rotate_v2")), v2.Compose)
    assert load_pipeline(spec("PIPELINE_OBJECT")) is sys.modules[MODULE].PIPELINE_OBJECT  # an object, as is
    # albumentations not installed: the extra is named, at the import in the user's module or in a factory
    monkeypatch.setitem(sys.modules, "albumentations", None)
    for bad in ("needs_albumentations:build", spec("random_albumentations")):
        with pytest.raises(AugmentError) as e:
            load_pipeline(bad)
        assert "needs albumentations" in str(e.value) and "pip install -e .[albumentations]" in str(e.value)


def test_a_torch_worker_wrapper_message_is_unwrapped() -> None:
    wrapped = (
        "Caught AugmentError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ndist_seg.data.loading.augment.AugmentError: data.augment=m:f: bad\n'
    )
    e = AugmentError(wrapped)
    assert str(e) == "data.augment=m:f: bad" and e.worker_traceback == wrapped
    assert str(AugmentError("data.augment=m:f: plain")) == "data.augment=m:f: plain"


# ------------------------------------------------------------------------------- seeding
def test_the_user_stream_has_its_own_tag() -> None:
    tags = {v for k, v in vars(plan).items() if k.startswith("TAG_")}
    assert TAG_USER_AUG not in tags
    assert len(set(sample_seeds(0, 0, 7))) == 4 and sample_seeds(0, 0, 7) != sample_seeds(0, 1, 7)


@pytest.mark.parametrize("name", ["global_generators_v2", "random_albumentations"])
def test_each_sample_is_augmented_the_same_whoever_reads_it(
    tiny_shards: dict[str, Path], pipelines: str, name: str
) -> None:
    """Per (seed, epoch, sample id): one process without workers, two simulated ranks with two workers each,
    and a pass started at batch 3 all give each key the same bytes (image, labels, colour rows, size,
    coverage), with the built-in scale, crop, flip and jitter on."""
    c = dict(train_shards=str(tiny_shards["train4"]), crop_size=40, batch_size=2, augment=spec(name))
    alone = sample_hashes(build_train_loader(cfg(**c), 0, 1, seed=5))
    ranks = [build_train_loader(cfg(**c, num_workers=2), r, 2, seed=5) for r in range(2)]
    spread = [kh for loader in ranks for kh in sample_hashes(loader)]
    assert len(alone) == len(spread) == 40 and dict(alone) == dict(spread)
    resumed = sample_hashes(ranks[0], start_batch=3)
    assert resumed == sample_hashes(ranks[0])[3 * 2 :]
    other_epoch = dict(sample_hashes(build_train_loader(cfg(**c), 0, 1, seed=5), epoch=1))
    assert sum(other_epoch[k] != h for k, h in alone) > 30  # a new epoch, new draws


def test_the_built_in_draws_are_the_same_with_a_pipeline(
    tiny_shards: dict[str, Path], pipelines: str
) -> None:
    c = dict(train_shards=str(tiny_shards["train4"]), crop_size=20, batch_size=4, color_jitter=0.3)
    plain = build_train_loader(cfg(**c), 0, 1, seed=2)
    identity = build_train_loader(cfg(**c, augment=spec("identity_v2")), 0, 1, seed=2)
    for a, b in zip(plain, identity, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
        assert torch.equal(a.colour, b.colour) and torch.equal(a.sizes, b.sizes) and a.coverage is None
        for i, (h, w) in enumerate(b.sizes.tolist()):
            assert bool((b.coverage[i, :h, :w] == 1).all())
        assert torch.equal(a.model_input()[0], b.model_input()[0])


def test_the_global_generators_are_left_as_they_were(tiny_shards: dict[str, Path], pipelines: str) -> None:
    """With data.num_workers=0 the pipeline runs in the training process: its dropout draws must not move."""
    loader = build_train_loader(plain_cfg(tiny_shards["train4"], "global_generators_v2"), 0, 1, seed=0)
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    want = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    for _ in loader:
        pass
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_user_augment_seeds_decide_everything() -> None:
    """Direct calls: the same seeds give the same planes, other seeds other ones, for both libraries."""
    import albumentations as A

    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mask = F.interpolate(torch.randint(0, 3, (1, 1, 6, 8)).float(), (60, 80)).to(torch.uint8)[0, 0]
    for pipeline in (v2.Compose([v2.RandomRotation(40)]), A.Compose([A.Rotate(limit=40, p=1.0)])):
        u = UserAugment("test:pipeline", pipeline)
        a, b, c = (u(image, mask, sample_seeds(0, 0, i), "test") for i in (1, 1, 2))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert not torch.equal(a[0], c[0])
