"""`dist-seg export`: ONNX (onnxruntime), TorchScript and .pt2 files reproduce the PyTorch model at the
export size and at others; DeconvNet's unpooling stays ONNX MaxUnpool; metadata; a real image through the
CLI as users type it; a file that does not reproduce the model exits 1; errors name the flag or the file."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, shared_dataset
from torch import nn
from torchvision.io import ImageReadMode, decode_image, read_file

from dist_seg.checkpoint import load_for_inference, save_checkpoint
from dist_seg.config.loading import load_config
from dist_seg.config.schema import to_dict
from dist_seg.data.prep.coco import load_coco
from dist_seg.infer import export
from dist_seg.infer.export import ExportOptions, run_export
from dist_seg.infer.pool_switches import logits_on_switches, onnx_switches, run_with_switches
from dist_seg.models import build_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CONFIG = REPO / "configs/cpu_small.yaml"  # width_mult 0.0625: every model exports in seconds
CLASSES = ["background", "bottle", "can", "net", "rope"]
CONSTRAINTS = {"deconvnet": (32, 224), "fcn8s": (32, 32), "deeplab_v1": (8, 8)}  # (size_divisor, min_size)
SIZES = {"fcn8s": (64, 96), "deeplab_v1": (64, 96)}  # in-process export sizes; deconvnet goes through the CLI
# sizes this file checks again, independently of the exporter's own checks: 224 is where DeconvNet's fc6 map
# is 1x1, which a graph captured at a larger size must still accept; the others are the exporter's second
# check sizes (new shapes cost oneDNN kernel builds: the suite stays fast)
OTHER = {"deconvnet": (1, 224, 224), "fcn8s": (2, 96, 160), "deeplab_v1": (2, 72, 112)}
CHECK_LINE = re.compile(
    r"check \S+ vs PyTorch, (image \S+|random) \[(\d+), 3, (\d+), (\d+)\]: .* (OK|FAILED)"
)


def _cfg(name: str):
    return load_config(CONFIG, [f"model.name={name}"])


def _model(ck: Path, name: str) -> nn.Module:
    return load_for_inference(_cfg(name), ck, torch.device("cpu"))[0]


def _ort(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _assert_reproduces(model: nn.Module, run, n: int, h: int, w: int, atol_rel: float = 1e-3) -> None:
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, got = model(x), run(x)
    assert got.shape == ref.shape == (n, len(CLASSES), h, w)
    assert (got - ref).abs().max() <= atol_rel * ref.abs().max()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


def _real_image() -> Path | None:
    try:
        ann, images = shared_dataset("trashcan_subset")
    except pytest.skip.Exception:
        return None
    return images / load_coco(ann)["images"][0]["file_name"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint per VGG model in the layout `load_for_inference` reads (as in tests/test_predict.py)."""
    tmp = tmp_path_factory.mktemp("export_ck")
    paths = {}
    for name in CONSTRAINTS:
        cfg = _cfg(name)
        torch.manual_seed(0)
        model = build_model(cfg.model, len(CLASSES))
        for m in model.modules():  # He init, no biases, BN statistics off 0/1: logits vary across pixels
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        state = {"model": model.state_dict(), "config": to_dict(cfg), "model_name": name}
        state |= {"num_classes": len(CLASSES), "class_names": CLASSES, "train_state": {"step": 7}}
        paths[name] = tmp / f"{name}.pt"
        save_checkpoint(paths[name], state)
    return paths


@pytest.fixture(scope="module")
def onnx_files(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """name -> (stdout, file). DeconvNet through the CLI as users type it, checked on a real image when
    ../shared is there (padding and flat water give max-pool ties: the switches must match PyTorch's). The CLI
    runs while this process exports the other two: most of an export is single-threaded Python."""
    tmp = tmp_path_factory.mktemp("export_onnx")
    image = _real_image()
    cmd = [sys.executable, "-m", "dist_seg.cli", "export", "--config", str(CONFIG), "--format", "onnx"]
    cmd += ["--checkpoint", str(checkpoints["deconvnet"]), "--out", str(tmp / "deconvnet.onnx")]
    cmd += ["--image", str(image)] if image else []
    files = {}
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            for name, (h, w) in SIZES.items():
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    opts = ExportOptions(str(checkpoints[name]), "onnx", str(tmp / f"{name}.onnx"), h, w)
                    run_export(_cfg(name), opts)
                files[name] = (out.getvalue(), tmp / f"{name}.onnx")
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    files["deconvnet"] = (stdout, tmp / "deconvnet.onnx")
    return files


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_onnx_reproduces_pytorch_at_any_size(name: str, onnx_files: dict, checkpoints: dict) -> None:
    stdout, path = onnx_files[name]
    checks = CHECK_LINE.findall(stdout)
    assert len(checks) == 2 and all(c[-1] == "OK" for c in checks), stdout
    assert checks[1][1] == "2" and checks[1][2:4] != checks[0][2:4], "a second size and batch"
    assert "N, H, W dynamic" in stdout
    _assert_reproduces(_model(checkpoints[name], name), _ort(path), *OTHER[name])
    graph = onnx.load(path).graph
    assert [v.name for v in (*graph.input, *graph.output)] == ["images", "logits"]
    for v, channels in zip((*graph.input, *graph.output), (3, len(CLASSES)), strict=True):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # N, H, W symbolic
        assert [isinstance(d, str) for d in dims] == [True, False, True, True] and dims[1] == channels


def test_onnx_keeps_max_unpool_and_the_metadata(onnx_files: dict) -> None:
    for name, (_, path) in onnx_files.items():
        proto = onnx.load(path)
        ops = collections.Counter(n.op_type for n in proto.graph.node)
        # DeconvNet's five unpoolings stay MaxUnpool, not torch.export's ScatterND decomposition
        assert ops["MaxUnpool"] == (5 if name == "deconvnet" else 0) and ops["ScatterND"] == 0, ops
        meta = {p.key: p.value for p in proto.metadata_props}
        data = _cfg(name).data
        assert json.loads(meta["class_names"]) == CLASSES and json.loads(meta["num_classes"]) == len(CLASSES)
        assert (json.loads(meta["mean"]), json.loads(meta["std"])) == (list(data.mean), list(data.std))
        assert (json.loads(meta["size_divisor"]), json.loads(meta["min_size"])) == CONSTRAINTS[name]
        assert meta["model_name"] == name and meta["dynamic"] == "true" and "normalised" in meta["input"]
    assert "5 MaxUnpool ops" in onnx_files["deconvnet"][0]


def test_cli_checks_a_real_image(onnx_files: dict, checkpoints: dict) -> None:
    image = _real_image()
    if image is None:
        shared_dataset("trashcan_subset")  # skips, saying where the data should be
    stdout, path = onnx_files["deconvnet"]
    assert f"image {image.name} [1, 3, 288, 480]" in stdout  # 270 x 480 padded to multiples of 32
    # independently of the exporter's own check: decoded, normalised with data.mean/std, padded with 0 to 32
    data = _cfg("deconvnet").data
    rgb = decode_image(read_file(str(image)), mode=ImageReadMode.RGB).float() / 255
    x = (rgb - torch.tensor(data.mean).view(3, 1, 1)) / torch.tensor(data.std).view(3, 1, 1)
    x = F.pad(x, (0, 480 - x.shape[-1], 0, 288 - x.shape[-2]))[None]
    # the exporter's input is the loaders' (colour.to_model_input): the same values, rounded differently
    x_export = export.load_image(str(image), _cfg("deconvnet"), 32, 224)
    assert (x_export - x).abs().max() <= 1e-6
    model = _model(checkpoints["deconvnet"], "deconvnet")
    for inp in (x, x_export):
        # either rounding may put a max-pool window on a near-tie that onnxruntime breaks differently (that
        # moves a patch of logits: dist_seg.infer.pool_switches), so the reference is PyTorch on the
        # runtime's switches, which must be maxima; measured: 0 to 3 differing switches per input, within
        # 1e-7 of their layer's largest value, and the logits then within 2e-6
        ref, differing, gap = _pinned(model, inp, path)
        got = _ort(path)(inp)
        assert gap <= export.RTOL, f"{differing} switches differ, by up to {gap:.1e}: not near-ties"
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max() and torch.equal(got.argmax(1), ref.argmax(1))
        assert len(torch.unique(ref.argmax(1))) > 1, "the test model must predict varied maps"


def _pinned(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[torch.Tensor, int, float]:
    pinned = logits_on_switches(model, x, onnx_switches(path, x))
    assert pinned is not None, "onnxruntime's switches must match DeconvNet's five pools"
    return pinned


def _windows(inp: torch.Tensor) -> torch.Tensor:
    """The 2x2/2 max-pool windows of [N, C, H, W] as [N, C, H/2, W/2, 4]."""
    n, c, h, w = inp.shape
    return inp.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)


def _swap_switches(inp: torch.Tensor, own: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """2x2/2 max-pool switches with each window in `where` moved to its second-largest value."""
    second = _windows(inp).topk(2, -1).indices[..., 1]
    h, w = inp.shape[-2:]
    rows = torch.arange(h // 2).view(-1, 1) * 2 + second // 2
    cols = torch.arange(w // 2).view(1, -1) * 2 + second % 2
    return torch.where(where, rows * w + cols, own)


def test_max_pool_ties_are_checked_on_the_runtimes_switches(
    checkpoints: dict, onnx_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime that breaks exact max-pool ties differently moves whole patches of DeconvNet's logits; the
    check accepts it by comparing with PyTorch on the runtime's switches, and still rejects wrong logits and
    switches that are not maxima. The runtime here is PyTorch with other switches, so no luck is involved."""
    model = _model(checkpoints["deconvnet"], "deconvnet")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    x[:, :, 96:] = 0  # flat, like padding: its pooling windows tie exactly
    ref, calls = run_with_switches(model, x)
    inp, own = calls[1]  # pool2
    top2 = _windows(inp).topk(2, -1).values
    tie = (top2[..., 0] == top2[..., 1]) & (top2[..., 0] > 0)
    far = top2[..., 0] - top2[..., 1] > 0.1 * inp.abs().max()
    assert tie.sum() > 100 and far.sum() > 100
    switches = [s for _, s in calls]
    switches[1] = _swap_switches(inp, own, tie)
    got, _ = run_with_switches(model, x, switches)
    assert not export.compare(ref, got)["ok"], "broken ties must matter, or this test shows nothing"

    pinned = logits_on_switches(model, x, switches)
    assert pinned is not None and pinned[1] > 100 and pinned[2] == 0.0 and torch.equal(pinned[0], got)
    # ONNX MaxUnpool's indices are flattened over the whole tensor: read modulo the plane, the same switches
    flat = []
    for (pool_input, _), s in zip(calls, switches, strict=True):
        n, c, h, w = pool_input.shape
        flat.append(s + torch.arange(n * c).view(n, c, 1, 1) * h * w)
    flat_pinned = logits_on_switches(model, x, flat)
    assert flat_pinned is not None and torch.equal(flat_pinned[0], got)

    _, path = onnx_files["deconvnet"]
    monkeypatch.setattr(export, "onnx_switches", lambda p, t: switches)
    c = export.check_against_pytorch(model, lambda t: got, x, "onnx", path)
    assert c["ok"] and c["switches"] == pinned[1] and c["max_abs"] == 0.0
    assert not export.check_against_pytorch(model, lambda t: got * 1.01, x, "onnx", path)["ok"]
    switches[1] = _swap_switches(inp, own, tie | far)  # some picks far below their window's maximum
    wrong, _ = run_with_switches(model, x, switches)
    c = export.check_against_pytorch(model, lambda t: wrong, x, "onnx", path)
    assert not c["ok"] and c["switch_gap"] > 0.1


def test_onnx_switches_are_the_files_own(checkpoints: dict, onnx_files: dict) -> None:
    """The switches read from the ONNX file are DeconvNet's: on a random input (no ties) they equal PyTorch's."""
    model = _model(checkpoints["deconvnet"], "deconvnet")
    x = torch.randn(2, 3, 256, 224, generator=torch.Generator().manual_seed(4))
    ref, _ = run_with_switches(model, x)
    pinned = logits_on_switches(model, x, onnx_switches(onnx_files["deconvnet"][1], x))
    assert pinned is not None and pinned[1] == 0 and pinned[2] == 0.0 and torch.equal(pinned[0], ref)


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_torchscript_round_trip(name: str, checkpoints: dict, tmp_path: Path) -> None:
    h, w = SIZES.get(name, (224, 224))
    result = run_export(
        _cfg(name), ExportOptions(str(checkpoints[name]), "torchscript", str(tmp_path / "m.ts"), h, w)
    )
    assert len(result["checks"]) == 2 and all(c["ok"] for c in result["checks"])  # measured: max_abs 0
    extra = {"dist_seg.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit
        loaded = torch.jit.load(str(tmp_path / "m.ts"), _extra_files=extra)
    meta = json.loads(extra["dist_seg.json"])
    assert meta["class_names"] == CLASSES and meta["model_name"] == name and meta["step"] == 7
    assert meta["weights"] == "model"  # the checkpoint has no EMA
    _assert_reproduces(_model(checkpoints[name], name), loaded, 1, h, w, atol_rel=1e-5)


def test_pt2_round_trip(checkpoints: dict, tmp_path: Path) -> None:
    opts = ExportOptions(str(checkpoints["deeplab_v1"]), "pt2", str(tmp_path / "m.pt2"), 64, 96)
    result = run_export(_cfg("deeplab_v1"), opts)
    assert result["dynamic"] and [c["shape"] for c in result["checks"]] == [[1, 3, 64, 96], [2, 3, 72, 112]]
    assert all(c["ok"] for c in result["checks"])
    extra = {"dist_seg.json": ""}
    program = torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra)
    assert json.loads(extra["dist_seg.json"])["class_names"] == CLASSES
    _assert_reproduces(
        _model(checkpoints["deeplab_v1"], "deeplab_v1"), program.module(), *OTHER["deeplab_v1"]
    )


def test_static_export_and_onnxruntime_missing(
    checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(CONFIG), "--checkpoint", str(checkpoints["deeplab_v1"]), "model.name=deeplab_v1"]
    argv += ["--format", "onnx", "--height", "64", "--width", "96", "--static"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    assert export.main([*argv, "--out", str(tmp_path / "a.onnx"), "--check"]) == 2
    assert "needs onnxruntime" in capsys.readouterr().err and not (tmp_path / "a.onnx").exists()
    assert export.main([*argv, "--out", str(tmp_path / "s.onnx")]) == 0
    out = capsys.readouterr().out
    assert (
        "input [1, 3, 64, 96]" in out
        and "check skipped (no onnxruntime: pip install 'dist-seg[export]')" in out
    )
    monkeypatch.undo()
    graph = onnx.load(tmp_path / "s.onnx").graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, 64, 96]
    _assert_reproduces(_model(checkpoints["deeplab_v1"], "deeplab_v1"), _ort(tmp_path / "s.onnx"), 1, 64, 96)


def test_a_file_that_does_not_reproduce_the_model_fails(
    checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = export.load_runner

    def off_by_a_bit(fmt: str, path: Path):
        run = real(fmt, path)
        return lambda x: run(x) * 1.01  # 1% of the logit scale: 10x the tolerance, argmax unchanged

    monkeypatch.setattr(export, "load_runner", off_by_a_bit)
    argv = ["--config", str(CONFIG), "--checkpoint", str(checkpoints["deeplab_v1"]), "model.name=deeplab_v1"]
    argv += ["--format", "torchscript", "--height", "32", "--width", "32", "--out", str(tmp_path / "m.ts")]
    assert export.main(argv) == 1
    captured = capsys.readouterr()
    assert (
        captured.out.count("FAILED") == 2
        and "does not reproduce the PyTorch model on 2 input(s)" in captured.err
    )
    ref = torch.randn(1, 4, 10, 10)
    assert export.compare(ref, ref.clone())["ok"]
    wrong = ref.clone()
    wrong[0, ref[0, :, 0, 0].argmax(), 0, 0] = ref.min() - 1  # 1 pixel of 100 changes class: agreement 99%
    assert export.compare(ref, wrong, rtol=100.0)["agreement"] == pytest.approx(0.99)
    assert not export.compare(ref, wrong, rtol=100.0)["ok"]


def test_errors_name_the_flag_or_file(
    checkpoints: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = str(checkpoints["deconvnet"])
    base = ["--config", str(CONFIG), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    (tmp_path / "notes.jpg").write_text("not an image")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], f"checkpoint not found: {tmp_path / 'missing.pt'}"),
        (["--checkpoint", ck, "model.name=fcn8s"], "holds model 'deconvnet' with 5 classes, but the config"),
        (
            ["--checkpoint", ck, "--height", "240"],
            "--height 240: deconvnet needs a multiple of 32 >= 224",
        ),
        (
            ["--checkpoint", ck, "--width", "192"],
            "--width 192: deconvnet needs a multiple of 32 >= 224",
        ),
        (
            ["--checkpoint", ck, "--image", str(tmp_path / "x.png")],
            f"--image {tmp_path / 'x.png'}: file not found",
        ),
        (["--checkpoint", ck, "--image", str(tmp_path / "notes.jpg")], "notes.jpg: cannot decode it"),
        (["--checkpoint", ck, "--config", str(tmp_path / "no.yaml")], f"config file not found: {tmp_path}"),
        (["--checkpoint", ck, "--weights", "ema"], f"--weights ema: checkpoint {ck} holds no weight EMA"),
    ]
    for extra, message in cases:
        assert export.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("dist-seg export: error: ") and message in err, (extra, err)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(SystemExit) as e:
        export.main([*base, "--checkpoint", ck, "--format", "tflite"])
    assert e.value.code == 2 and "argument --format: invalid choice: 'tflite'" in capsys.readouterr().err
