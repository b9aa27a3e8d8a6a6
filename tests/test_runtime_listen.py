"""Where a run listens: runtime.torchrun turns torchrun's --standalone and static
rendezvous into one whose store listens on 127.0.0.1 (standalone) or on --master-addr
(multi-node), never on every interface. Checked on the real handler and store, with
the kernel's own table of listening sockets (/proc/net/tcp, tcp6); the launcher's
command lines use it."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from runtime.launch import local_command, node_commands, train_args
from runtime.rankmap import RankMap
from runtime.torchrun import BACKEND, BoundStoreRendezvous, bind_address, listen, translate
from torch.distributed.run import parse_args

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")


def listening_on(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` ('0.0.0.0', '::' = every interface)."""
    out = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
            out.add(socket.inet_ntop(family, raw))
    return out


def test_a_standalone_launch_becomes_a_loopback_rendezvous():
    args = translate(parse_args(["--standalone", "--nproc-per-node=3", "--max-restarts=1", "-m", "runtime.train"]))
    assert (args.standalone, args.rdzv_backend, args.rdzv_endpoint, args.nnodes) == (False, BACKEND,
                                                                                     "127.0.0.1:0", "1")
    assert args.rdzv_conf == "rank=0" and args.max_restarts == 1 and args.training_script == "runtime.train"
    argv = local_command(3, ["--plan", "p.json"])
    assert argv[:5] == [sys.executable, "-m", "runtime.torchrun", "--standalone", "--nproc-per-node=3"]


def test_a_multi_node_launch_keeps_its_address_port_and_node_rank():
    argv = ["--nnodes=2", "--node-rank=1", "--nproc-per-node=4", "--master-addr=10.0.0.5", "--master-port=29999",
            "-m", "runtime.train"]
    args = translate(parse_args(argv))
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_conf) == (BACKEND, "10.0.0.5:29999", "rank=1")
    rm = RankMap(devices=("a/0", "b/0"), device_nodes=("a", "b"), nodes=("a", "b"))
    cmds = node_commands(rm, train_args("plan.json"), master_addr="10.0.0.5", master_port=29999)
    args = translate(parse_args(cmds[1].argv[3:]))
    assert (args.rdzv_endpoint, args.rdzv_conf) == ("10.0.0.5:29999", "rank=1")
    # Another backend chosen on purpose is left alone.
    args = translate(parse_args(["--rdzv-backend=c10d", "--rdzv-endpoint=h:1", "--nnodes=2", "-m", "x"]))
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("c10d", "h:1")


def test_the_store_listens_on_loopback_only():
    rdzv = BoundStoreRendezvous("127.0.0.1", 0, 0, 1, "test", 30)
    info = rdzv.next_rendezvous()
    port = info.bootstrap_store_info.master_port
    assert port > 0 and info.bootstrap_store_info.master_addr == "127.0.0.1"
    assert listening_on(port) == {"127.0.0.1"}
    info.store.set("k", "v")  # the ranks reach it as the launcher's store (use_agent_store)
    assert rdzv.use_agent_store and rdzv.next_rendezvous().store.get("k") == b"v"


def test_addresses_that_cannot_be_bound_say_so(capsys):
    assert bind_address("127.0.0.1", 2) == ("127.0.0.1", None)  # an IP literal is bound as given
    ip, note = bind_address("localhost", 2)  # a name that is loopback here may not be for the other nodes
    assert ip is None and "a loopback address, on this node; pass node 0's IP address" in note
    assert bind_address("localhost", 1)[0] in ("127.0.0.1", "::1")
    fd, port = listen("192.0.2.1", 0, 2)  # TEST-NET-1: not an address of this machine
    assert fd is None and port == 0
    assert capsys.readouterr().err == ("hetalloc: the rendezvous store listens on all interfaces: '192.0.2.1' "
                                       "(192.0.2.1) is not an address of this node\n")
