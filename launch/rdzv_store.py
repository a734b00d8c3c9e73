#!/usr/bin/env python
"""Host torchrun's c10d rendezvous store off the training nodes, so that losing any training node cannot take
the rendezvous down with it (torchrun cannot move the store: when the agent hosting it dies, every other agent
exits with RendezvousConnectionError).

    python launch/rdzv_store.py 29400          # on RDZV_HOST: a login node, a small CPU job, any machine
    RDZV_HOST=<that machine> NNODES=1:2 launch/multinode.sh CONFIG ...   # on every training node

launch/multinode.sh then passes --rdzv-endpoint=RDZV_HOST:29400 and --rdzv-conf=...,is_host=false. The server
listens on every interface and holds only rendezvous state (a few keys per round); stop it with SIGTERM or
Ctrl-C once the job is over. Tested by tests/e2e/test_node_loss.py.
"""

from __future__ import annotations

import argparse
import signal
import sys

from dist_seg.runtime import distributed as D


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int, nargs="?", default=29400, help="TCP port (default 29400)")
    args = ap.parse_args(argv)
    stop = {"sig": None}

    def _stop(signum: int, _frame: object) -> None:
        stop["sig"] = signum

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    store = D.rendezvous_store_server(args.port)  # noqa: F841  (serves while it lives)
    print(f"c10d rendezvous store listening on port {args.port}", flush=True)
    while stop["sig"] is None:
        signal.pause()
    print(f"rdzv_store: {signal.Signals(stop['sig']).name}, stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
