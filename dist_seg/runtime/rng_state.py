"""The global RNGs of one process: capture and restore them for checkpoints, and seed them for a run.

Python's `random`, numpy's global RNG, torch's CPU generator and every CUDA device's. The states use only
types `torch.load(weights_only=True)` accepts, so a checkpoint carrying them stays safe to load.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python `random`, numpy's global RNG, torch CPU and every CUDA device, using only types
    that `weights_only=True` loads (tensors, ints, floats, strings, None)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored for the devices both runs have; a CUDA state
    saved on a machine without CUDA here (or the reverse) only warns."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["gauss"])))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        warnings.warn(
            "checkpoint holds CUDA RNG states but CUDA is not available; not restored", stacklevel=2
        )
        return
    count = min(len(cuda), torch.cuda.device_count())
    if count != len(cuda) or count != torch.cuda.device_count():
        warnings.warn(
            f"checkpoint holds {len(cuda)} CUDA RNG states, this machine has "
            f"{torch.cuda.device_count()} devices; restoring the first {count}",
            stacklevel=2,
        )
    for i in range(count):
        torch.cuda.set_rng_state(cuda[i].cpu(), device=i)


def seed_rngs(*values: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (every CUDA device too) from `values`."""
    seed = int(np.random.SeedSequence([v % (1 << 63) for v in values]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
