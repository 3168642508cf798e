"""Security properties: what the embedded Ray exposes, and that raydyn never unpickles anything it reads.

(Safe YAML loading is tested in tests/test_spec.py::test_yaml_is_loaded_safely; `raydyn query`
being read-only in tests/store/ and tests/test_sweep_e2e.py::test_query_cli.)
"""
from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, ray
import psutil  # shipped with ray
from raydyn.sweep import ensure_ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from ray._private.worker import global_worker

ensure_ray(num_cpus=1)
me = psutil.Process()
procs = [me] + me.children(recursive=True)
pids = {p.pid: p for p in procs}
listening = [(c.laddr.ip, c.laddr.port, pids[c.pid].name()) for c in psutil.net_connections("inet")
             if c.status == psutil.CONN_LISTEN and c.pid in pids]
cmdlines = [" ".join(p.cmdline()) for p in procs if any(a.endswith("ray/dashboard/dashboard.py") for a in p.cmdline())]
print(json.dumps({
    "gcs_address": ray.get_runtime_context().gcs_address,
    "webui_url": global_worker.node.webui_url,
    "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN,
    "dashboard_head": cmdlines,
    "listening": listening,
}))
ray.shutdown()
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embedded_ray_is_new_has_no_dashboard_and_needs_a_token():
    """The embedded Ray (no --address) starts its own instance without a dashboard, with token authentication.

    A "current cluster" file naming another (here: dead) cluster is ignored: `ray.init()` without
    address="local" would try to join it. Every port of every Ray process (GCS, raylet, agents,
    workers, the driver) listens on the loopback interface only.
    """
    with tempfile.TemporaryDirectory(prefix="rds", dir="/tmp") as tmp:
        bogus = f"127.0.0.1:{_closed_port()}"
        Path(tmp, "ray_current_cluster").write_text(bogus)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=180, env=env,
                           cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["gcs_address"] != bogus
    # no dashboard: Ray keeps only its minimal head process (no web UI), bound to localhost
    assert not info["webui_url"]
    assert all("--minimal" in c and "--host=127.0.0.1" in c for c in info["dashboard_head"]), info["dashboard_head"]
    assert all(port != 8265 for _, port, _ in info["listening"]), info["listening"]  # Ray's dashboard port
    assert info["token_auth"]
    assert info["gcs_address"].startswith("127.0.0.1:"), info["gcs_address"]
    names = {name for _, _, name in info["listening"]}
    assert {"gcs_server", "raylet"} <= names, info["listening"]  # the probe sees Ray's servers
    exposed = [(ip, port, name) for ip, port, name in info["listening"]
               if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == [], f"listening beyond loopback: {exposed}"


# ---------------------------------------------------------------------------- nothing is unpickled
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}


def _unsafe_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            name = node.func.attr
            if (owner, name) == ("torch", "load") or name in ("read_pickle", "to_pickle"):
                found.append(f"{owner}.{name}(...)")
            if (owner, name) in (("np", "load"), ("numpy", "load")):
                flag = [k for k in node.keywords if k.arg == "allow_pickle"]
                if not flag or not (isinstance(flag[0].value, ast.Constant) and flag[0].value.value is False):
                    found.append(f"{owner}.load without allow_pickle=False")
    return [f"{path.relative_to(ROOT)}:{u}" for u in found]


def test_nothing_in_store_or_train_is_unpickled():
    files = sorted((ROOT / "raydyn" / "store").rglob("*.py")) + sorted((ROOT / "raydyn" / "train").rglob("*.py"))
    assert len(files) >= 8
    problems = [u for f in files for u in _unsafe_uses(f)]
    assert problems == []


def test_the_scanner_finds_what_it_looks_for(tmp_path):
    bad = ROOT / "tests" / f"_unsafe_probe_{os.getpid()}.py"
    bad.write_text("import pickle\nimport numpy as np\nimport torch\nfrom cloudpickle import loads\n"
                   "torch.load('x')\nnp.load('y')\nnp.load('z', allow_pickle=True)\nnp.load('ok', allow_pickle=False)\n")
    try:
        found = _unsafe_uses(bad)
    finally:
        bad.unlink()
    assert [f.split(":", 1)[1] for f in found] == [
        "import pickle", "from cloudpickle import ...", "torch.load(...)", "np.load without allow_pickle=False",
        "np.load without allow_pickle=False"]
