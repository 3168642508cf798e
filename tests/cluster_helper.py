"""A real multi-node Ray cluster on this machine, run in its own process for tests/test_cluster.py.

    python tests/cluster_helper.py --workers 2 [--max-lifetime 900]

Starts a head node with no CPUs (so trials must run on workers) and ``--workers``
worker nodes with 1 CPU and the custom resource ``worker`` each, every node its own
raylet with its own ports (``ray.cluster_utils.Cluster``). Prints one JSON line
``{"address": ..., "head": node_id, "workers": [node_id, ...]}`` and then serves
commands, one per line on stdin, answering each with one JSON line:

    kill <node_id>   remove a worker node abruptly (its raylet and workers are killed)
    add              add a worker node; answers {"node": node_id}
    nodes            answers {"workers": [...]}
    quit             shut the cluster down and exit

The cluster is also shut down on EOF (the test process died), on SIGTERM, and after
``--max-lifetime`` seconds, and every process this helper started is killed before it
exits. Set RAY_TMPDIR to a private directory so that this cluster's address file does
not become the machine's "current cluster".
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-lifetime", type=float, default=900.0)
    args = ap.parse_args()

    import ray
    import psutil  # ray ships it (ray/thirdparty_files), importable once ray is imported
    from ray.cluster_utils import Cluster

    me = psutil.Process()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = {}

    def add() -> str:
        node = cluster.add_node(num_cpus=1, resources={"worker": 1}, include_dashboard=False)
        workers[node.node_id] = node
        return node.node_id

    for _ in range(args.workers):
        add()
    cluster.wait_for_nodes(timeout=120)

    done = threading.Event()
    lock = threading.Lock()

    def shutdown(*_: object) -> None:
        with lock:
            if done.is_set():
                return
            done.set()
            children = me.children(recursive=True)
            try:
                cluster.shutdown()
            except Exception as e:  # still kill what is left below
                print(json.dumps({"shutdown_error": repr(e)}), file=sys.stderr, flush=True)
            for p in children:  # only processes this helper started
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(children, timeout=10)
        os._exit(0)

    signal.signal(signal.SIGTERM, shutdown)
    timer = threading.Timer(args.max_lifetime, shutdown)
    timer.daemon = True
    timer.start()

    print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id, "workers": list(workers)}),
          flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "kill":
                node = workers.pop(arg)
                cluster.remove_node(node, allow_graceful=False)
                reply = {"killed": arg}
            elif cmd == "add":
                reply = {"node": add()}
            elif cmd == "nodes":
                reply = {"workers": list(workers)}
            elif cmd == "quit":
                break
            else:
                reply = {"error": f"unknown command {cmd!r}"}
        except Exception as e:
            reply = {"error": repr(e)}
        print(json.dumps(reply), flush=True)
        time.sleep(0)
    shutdown()


if __name__ == "__main__":
    main()
