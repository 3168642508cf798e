"""Checks of the deployment files in deploy/: fast, no network, no docker, no cluster.

What a wrong manifest costs is an hour of cluster time before the first error, so every
fact they state that can be checked here is checked here:

- every YAML file parses, and ``deploy/cluster.yaml`` passes Ray's own cluster-config
  validation (the installed Ray's ``ray-schema.json``, as ``ray up`` does);
- the Ray version (KubeRay ``rayVersion``, ``rayproject/ray`` tags, the Dockerfile's FROM,
  pip pins, the raydyn image tags) and the torch pin equal those of ``pyproject.toml``;
- every ``raydyn`` command line in an entrypoint, setup command, Dockerfile RUN or README
  code block is a real command of the CLI: it is parsed by click with the real option
  declarations (unknown subcommands and options fail), its sweep files exist and load, and
  the sweeps and axes it names exist;
- the store of every configuration is shared by all nodes: an object-store URI, or a path
  on a ReadWriteMany volume mounted at the same place in every pod;
- token authentication is on for every ``ray start`` and in every Ray container, and the
  dashboard is never exposed (127.0.0.1 on the launcher's head; ClusterIP only on KubeRay).
"""
from __future__ import annotations

import copy
import importlib
import re
import shlex
import textwrap
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest
import typer.main
import yaml

import raydyn.cli
from raydyn.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CLUSTER_YAML = DEPLOY / "cluster.yaml"
RAYCLUSTER_YAML = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = DEPLOY / "kuberay" / "rayjob.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
README = DEPLOY / "README.md"

OBJECT_STORE_SCHEMES = ("s3://", "gs://")


# ----------------------------------------------------------------------------- pins
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(package: str) -> str:
    """The ``==`` version pinned for ``package`` in pyproject's dependencies."""
    for req in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*(;.*)?", req)
        if m and m.group(1).lower() == package:
            return m.group(3)
    raise AssertionError(f"pyproject.toml pins no exact version of {package}")


RAY_VERSION = _pin("ray")
TORCH_VERSION = _pin("torch")
RAYDYN_VERSION = _pyproject()["project"]["version"]


# ----------------------------------------------------------------------------- loading
def _yaml_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in _docs(p)]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) of the RayCluster and of the RayJob's cluster."""
    out = []
    for path, doc in _kuberay_docs():
        if doc.get("kind") == "RayCluster":
            out.append((f"{path.name} RayCluster", doc["spec"]))
        elif doc.get("kind") == "RayJob":
            out.append((f"{path.name} RayJob.rayClusterSpec", doc["spec"]["rayClusterSpec"]))
    return out


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod spec) of the head and of every worker group."""
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def _env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", "", "\n".join(lines))
    out = []
    for ln in text.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_from() -> str:
    """The FROM image with the global ARG defaults substituted."""
    args: dict[str, str] = {}
    for ins, rest in _dockerfile_instructions():
        if ins == "FROM":
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], rest.split()[0])
        if ins == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    raise AssertionError("deploy/Dockerfile has no FROM")


def _dockerfile_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for ins, rest in _dockerfile_instructions() if ins == "ARG" and "=" in rest)


def _dockerfile_workdir() -> str:
    workdirs = [rest for ins, rest in _dockerfile_instructions() if ins == "WORKDIR"]
    assert workdirs, "deploy/Dockerfile sets no WORKDIR"
    return workdirs[-1].rstrip("/")


def _readme_blocks(lang: tuple[str, ...] = ("bash", "sh", "shell", "console")) -> list[str]:
    blocks = re.findall(r"^[ \t]*```(\w*)[ \t]*\n(.*?)^[ \t]*```", README.read_text(), re.M | re.S)
    return [textwrap.dedent(body) for language, body in blocks if language in lang]


# ----------------------------------------------------------------------------- shell parsing
_SEPARATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}


def _segments(line: str) -> list[list[str]]:
    """Shell words of ``line`` split into simple commands at ``&&``, ``;``, ``|`` ...;
    redirections and what follows them are dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    segs: list[list[str]] = [[]]
    for tok in lex:
        if tok in _SEPARATORS:
            segs.append([])
        else:
            segs[-1].append(tok)
    out = []
    for seg in segs:
        for i, tok in enumerate(seg):
            if re.match(r"^[<>]|^&>", tok):
                seg = seg[: i - 1] if i and seg[i - 1].isdigit() else seg[:i]
                break
        if seg:
            out.append(seg)
    return out


def _strip_env(seg: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while seg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", seg[0]):
        k, v = seg[0].split("=", 1)
        env[k] = v
        seg = seg[1:]
    return env, seg


def raydyn_commands(text: str, cwd: str | None = None) -> list[tuple[list[str], str | None]]:
    """Every ``raydyn`` invocation in shell ``text``: (argv after ``raydyn``, cwd).

    Looks into ``ray job submit ... -- raydyn ...``, ``bash -c '...'``, ``ray exec C '...'`` and
    any other quoted word that holds a command; ``cd DIR`` sets the cwd of what follows.
    """
    text = re.sub(r"\\\n", " ", text)
    found: list[tuple[list[str], str | None]] = []
    for line in text.splitlines():
        line = re.sub(r"^\s*\$ ", "", line)
        for seg in _segments(line):
            _, seg = _strip_env(seg)
            if not seg:
                continue
            if seg[0] == "cd" and len(seg) == 2:
                cwd = seg[1]
                continue
            starts = [i for i, t in enumerate(seg) if PurePosixPath(t).name == "raydyn"
                      and (i == 0 or seg[i - 1] == "--")]
            if starts:
                found.append((seg[starts[0] + 1:], cwd))
                continue
            for tok in seg:
                if re.search(r"(^|[\s;&|(])(\S*/)?raydyn\s", tok):
                    found.extend(raydyn_commands(tok, cwd))
    return found


# ----------------------------------------------------------------------------- the CLI
def _click_package(cmd: Any) -> Any:
    """The click the typer app is built on: ``click`` itself, or the copy newer typers vendor."""
    base = next(c for c in type(cmd).__mro__ if c.__name__ == "Command" and c.__module__.endswith(".core")
                and c.__module__ != "typer.core")
    return importlib.import_module(base.__module__.rsplit(".", 1)[0] + ".exceptions")


CLICK_EXCEPTIONS = _click_package(typer.main.get_command(raydyn.cli.app))
UsageError = CLICK_EXCEPTIONS.UsageError


def parse_cli(argv: list[str]) -> tuple[list[str], dict[str, Any]] | None:
    """Resolve ``raydyn ARGV`` against the real typer app with click's own parser.

    ``make_context(..., resilient_parsing=False)`` on each command of the chain, as the CLI
    itself does, but without running anything. Returns (subcommand path, parameters of the
    leaf command), or None for ``--help``. Raises UsageError (NoSuchCommand, NoSuchOption,
    BadParameter, MissingParameter, NoArgsIsHelpError ...).
    """
    cmd = typer.main.get_command(raydyn.cli.app)
    name, args, parent, path = "raydyn", list(argv), None, []
    try:
        while True:
            ctx = cmd.make_context(name, args, parent=parent, resilient_parsing=False)
            if not hasattr(cmd, "resolve_command"):  # a leaf command, not a group
                return path, ctx.params
            rest = [*(ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args), *ctx.args]
            if not rest:
                raise UsageError(f"`raydyn {' '.join(path)}` needs a subcommand", ctx)
            sub_name, sub, rest = cmd.resolve_command(ctx, rest)
            path.append(sub_name)
            cmd, name, args, parent = sub, sub_name, rest, ctx
    except Exception as e:
        if type(e).__name__ == "Exit" and getattr(e, "exit_code", 1) == 0:  # --help
            return None
        raise


def _sweeps_by_name() -> dict[str, Any]:
    return {load_sweep(p)[0].name: load_sweep(p)[0] for p in sorted((ROOT / "sweeps").glob("*.y*ml"))}


def _repo_path(path: str, cwd: str | None) -> Path:
    """A path as seen on a node or in the image, mapped back into this repository."""
    workdir = _dockerfile_workdir()
    p = PurePosixPath(path)
    if not p.is_absolute():
        assert cwd in (None, ".", workdir), f"{path!r} is relative to {cwd!r}, which is not the repo or the image's WORKDIR"
        return ROOT / p
    assert str(p).startswith(workdir + "/"), f"{path!r} is neither relative nor inside the image's {workdir}"
    return ROOT / p.relative_to(workdir)


def _all_command_sources() -> dict[str, list[tuple[list[str], str | None]]]:
    """Every place that holds raydyn command lines, with what it holds."""
    sources: dict[str, list[tuple[list[str], str | None]]] = {}
    for path, doc in _kuberay_docs():
        if doc.get("kind") == "RayJob":
            sources[f"{path.name} entrypoint"] = raydyn_commands(doc["spec"]["entrypoint"])
    cluster = _docs(CLUSTER_YAML)[0]
    commands = []
    for key, value in cluster.items():
        if key.endswith("_commands"):
            commands += value
    for nt in cluster["available_node_types"].values():
        for key, value in nt.items():
            if key.endswith("_commands"):
                commands += value
    sources["cluster.yaml commands"] = [c for cmd in commands for c in raydyn_commands(cmd)]
    sources["Dockerfile RUN"] = [c for ins, rest in _dockerfile_instructions() if ins == "RUN"
                                 for c in raydyn_commands(rest)]
    sources["README.md code blocks"] = [c for block in _readme_blocks() for c in raydyn_commands(block)]
    return sources


# ============================================================================= tests
def test_every_yaml_file_parses():
    files = _yaml_files()
    assert {CLUSTER_YAML, RAYCLUSTER_YAML, RAYJOB_YAML} <= set(files)
    for path in files:
        docs = _docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
    for path, doc in _kuberay_docs():
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), f"{path.name}: {sorted(doc)}"


def test_cluster_yaml_passes_rays_own_validation():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _docs(CLUSTER_YAML)[0]
    validate_config(prepare_config(copy.deepcopy(config)))
    # The same validation rejects a misspelt key, so passing it means something.
    bad = copy.deepcopy(config)
    bad["available_node_types"]["ray.worker.gpu"]["min_worker"] = 0
    with pytest.raises(ValidationError):
        validate_config(prepare_config(bad))


def test_cluster_yaml_node_types():
    c = _docs(CLUSTER_YAML)[0]
    types = c["available_node_types"]
    assert c["provider"]["type"] == "aws"
    assert c["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != c["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if "gpu" in k}
    cpu = {k: v for k, v in workers.items() if k not in gpu}
    assert cpu and gpu, sorted(workers)
    for name, nt in gpu.items():
        assert nt["min_workers"] == 0, f"{name}: the GPU type is optional (min_workers 0)"
        assert nt["docker"]["worker_image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    for name, nt in workers.items():
        assert 0 <= nt["min_workers"] <= nt["max_workers"] <= c["max_workers"], name
    assert c["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-cpu"


def _effective_setup(c: dict, node_type: str) -> list[str]:
    """The setup commands Ray runs on a node type (a node type's own list replaces the global ones)."""
    nt = c["available_node_types"][node_type]
    if node_type == c["head_node_type"]:
        return c.get("setup_commands", []) + c.get("head_setup_commands", [])
    if "worker_setup_commands" in nt:
        return nt["worker_setup_commands"]
    return c.get("setup_commands", []) + c.get("worker_setup_commands", [])


def test_cluster_yaml_installs_pinned_torch_and_this_raydyn_on_every_node_type():
    c = _docs(CLUSTER_YAML)[0]
    wheel = f"raydyn-{RAYDYN_VERSION}-py3-none-any.whl"
    mounts = c["file_mounts"]
    for node_type in c["available_node_types"]:
        segs = [seg for cmd in _effective_setup(c, node_type) for seg in _segments(cmd)]
        torch = [s for s in segs if s[:2] == ["pip", "install"] and any(t.startswith("torch") for t in s)]
        assert len(torch) == 1, f"{node_type}: installs torch {len(torch)} times"
        assert f"torch=={TORCH_VERSION}" in torch[0], f"{node_type}: {torch[0]}"
        cpu_index = "https://download.pytorch.org/whl/cpu" in torch[0]
        assert cpu_index == ("gpu" not in node_type), f"{node_type}: CPU nodes need the CPU wheel, GPU nodes CUDA: {torch[0]}"
        raydyn = [t for s in segs if s[:2] == ["pip", "install"] for t in s if t.endswith(wheel)]
        assert len(raydyn) == 1, f"{node_type} must pip install {wheel} (pyproject version {RAYDYN_VERSION})"
        assert str(PurePosixPath(raydyn[0]).parent) in mounts, f"{raydyn[0]} is not in a file_mounts directory"


def test_ray_version_is_pyprojects_everywhere():
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [*_yaml_files(), README, DOCKERFILE]}
    tags = [(f, t) for f, s in texts.items() for t in re.findall(r"rayproject/ray:([\w.${}-]+)", s)]
    tags = [(f, _dockerfile_from().split(":", 1)[1] if "$" in t else t) for f, t in tags]
    assert len(tags) >= 4
    for f, tag in tags:
        assert re.fullmatch(rf"{re.escape(RAY_VERSION)}-py311-(cpu|gpu)", tag), f"{f}: rayproject/ray:{tag}"
    pins = [(f, v) for f, s in texts.items() for v in re.findall(r"\bray(?:\[[\w,]+\])?==(\d[\w.]*)", s)]
    assert pins, "no pip pin of ray found (the README's launcher install should have one)"
    for f, v in pins:
        assert v == RAY_VERSION, f"{f}: ray=={v}"
    specs = _ray_cluster_specs()
    assert len(specs) == 2
    for label, spec in specs:
        assert spec["rayVersion"] == RAY_VERSION, label
    images = [(f, t) for f, s in texts.items() for t in re.findall(r"/raydyn:([\w.-]+)", s)]
    assert images
    for f, tag in images:
        assert re.fullmatch(rf"{re.escape(RAYDYN_VERSION)}-ray{re.escape(RAY_VERSION)}-(cpu|gpu)", tag), f"{f}: raydyn:{tag}"
    assert _dockerfile_from() == f"rayproject/ray:{RAY_VERSION}-py311-cpu"
    assert _dockerfile_args()["RAY_VERSION"] == RAY_VERSION


def test_torch_pin_is_pyprojects_everywhere():
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [*_yaml_files(), README, DOCKERFILE]}
    pins = [(f, v) for f, s in texts.items() for v in re.findall(r"\btorch==(\d[\w.]*)", s)]
    assert len(pins) >= 3
    for f, v in pins:
        assert v == TORCH_VERSION, f"{f}: torch=={v}"
    args = _dockerfile_args()
    assert args["TORCH_VERSION"] == TORCH_VERSION
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_dockerfile_builds_this_repo_as_the_non_root_user():
    ins = _dockerfile_instructions()
    users = [rest for i, rest in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    copies = " ".join(rest for i, rest in ins if i == "COPY")
    for needed in ("pyproject.toml", "raydyn", "sweeps"):
        assert re.search(rf"(^|\s){needed}(\s|$)", copies), f"Dockerfile does not COPY {needed}"
    runs = [rest for i, rest in ins if i == "RUN"]
    assert any(seg[:2] == ["pip", "install"] and "." in seg for r in runs for seg in _segments(r))
    # torch from TORCH_INDEX_URL (CPU wheels by default, checked above), pinned by TORCH_VERSION
    assert any(seg[:2] == ["pip", "install"] and "torch==${TORCH_VERSION}" in seg
               and seg[seg.index("--index-url") + 1] == "${TORCH_INDEX_URL}"
               for r in runs for seg in _segments(r) if "--index-url" in seg)
    assert ("ENV", "RAY_AUTH_MODE=token") in ins


def test_command_extraction_finds_nested_commands():
    text = ("ray job submit --address http://h:8265 -- raydyn sweep run a.yaml --store s3://b/p && echo ok\n"
            "bash -c 'cd /x && raydyn query \"SELECT 1\" > out.txt'; RAYDYN_STORE=s3://b raydyn sweep status q")
    assert raydyn_commands(text) == [(["sweep", "run", "a.yaml", "--store", "s3://b/p"], None),
                                     (["query", "SELECT 1"], "/x"), (["sweep", "status", "q"], None)]


def test_cli_resolution_rejects_what_the_cli_rejects():
    assert parse_cli(["sweep", "run", "a.yaml", "--store", "s3://b/p"])[0] == ["sweep", "run"]
    assert parse_cli(["--help"]) is None
    for bad in (["sweeps", "run", "a.yaml"], ["sweep", "run", "a.yaml", "--stroe", "x"], ["sweep", "run"],
                ["sweep", "run", "a.yaml", "--num-cpus", "many"], ["sweep"], ["phase-map", "q", "--metrc", "m"]):
        with pytest.raises(UsageError):
            parse_cli(bad)


def test_every_raydyn_command_line_is_a_real_command():
    sources = _all_command_sources()
    assert len(sources["README.md code blocks"]) >= 6
    assert len(next(v for k, v in sources.items() if "entrypoint" in k)) == 2
    assert sources["Dockerfile RUN"]
    sweeps = _sweeps_by_name()
    checked = 0
    for where, commands in sources.items():
        for argv, cwd in commands:
            line = f"{where}: raydyn {shlex.join(argv)}"
            try:
                parsed = parse_cli(argv)
            except UsageError as e:
                raise AssertionError(f"{line}\n  is not a raydyn command: {e.format_message()}") from None
            checked += 1
            if parsed is None:
                continue
            path, params = parsed
            if path == ["sweep", "run"]:
                file = _repo_path(str(params["file"]), cwd)
                assert file.is_file(), f"{line}\n  sweep file {file} does not exist"
                load_sweep(file)
            elif path in (["phase-map"], ["sweep", "status"]):
                sweep = params["sweep"]
                if sweep.endswith((".yaml", ".yml")):
                    spec = load_sweep(_repo_path(sweep, cwd))[0]
                else:
                    assert sweep in sweeps, f"{line}\n  no sweep file in sweeps/ is named {sweep!r}"
                    spec = sweeps[sweep]
                if path == ["phase-map"]:
                    for axis in (params["x"], params["y"]):
                        assert axis in spec.axes(), f"{line}\n  {axis!r} is not a swept axis of {spec.name}: {spec.axes()}"
    assert checked >= 9


def _shared_volume(spec: dict) -> tuple[str, str]:
    """(claimName, mountPath) of a volume mounted at the same path in every Ray pod; fails otherwise."""
    mounts_per_pod = []
    for group, pod in _pod_templates(spec):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        mounts = {(claims[m["name"]], m["mountPath"]) for c in pod["containers"] for m in c.get("volumeMounts", [])
                  if m["name"] in claims}
        mounts_per_pod.append(mounts)
    common = set.intersection(*mounts_per_pod)
    assert len(common) == 1, f"no single PVC mounted at one path in every pod: {mounts_per_pod}"
    return common.pop()


def _pvc_access_modes(claim: str) -> list[str]:
    pvcs = [d for _, d in _kuberay_docs() if d.get("kind") == "PersistentVolumeClaim" and d["metadata"]["name"] == claim]
    assert len(pvcs) == 1, f"deploy/kuberay/ defines {len(pvcs)} PersistentVolumeClaim named {claim!r}"
    return pvcs[0]["spec"]["accessModes"]


def _assert_shared_store(store: str, where: str, spec: dict | None) -> None:
    if store.startswith(OBJECT_STORE_SCHEMES):
        assert re.fullmatch(r"(s3|gs)://[a-z0-9][a-z0-9.-]+[a-z0-9](/[\w./-]*)?", store), f"{where}: {store!r}"
        return
    assert spec is not None, f"{where}: store {store!r} is a path, but these nodes share no volume; use s3:// or gs://"
    claim, mount = _shared_volume(spec)
    assert PurePosixPath(store).is_relative_to(mount), f"{where}: store {store!r} is not on the shared volume {mount}"
    assert _pvc_access_modes(claim) == ["ReadWriteMany"], f"{where}: PVC {claim} must be ReadWriteMany"


def test_kuberay_stores_are_on_the_shared_volume():
    for label, spec in _ray_cluster_specs():
        stores = {_env(c).get("RAYDYN_STORE") for _, pod in _pod_templates(spec) for c in pod["containers"]}
        assert len(stores) == 1 and None not in stores, f"{label}: RAYDYN_STORE differs between pods: {stores}"
        _assert_shared_store(stores.pop(), label, spec)
    rayjob = next(d for _, d in _kuberay_docs() if d.get("kind") == "RayJob")
    env_store = _env(rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0])["RAYDYN_STORE"]
    for argv, _ in raydyn_commands(rayjob["spec"]["entrypoint"]):
        store = parse_cli(argv)[1].get("store") or env_store
        _assert_shared_store(store, f"rayjob entrypoint `raydyn {shlex.join(argv)}`", rayjob["spec"]["rayClusterSpec"])


def _exports(commands: list[str]) -> dict[str, list[str]]:
    """Variables that ``echo 'export VAR=value' >> ~/.bashrc`` lines in ``commands`` set, with their values."""
    out: dict[str, list[str]] = {}
    for cmd in commands:
        for seg in _segments(cmd):
            if seg[0] == "echo":
                for word in seg[1:]:
                    m = re.fullmatch(r"export ([A-Za-z_]\w*)=(\S+)", word)
                    if m:
                        out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_cluster_launcher_store_is_an_object_store_on_every_node():
    c = _docs(CLUSTER_YAML)[0]
    stores = {}
    for node_type in c["available_node_types"]:
        found = _exports(_effective_setup(c, node_type)).get("RAYDYN_STORE", [])
        assert len(found) == 1, f"{node_type}: RAYDYN_STORE set {len(found)} times"
        stores[node_type] = found[0]
    assert len(set(stores.values())) == 1, f"node types disagree on the store: {stores}"
    _assert_shared_store(next(iter(stores.values())), "cluster.yaml", None)


def test_readme_stores_are_shared():
    kuberay_mounts = {_shared_volume(spec)[1] for _, spec in _ray_cluster_specs()}
    stores = [parse_cli(argv)[1].get("store") for block in _readme_blocks() for argv, _ in raydyn_commands(block)
              if parse_cli(argv)]
    stores = [s for s in stores if s]
    assert stores
    for s in stores:
        assert s.startswith(OBJECT_STORE_SCHEMES) or any(PurePosixPath(s).is_relative_to(m) for m in kuberay_mounts), s


def _ray_start_segments(command: str) -> Iterator[tuple[dict[str, str], list[str]]]:
    for seg in _segments(command):
        env, words = _strip_env(seg)
        if words[:2] == ["ray", "start"]:
            yield env, words


def _flag(words: list[str], name: str) -> str | None:
    for i, w in enumerate(words):
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
        if w == name and i + 1 < len(words):
            return words[i + 1]
    return None


def test_cluster_launcher_token_auth_and_dashboard_on_localhost():
    c = _docs(CLUSTER_YAML)[0]
    starts = {key: [s for cmd in c[key] for s in _ray_start_segments(cmd)]
              for key in ("head_start_ray_commands", "worker_start_ray_commands")}
    assert all(starts.values()), starts
    for key, segs in starts.items():
        for env, words in segs:
            assert env.get("RAY_AUTH_MODE") == "token", f"{key}: {' '.join(words)} runs without RAY_AUTH_MODE=token"
            host = _flag(words, "--dashboard-host")
            assert host in (None, "127.0.0.1", "localhost"), f"{key}: dashboard exposed on {host}"
    for env, words in starts["head_start_ray_commands"]:
        assert "--head" in words and _flag(words, "--dashboard-host") == "127.0.0.1"
    # Every `ray start` anywhere else in the file (there should be none) obeys the same rule.
    everything = [cmd for k, v in c.items() if k.endswith("_commands") for cmd in v]
    assert sum(1 for cmd in everything for _ in _ray_start_segments(cmd)) == sum(map(len, starts.values()))
    # The token reaches every node, and interactive sessions there (ray attach/exec, jobs) use it.
    assert any(PurePosixPath(remote).as_posix().endswith("/.ray/auth_token") for remote in c["file_mounts"])
    for node_type in c["available_node_types"]:
        assert _exports(_effective_setup(c, node_type)).get("RAY_AUTH_MODE") == ["token"], node_type


def test_kuberay_token_auth_in_every_ray_container():
    for label, spec in _ray_cluster_specs():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{label}: authOptions.mode must be token"
        for group, pod in _pod_templates(spec):
            for c in pod["containers"]:
                assert _env(c).get("RAY_AUTH_MODE") == "token", f"{label} {group}/{c['name']}: RAY_AUTH_MODE"
                assert "RAY_AUTH_TOKEN" not in _env(c) or isinstance(_env(c)["RAY_AUTH_TOKEN"], dict), \
                    f"{label} {group}: a literal token in a manifest"


def test_kuberay_dashboard_not_exposed():
    for label, spec in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{label}: head service {head.get('serviceType')}"
        assert not head.get("enableIngress"), label
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", label
        assert "dashboard-host" not in head.get("rayStartParams", {}), label
    for path, doc in _kuberay_docs():
        assert doc["kind"] not in ("Ingress", "Route", "Gateway"), path.name
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name


# Field names of KubeRay's ray.io/v1 CRDs (v1.7.0); a misspelt key is silently pruned by the
# API server, so it is caught here instead.
RAYCLUSTER_SPEC_KEYS = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                        "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                        "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
                        "workerGroupSpecs"}
RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                    "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
                    "shutdownAfterJobFinishes", "suspend"}
HEAD_GROUP_KEYS = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                   "rayStartParams", "serviceType"}
WORKER_GROUP_KEYS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}


def test_kuberay_manifests_structure():
    kinds = [(p.name, d["kind"]) for p, d in _kuberay_docs()]
    assert ("raycluster.yaml", "RayCluster") in kinds and ("rayjob.yaml", "RayJob") in kinds
    images = set()
    for path, doc in _kuberay_docs():
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", path.name
        if doc["kind"] == "RayJob":
            assert set(doc["spec"]) <= RAYJOB_SPEC_KEYS, set(doc["spec"]) - RAYJOB_SPEC_KEYS
            assert doc["spec"]["shutdownAfterJobFinishes"] is True
            assert doc["spec"]["ttlSecondsAfterFinished"] > 0
            # KubeRay pastes the entrypoint into a shell line: a top-level `&&` would run the rest
            # of it in the submitter pod, not on the cluster.
            assert len(_segments(doc["spec"]["entrypoint"])) == 1, "wrap a multi-command entrypoint in bash -c"
    for label, spec in _ray_cluster_specs():
        assert set(spec) <= RAYCLUSTER_SPEC_KEYS, (label, set(spec) - RAYCLUSTER_SPEC_KEYS)
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP_KEYS, label
        groups = spec["workerGroupSpecs"]
        for g in groups:
            assert set(g) <= WORKER_GROUP_KEYS, (label, set(g) - WORKER_GROUP_KEYS)
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], (label, g["groupName"])
        for group, pod in _pod_templates(spec):
            for c in pod["containers"]:
                limits = c.get("resources", {}).get("limits", {})
                gpus = int(limits.get("nvidia.com/gpu", 0))
                assert c["image"].endswith("-gpu" if gpus else "-cpu"), (label, group, c["image"])
                images.add(c["image"])
        gpu_groups = [g for g in groups if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                                               for c in g["template"]["spec"]["containers"])]
        cpu_groups = [g for g in groups if g not in gpu_groups]
        assert cpu_groups and cpu_groups[0]["minReplicas"] >= 1, f"{label}: trials need CPU workers (head has num-cpus 0)"
        assert gpu_groups and all(g.get("replicas", 0) == 0 and g["minReplicas"] == 0 for g in gpu_groups), label
    # The manifests run exactly the images the README tells you to build.
    built = {w for block in _readme_blocks() for line in block.splitlines() if line.startswith("docker build")
             for seg in _segments(line) for w in [_flag(seg, "-t")] if w}
    assert images == built, (images, built)
