"""Export a checkpoint for inference elsewhere: ONNX, TorchScript or a torch.export program (.pt2), checked.

    dist-seg export --config configs/deconvnet_vgg16bn.yaml --checkpoint runs/x/best.pt --format onnx \
        --out model.onnx
    dist-seg export --config CFG --checkpoint CKPT --format onnx --out m.onnx --image data/test/a.jpg
    dist-seg export --config CFG --checkpoint CKPT --format torchscript --out m.ts --height 512 --width 512
    dist-seg export --config CFG --checkpoint CKPT --format pt2 --out m.pt2 --static model.width_mult=0.5

The exported graph takes `images`: float32 [N, 3, H, W], RGB scaled to 0..1 and then normalised with the
config's data.mean/data.std, exactly as in training; it returns `logits`: float32 [N, C, H, W]. H and W
must be multiples of the model's size_divisor and >= its min_size: pad bottom/right with 0 (the mean colour)
and crop the logits back, as `dist-seg predict` does. N, H and W are dynamic unless --static (or unless the
model cannot be). Every file carries the same metadata (model_name, class_names, num_classes, mean, std,
size_divisor, min_size, ...): ONNX in metadata_props (lists as json), the others as the extra file
`dist_seg.json`. --weights picks the EMA or the trained weights as evaluate/predict do.

Exporters (torch 2.14): ONNX goes through torch.export (the dynamo exporter; needs onnxscript). The legacy
TorchScript-based ONNX exporter is deprecated and cannot trace DeconvNet (F.max_unpool2d's size check fails
on traced sizes). torchlib has no translation for max_unpool2d and would decompose it into ScatterND; we
emit ONNX MaxUnpool instead. TorchScript is torch.jit.trace (the models are not scriptable); torch 2.14
deprecates torch.jit, so --format pt2 (torch.export.save) is its supported successor.

After writing, the file is loaded back (onnxruntime, torch.jit.load, torch.export.load) and run next to the
PyTorch model on --image (decoded and normalised like `dist-seg predict`) or a random normalised batch, and
at a second size and batch when dynamic: a max |logit difference| above 1e-3 x the largest |logit|, or an
argmax agreement below 99.9%, exits 1. Where DeconvNet's max-pool switches sit on near-ties (flat or padded
parts of a real photo), onnxruntime may break them differently, which moves whole patches of logits; the check
then verifies that its switches are maxima and compares with PyTorch run on the same switches
(dist_seg.infer.pool_switches). Without onnxruntime the ONNX check is skipped, unless --check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_seg.checkpoint import WEIGHTS, LoadedCheckpoint, load_for_inference
from dist_seg.config.loading import load_config
from dist_seg.config.schema import Config
from dist_seg.data.loading.colour import plain_colour, to_model_input
from dist_seg.data.loading.transforms import eval_transform, padded_size
from dist_seg.infer.pool_switches import logits_on_switches, onnx_switches, switch_pools
from dist_seg.models import input_constraints

FORMATS = ("onnx", "torchscript", "pt2")
RUNTIMES = {"onnx": "onnxruntime", "torchscript": "torch.jit.load", "pt2": "torch.export.load"}
INSTALL = "pip install 'dist-seg[export]'"
INPUT = (
    "images: float32 [N, 3, H, W], RGB / 255 normalised as (x - mean) / std; H and W multiples of "
    "size_divisor and >= min_size (pad bottom/right with 0)"
)
RTOL, MIN_AGREEMENT = 1e-3, 0.999  # max |logit diff| / largest |logit|; argmax agreement


@dataclasses.dataclass
class ExportOptions:
    checkpoint: str
    format: str
    out: str
    height: int | None = None
    width: int | None = None
    image: str | None = None
    dynamic: bool = True
    opset: int | None = None
    check: bool | None = None  # None: check when the runtime is installed; True: require it; False: skip
    weights: str = "auto"  # as evaluate/predict: the EMA when the checkpoint holds one


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------------------------------------- ONNX / pt2
def capture(model: nn.Module, size: tuple[int, int], dynamic: bool) -> tuple[Any, bool, str]:
    """torch.export of `model` -> (ExportedProgram, dynamic, note). Dynamic: N, and H, W = size_divisor * k
    with k >= ceil(min_size / size_divisor); a model that cannot be captured so is captured static."""
    divisor, min_size = input_constraints(model)
    k = padded_size(1, 1, divisor, min_size)[0] // divisor  # the smallest size the model takes, in divisors
    Dim = torch.export.Dim
    shapes = ({0: Dim("batch", min=1), 2: divisor * Dim("h", min=k), 3: divisor * Dim("w", min=k)},)
    # Without backed_size_oblivious (torch.onnx's own setting) torch.export assumes that a dim seen != 1
    # stays != 1: DeconvNet's fc6 map is 1x1 only at 224, so an example above 224 would make 224 fail a guard.
    from torch.fx.experimental import _config as flags

    oblivious = hasattr(flags, "backed_size_oblivious")
    if dynamic:
        try:  # an example batch of 2: a batch of 1 would be specialised to 1
            with flags.patch(backed_size_oblivious=True) if oblivious else contextlib.nullcontext():
                example = (torch.randn(2, 3, *size),)
                return torch.export.export(model, example, dynamic_shapes=shapes), True, ""
        except Exception as e:  # whatever stops the dynamic capture: export static, and say why
            note = f"dynamic shapes failed ({_first_line(e)}): exported static [1, 3, {size[0]}, {size[1]}]"
            return torch.export.export(model, (torch.randn(1, 3, *size),)), False, note
    return torch.export.export(model, (torch.randn(1, 3, *size),)), False, ""


def _onnx_max_unpool2d(x: Any, indices: Any, output_size: Any) -> Any:
    """aten.max_unpool2d as ONNX MaxUnpool. torch's switches index each (n, c) plane, ONNX's the whole
    flattened tensor, so each plane's offset (n * C + c) * H * W is added. The kernel only sets MaxUnpool's
    default output size, which the explicit output shape overrides (aten's op has no kernel). No Reduce ops:
    the conversion to opsets below 18 mistranslates them."""
    from onnxscript import opset18 as op

    def const(v: Any) -> Any:
        return op.Constant(value_ints=v) if isinstance(v, list) else op.Constant(value_int=v)

    shape = op.Shape(x)
    n, c = op.Gather(shape, const(0)), op.Gather(shape, const(1))
    h, w = (const(v) if isinstance(v, int) else v for v in output_size)  # ints when static, else scalars
    plane = op.Mul(h, w)
    offsets = op.Range(const(0), op.Mul(op.Mul(n, c), plane), plane)
    offsets = op.Reshape(offsets, op.Concat(op.Slice(shape, const([0]), const([2])), const([1, 1]), axis=0))
    out_shape = op.Concat(
        op.Slice(shape, const([0]), const([2])), op.Reshape(h, const([1])), op.Reshape(w, const([1])), axis=0
    )
    return op.MaxUnpool(x, op.Add(indices, offsets), out_shape, kernel_shape=[2, 2], strides=[2, 2])


def write_onnx(program: Any, out: Path, meta: dict[str, Any], opset: int | None) -> str:
    onnx_program = torch.onnx.export(
        program,
        input_names=["images"],
        output_names=["logits"],
        opset_version=opset,
        dynamo=True,
        verbose=False,
        custom_translation_table={torch.ops.aten.max_unpool2d.default: _onnx_max_unpool2d},
    )
    model = onnx_program.model
    model.doc_string = meta["input"]
    for key, value in meta.items():
        model.metadata_props[key] = value if isinstance(value, str) else json.dumps(value)
    onnx_program.save(str(out), external_data=False)  # one self-contained file; every model here is < 2 GB
    unpools = sum(n.op_type == "MaxUnpool" for n in model.graph.all_nodes())
    return f"ONNX opset {model.opset_imports['']}" + (f", {unpools} MaxUnpool ops" if unpools else "")


# ---------------------------------------------------------------------------------------------- TorchScript
class _TraceableMaxUnpool2d(nn.Module):
    """nn.MaxUnpool2d without F.max_unpool2d's Python size checks, which raise under torch.jit.trace (sizes
    are traced tensors there); the aten op takes the traced sizes, so the trace keeps H and W dynamic."""

    def forward(self, x: Tensor, indices: Tensor, output_size: Any) -> Tensor:  # DeconvNet passes the size
        return torch._C._nn.max_unpool2d(x, indices, list(output_size)[-2:])


@contextlib.contextmanager
def _traceable_unpools(model: nn.Module) -> Iterator[None]:
    found = [
        (m, n, c) for m in model.modules() for n, c in m.named_children() if isinstance(c, nn.MaxUnpool2d)
    ]
    for parent, name, _ in found:
        setattr(parent, name, _TraceableMaxUnpool2d())
    try:
        yield
    finally:  # the model is the caller's: put its own modules back
        for parent, name, child in found:
            setattr(parent, name, child)


def write_torchscript(model: nn.Module, size: tuple[int, int], out: Path, meta: dict[str, Any]) -> str:
    with warnings.catch_warnings(), _traceable_unpools(model), torch.no_grad():
        # torch.jit's FutureWarnings are summed up in the message; the TracerWarnings are the models' input
        # size checks, which the trace records as passed (the second-size check shows it still generalises)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (torch.randn(1, 3, *size),), check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"dist_seg.json": json.dumps(meta)})
    return "TorchScript (torch.jit.trace; torch 2.14 deprecates torch.jit: --format pt2 is its successor)"


# ---------------------------------------------------------------------------------------------- check
def load_runner(fmt: str, path: Path) -> Callable[[Tensor], Tensor]:
    """The exported file as a function of a [N, 3, H, W] batch (ImportError without onnxruntime)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    return lambda x: module(x)


def load_image(path: str, cfg: Config, divisor: int, min_size: int) -> Tensor:
    """[1, 3, H, W] normalised like `dist-seg predict` (EXIF rotation, data.eval_resize, mean/std), padded
    bottom/right with 0 (the mean colour) to the model's input constraints."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        image = decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--image {path}: cannot decode it ({_first_line(e)})") from e
    x, _ = eval_transform(cfg.data)(image, None)  # data.eval_resize, as evaluate/predict
    # the one normalisation path, as evaluate and predict: the same input bits as `dist-seg predict`
    x = to_model_input(x[None], plain_colour(cfg.data.mean, cfg.data.std)[None])
    h, w = padded_size(x.shape[-2], x.shape[-1], divisor, min_size)
    return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))


def compare(ref: Tensor, got: Tensor, rtol: float = RTOL) -> dict[str, Any]:
    """Max |difference| (absolute and relative to the largest |logit|) and argmax agreement; ok or not."""
    if tuple(got.shape) != tuple(ref.shape):
        return {"ok": False, "max_abs": float("inf"), "rel": float("inf"), "scale": 0.0, "agreement": 0.0}
    max_abs, scale = float((got.float() - ref).abs().max()), max(float(ref.abs().max()), 1e-12)
    agreement = float((got.argmax(1) == ref.argmax(1)).float().mean())
    ok = max_abs <= rtol * scale and agreement >= MIN_AGREEMENT
    return {"ok": ok, "max_abs": max_abs, "rel": max_abs / scale, "scale": scale, "agreement": agreement}


def check_against_pytorch(
    model: nn.Module, runner: Callable[[Tensor], Tensor], x: Tensor, fmt: str, path: Path
) -> dict[str, Any]:
    """compare(PyTorch, runtime) on x. When that fails for an ONNX file of a model that unpools with its
    max-pool switches, compare instead with PyTorch run on the runtime's switches, provided that they are
    maxima within RTOL (see dist_seg.infer.pool_switches for why logits alone cannot decide there)."""
    with torch.inference_mode():
        ref, got = model(x), runner(x)
    result = compare(ref, got)
    if result["ok"] or fmt != "onnx" or not switch_pools(model):
        return result
    pinned = logits_on_switches(model, x, onnx_switches(path, x))
    if pinned is None:  # switches not matched to the pools: the plain verdict stands
        return result
    logits, differing, gap = pinned
    result = compare(logits, got) | {"switches": differing, "switch_gap": gap}
    return result | {"ok": result["ok"] and gap <= RTOL}


def metadata(cfg: Config, ck: LoadedCheckpoint, divisor: int, min_size: int, dynamic: bool) -> dict[str, Any]:
    """What a user of the file needs to feed it and read its output (same keys in every format)."""
    meta = {"model_name": ck.model_name, "num_classes": ck.num_classes, "class_names": ck.class_names}
    meta |= {"mean": list(cfg.data.mean), "std": list(cfg.data.std), "size_divisor": divisor}
    meta |= {"min_size": min_size, "dynamic": dynamic, "input": INPUT}
    meta["output"] = f"logits: float32 [N, {ck.num_classes}, H, W]"
    meta |= {"checkpoint": str(ck.path), "step": ck.step, "weights": ck.weights}
    return meta | {"torch": torch.__version__}


# ---------------------------------------------------------------------------------------------- command
def run_export(cfg: Config, opts: ExportOptions) -> dict[str, Any]:
    """Write opts.out, then check it. Returns {out, dynamic, checks: [{label, shape, ok, max_abs, rel, scale,
    agreement}]}; user errors are ValueErrors naming the flag or file, raised before anything is written."""
    if opts.format not in FORMATS:
        raise ValueError(f"--format {opts.format!r}: expected one of {', '.join(FORMATS)}")
    if opts.image is not None and not Path(opts.image).is_file():
        raise ValueError(f"--image {opts.image}: file not found")
    check = opts.check
    for module in ("onnxscript", "onnxruntime") if opts.format == "onnx" else ():
        try:
            __import__(module)
        except ImportError:
            if module == "onnxscript" or check:
                raise ValueError(f"--format onnx needs {module} (to export or to check): {INSTALL}") from None
            check = False  # onnxruntime is optional: export, and say that the check was skipped
    try:
        model, ck = load_for_inference(cfg, opts.checkpoint, torch.device("cpu"), weights=opts.weights)
    except RuntimeError as e:  # a torn or foreign file: the message names it
        raise ValueError(str(e)) from e
    divisor, min_size = input_constraints(model)
    image = load_image(opts.image, cfg, divisor, min_size) if opts.image else None
    h, w = image.shape[-2:] if image is not None else (cfg.data.crop_size, cfg.data.crop_size)
    size = padded_size(opts.height or h, opts.width or w, divisor, min_size)
    for flag, want, got in (("--height", opts.height, size[0]), ("--width", opts.width, size[1])):
        if want is not None and want != got:
            raise ValueError(f"{flag} {want}: {ck.model_name} needs a multiple of {divisor} >= {min_size}")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = ""
    if opts.format == "torchscript":  # a trace records sizes; the second-size check below verifies that
        dynamic = opts.dynamic
        what = write_torchscript(model, size, out, metadata(cfg, ck, divisor, min_size, dynamic))
    else:
        program, dynamic, note = capture(model, size, opts.dynamic)
        meta = metadata(cfg, ck, divisor, min_size, dynamic)
        if opts.format == "onnx":
            what = write_onnx(program, out, meta, opts.opset)
        else:
            torch.export.save(program, str(out), extra_files={"dist_seg.json": json.dumps(meta)})
            what = "torch.export program (.pt2)"
    dims = f"N, H, W dynamic (H, W multiples of {divisor}, >= {min_size}; exported at {size[0]}x{size[1]})"
    axes = f"[N, 3, H, W], {dims}" if dynamic else f"[1, 3, {size[0]}, {size[1]}]"
    source = f"{ck.model_name} ({ck.num_classes} classes, step {ck.step}, {ck.weights} weights)"
    print(f"wrote {out}: {source}, {what}; input {axes}")
    if note:
        print(f"note: {note}")
    result: dict[str, Any] = {"out": out, "dynamic": dynamic, "checks": []}
    if check is False:
        why = "--no-check" if opts.check is False else f"no onnxruntime: {INSTALL}"
        print(f"numerical check skipped ({why})")
        return result
    inputs: list[tuple[str, Tensor]] = []
    if image is not None:
        if not dynamic and image.shape[-2:] != size:  # a static graph takes its one size only
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        inputs.append((f"image {Path(str(opts.image)).name}", image))
    if not inputs or inputs[0][1].shape[-2:] != size:
        inputs.append(("random", torch.randn(1, 3, *size)))
    if dynamic:  # another size and batch: the dynamic axes must really be dynamic
        inputs.append(("random", torch.randn(2, 3, size[0] + divisor, size[1] + 2 * divisor)))
    runner = load_runner(opts.format, out)
    for label, x in inputs:
        c = {
            "label": label,
            "shape": list(x.shape),
            **check_against_pytorch(model, runner, x, opts.format, out),
        }
        result["checks"].append(c)
        ties = (
            f" (PyTorch on the runtime's max-pool switches: {c['switches']} differ from its own, near-ties "
            f"within {c['switch_gap']:.1e} of their layer's largest value)"
            if "switches" in c
            else ""
        )
        print(
            f"check {RUNTIMES[opts.format]} vs PyTorch, {label} {c['shape']}: max |diff| {c['max_abs']:.2e} "
            f"({c['rel']:.1e} of the largest |logit| {c['scale']:.3g}), argmax agreement "
            f"{100 * c['agreement']:.3f}%{ties} {'OK' if c['ok'] else 'FAILED'}"
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-seg export", description="Export and check a checkpoint.")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (e.g. RUN_DIR/best.pt)")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx | torchscript | pt2 (torch.export)")
    p.add_argument("--out", required=True, help="file to write (e.g. model.onnx)")
    p.add_argument("--height", type=int, help="export/check height (default: --image's, else data.crop_size)")
    p.add_argument("--width", type=int, help="export/check width (default: --image's, else data.crop_size)")
    p.add_argument("--image", help="check on this image (normalised like predict) instead of random input")
    p.add_argument("--dynamic", action="store_true", default=True, help="dynamic N, H and W (default)")
    p.add_argument("--static", dest="dynamic", action="store_false", help="fixed [1, 3, H, W]")
    p.add_argument("--weights", default="auto", choices=WEIGHTS, help="auto (EMA when saved) | ema | model")
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    p.add_argument(
        "--check", action=argparse.BooleanOptionalAction, help="compare with PyTorch (default: on)"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.width_mult=0.5")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    opts = ExportOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExportOptions)})
    try:
        result = run_export(load_config(args.config, args.overrides), opts)
    except ValueError as e:
        print(f"dist-seg export: error: {e}", file=sys.stderr)
        return 2
    failed = [c for c in result["checks"] if not c["ok"]]
    if failed:
        print(
            f"dist-seg export: error: {opts.out} does not reproduce the PyTorch model on {len(failed)} "
            f"input(s) (needs max |diff| <= {RTOL:g} x largest |logit| and argmax agreement >= "
            f"{100 * MIN_AGREEMENT:g}%); do not deploy it",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
