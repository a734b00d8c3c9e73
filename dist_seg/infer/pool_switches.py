"""Max-pool switches in `dist-seg export`'s check: PyTorch re-run with the exported runtime's switches.

A model whose max-pools hand their switches (the argmax of each window) to an unpooling, as DeconvNet's do,
is discontinuous at near-ties. Two correct float32 implementations differ in the last bits of every
activation (PyTorch and onnxruntime by about 1e-6 of the largest value, measured), so where two values of a
pooling window are closer than that, each runtime may pick either one, and the unpooling then puts the
decoder's value on the other pixel: logits change by up to a quarter of the largest logit on a patch of tens
to hundreds of pixels, while nothing is wrong with the file. A real photo has such windows wherever it is flat
(or padded): an unchanged ONNX file compared pixel by pixel with PyTorch failed on 4 of 12 trashcan photos and
passed on the rest, and which ones failed changed with the last bit of the input's rounding. Comparing logits
alone cannot tell this from a broken export, so where the plain comparison fails, the check splits it in two:

1. The runtime's switches must be maxima: at every window where they differ from PyTorch's, PyTorch's value
   at the runtime's pick must be within rtol x (that layer's largest |value|) of the window's maximum, the
   same relative tolerance the check grants the logits. A switch that is merely a differently broken
   near-tie passes (measured: within 1e-7 of the layer's largest value); a wrong index picks a clearly
   smaller value and fails.
2. Given the same switches, the logits must agree: PyTorch is run again with the runtime's switches in place
   of its own (its pooled values unchanged) and compared with the runtime's logits under the usual criteria.

Only ONNX needs this: TorchScript and .pt2 files run PyTorch's own kernels (measured: identical logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn


def switch_pools(model: nn.Module) -> list[nn.MaxPool2d]:
    """The model's max-pools that return their switches (for an unpooling)."""
    return [m for m in model.modules() if isinstance(m, nn.MaxPool2d) and m.return_indices]


def run_with_switches(
    model: nn.Module, x: Tensor, switches: Sequence[Tensor] | None = None
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """model(x), recording each switch pool call's (input, switches) in call order; with `switches` (one per
    call, per-plane indices as torch's max-pool returns them) the pools hand those on instead of their own."""
    calls: list[tuple[Tensor, Tensor]] = []

    def hook(
        module: nn.Module, args: tuple[Tensor, ...], out: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor] | None:
        calls.append((args[0], out[1]))
        return (out[0], switches[len(calls) - 1]) if switches is not None else None

    handles = [p.register_forward_hook(hook) for p in switch_pools(model)]
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, calls


def onnx_switches(path: Path, x: Tensor) -> list[Tensor]:
    """The switches onnxruntime uses for x: the index input of each MaxUnpool node of the file, which
    export._onnx_max_unpool2d writes flattened over the whole tensor (ONNX MaxUnpool's convention). Read from
    a copy of the graph with those indices as extra outputs; the file itself is left as written."""
    import onnx
    import onnxruntime

    proto = onnx.load(str(path))
    names = [n.input[1] for n in proto.graph.node if n.op_type == "MaxUnpool"]
    for name in names:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(names, {"images": x.numpy()})
    return [torch.from_numpy(o) for o in outputs]


def logits_on_switches(
    model: nn.Module, x: Tensor, runtime_switches: Sequence[Tensor]
) -> tuple[Tensor, int, float] | None:
    """(PyTorch's logits for x with the runtime's switches, how many switches differ from PyTorch's own, the
    largest gap between a window's maximum and the runtime's pick relative to that layer's largest |value|).
    Runtime switches are matched to the pool calls by shape and may be per plane or flattened over the whole
    tensor (indices modulo the plane size are the same either way). None when they cannot be matched."""
    _, calls = run_with_switches(model, x)
    by_shape: dict[tuple[int, ...], list[Tensor]] = {}
    for s in runtime_switches:
        by_shape.setdefault(tuple(s.shape), []).append(s)
    pinned, differing, worst = [], 0, 0.0
    for inp, own in calls:
        found = by_shape.get(tuple(own.shape), [])
        if len(found) != 1 or len(runtime_switches) != len(calls):
            return None
        n, c, h, w = inp.shape
        theirs = found[0].to(own.dtype) % (h * w)
        values = inp.reshape(n, c, h * w)
        gap = values.gather(2, own.reshape(n, c, -1)) - values.gather(2, theirs.reshape(n, c, -1))
        scale = max(float(inp.abs().max()), 1e-12)
        differing += int((theirs != own).sum())
        worst = max(worst, float(gap.abs().max()) / scale)
        pinned.append(theirs)
    logits, _ = run_with_switches(model, x, pinned)
    return logits, differing, worst
