"""torchrun whose rendezvous store listens only where it is told to:

    python -m runtime.torchrun --standalone --nproc-per-node=2 -m runtime.train --plan plan.json
    python -m runtime.torchrun --nnodes=2 --node-rank=0 --nproc-per-node=4 \\
        --master-addr=10.0.0.5 --master-port=29500 -m runtime.train --plan plan.json ...

The same flags as torchrun (``python -m torch.distributed.run``). torchrun's own stores
(the c10d rendezvous of ``--standalone``, the static one of ``--master-addr``) listen on
every interface of the machine (``*:PORT`` in ``ss -ltnp``), so anyone who can reach the
machine can write into a run's store while it starts. Here both are replaced by one
rendezvous (registered with torchrun's handler registry as ``hetalloc``): node 0's
launcher hosts the store on 127.0.0.1 for ``--standalone``, or on the address
``--master-addr`` names for a multi-node run, and the ranks use that store (they open
no store of their own; gloo listens on the interface GLOO_SOCKET_IFNAME names). A
``--master-addr`` that is not an address of node 0, or a host name that resolves to a
loopback address on a multi-node run (Debian's ``127.0.1.1``), gets every interface
with a one-line note. Other ``--rdzv-backend`` choices pass through untouched.

When the environment names a file in ``HETALLOC_FAILURES``, a failed run leaves there
which ranks failed and how (exit code, or the signal that ended them; JSON): an adaptive
run (workflows.adaptive) tells a rank that was lost (killed by a signal other than the
SIGTERM this launcher sends the others) from ranks that merely stopped with it.

Never imported by training code: only this launcher process registers the handler.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from datetime import timedelta

from torch.distributed import PrefixStore, Store, TCPStore
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.elastic.rendezvous import (RendezvousHandler, RendezvousInfo, RendezvousParameters,
                                                  rendezvous_handler_registry)
from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import parse_args, run

BACKEND = "hetalloc"
LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 29500
DEFAULT_TIMEOUT_S = 900


def bind_address(host: str, nnodes: int) -> tuple[str | None, str | None]:
    """The address node 0's store binds for a rendezvous at `host` (None: every
    interface) and, when that is not `host` itself, a note saying why."""
    try:
        ip = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        return None, f"cannot resolve '{host}' ({e.strerror})"
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    if nnodes > 1 and not literal and ipaddress.ip_address(ip).is_loopback:
        return None, (f"'{host}' resolves to {ip}, a loopback address, on this node; pass node 0's IP address as "
                      "--master-addr to listen only there")
    return ip, None


def listen(host: str, port: int, nnodes: int) -> tuple[int | None, int]:
    """A listening socket for the store, bound as bind_address decides: (its file
    descriptor, now owned by the caller, or None for every interface; the port)."""
    ip, note = bind_address(host, nnodes)
    if ip is not None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(socket.SOMAXCONN)
            bound = sock.getsockname()[1]
            return sock.detach(), bound
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRNOTAVAIL:
                raise
            note = f"'{host}' ({ip}) is not an address of this node"
    print(f"hetalloc: the rendezvous store listens on all interfaces: {note}", file=sys.stderr, flush=True)
    return None, port


class BoundStoreRendezvous(RendezvousHandler):
    """A fixed set of nodes (like torchrun's static rendezvous); node 0 hosts the store
    on the rendezvous address only; the ranks use it (use_agent_store)."""

    def __init__(self, host: str, port: int, rank: int, nnodes: int, run_id: str, timeout_s: int):
        self.host, self.port, self.rank, self.nnodes, self.run_id = host, port, rank, nnodes, run_id
        self.timeout = timedelta(seconds=timeout_s)
        self._store: Store | None = None

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            if self.rank == 0:
                fd, self.port = listen(self.host, self.port, self.nnodes)
                self._store = TCPStore(self.host, self.port, self.nnodes, True, self.timeout, master_listen_fd=fd)
            else:
                if self.port == 0:
                    raise ValueError("a multi-node rendezvous needs a port: pass --master-port")
                self._store = TCPStore(self.host, self.port, self.nnodes, False, self.timeout)
        return RendezvousInfo(PrefixStore(self.run_id, self._store), self.rank, self.nnodes,
                              RendezvousStoreInfo(self.host, self.port))

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_PORT)
    if params.min_nodes != params.max_nodes:
        raise ValueError(f"a fixed number of nodes is needed (--nnodes={params.max_nodes}, not a range)")
    return BoundStoreRendezvous(host, port, int(params.config.get("rank", 0)), params.max_nodes, params.run_id,
                                int(params.config.get("timeout", DEFAULT_TIMEOUT_S)))


def translate(args):
    """torchrun's parsed arguments, with --standalone and the static rendezvous
    (--master-addr/--master-port/--node-rank) turned into this rendezvous."""
    conf = [c for c in (args.rdzv_conf or "").split(",") if c]
    if args.standalone:
        args.standalone = False
        args.nnodes = "1"
        args.rdzv_backend, args.rdzv_endpoint = BACKEND, f"{LOOPBACK}:0"
        args.rdzv_conf = ",".join(conf + ["rank=0"])
    elif args.rdzv_backend == "static":
        port = args.master_port if args.master_port is not None else DEFAULT_PORT
        args.rdzv_backend = BACKEND
        args.rdzv_endpoint = args.rdzv_endpoint or f"{args.master_addr}:{port}"
        args.rdzv_conf = ",".join(conf + [f"rank={args.node_rank}"])
        args.node_rank = 0  # read from rdzv_conf; torchrun would warn that it ignores it
    return args


FAILURES_ENV = "HETALLOC_FAILURES"


def write_failures(path: str, error: ChildFailedError) -> None:
    """Which ranks failed and how, as JSON (module doc)."""
    from hetalloc.fileio import atomic_write_json
    atomic_write_json(path, {"failures": [
        {"rank": rank, "local_rank": f.local_rank, "pid": f.pid, "exitcode": f.exitcode,
         "signal": f.signal_name() if f.exitcode < 0 else None, "time": f.timestamp}
        for rank, f in sorted(error.failures.items())]})


@record
def main(argv: list[str] | None = None) -> None:
    rendezvous_handler_registry.register(BACKEND, create_handler)
    try:
        run(translate(parse_args(argv)))
    except ChildFailedError as e:
        if os.environ.get(FAILURES_ENV):
            write_failures(os.environ[FAILURES_ENV], e)
        raise


if __name__ == "__main__":
    main()
