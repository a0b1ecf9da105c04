"""The Ray cluster definitions (infra/ray/*.yaml) and the node image (infra/docker/Dockerfile),
checked offline: no cloud calls, no Docker.

Every YAML passes Ray's own cluster-config preparation and JSON-schema validation (what
`ray up` runs before it calls GCP), then our rules: the head carries no accelerator,
each worker type advertises exactly the GPUs or TPU chips its machine type has, spot or
preemptible variants exist, setup installs this package with the same pins as the
Dockerfile, the dashboard is not exposed, no credentials are written down, and the
Dockerfile's pins fall within pyproject.toml's ranges. Each rule is a function returning
the problems it finds; the tests at the bottom break a copy of a real file in the way
each rule guards against and check the rule reports it.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RAY_DIR = ROOT / "infra" / "ray"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
YAMLS = sorted(RAY_DIR.glob("*.yaml"))

# GCE machine types the configs may use: (attached GPUs, vCPUs). A3 and G2 carry their GPUs
# in the machine type (no guestAccelerators). Sources: cloud.google.com/compute/docs/gpus.
GCE_MACHINES: dict[str, tuple[int, int]] = {
    **{f"n2-standard-{n}": (0, n) for n in (2, 4, 8, 16, 32, 48, 64)},
    **{f"e2-standard-{n}": (0, n) for n in (2, 4, 8, 16, 32)},
    "a3-highgpu-1g": (1, 26), "a3-highgpu-2g": (2, 52), "a3-highgpu-4g": (4, 104),
    "a3-highgpu-8g": (8, 208), "a3-megagpu-8g": (8, 208),
    "a2-highgpu-1g": (1, 12), "a2-highgpu-2g": (2, 24), "a2-highgpu-4g": (4, 48),
    "a2-highgpu-8g": (8, 96), "a2-ultragpu-8g": (8, 96),
    "g2-standard-4": (1, 4), "g2-standard-8": (1, 8), "g2-standard-12": (1, 12),
    "g2-standard-16": (1, 16), "g2-standard-24": (2, 24), "g2-standard-32": (1, 32),
    "g2-standard-48": (4, 48), "g2-standard-96": (8, 96),
}
# vCPUs of one TPU VM host (cloud.google.com/tpu/docs/v5e, /v4).
TPU_HOST_CPUS = {"v5litepod-1": 24, "v5litepod-4": 112, "v5litepod-8": 224, "v4-8": 240}

PINNED = ("torch", "jax", "ray")  # the pins the Dockerfile and the setup commands share
ACCELERATOR_KEYS = ("acceleratorType", "acceleratorConfig", "guestAccelerators")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def is_tpu(node_config: dict) -> bool:
    return "machineType" not in node_config and (
        "acceleratorType" in node_config or "acceleratorConfig" in node_config
    )


def is_spot(node_config: dict) -> bool:
    if is_tpu(node_config):
        sched = node_config.get("schedulingConfig", {})
        return bool(sched.get("spot") or sched.get("preemptible"))
    sched = node_config.get("scheduling", {})
    return sched.get("provisioningModel") == "SPOT" or bool(sched.get("preemptible"))


def workers(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


# --- the rules ------------------------------------------------------------------------------


def ray_problems(config: dict) -> list[str]:
    """Ray's own checks: prepare_config (defaults, setup merging, docker, min/max workers)
    and validate_config (ray-schema.json plus its head-type and worker-count rules)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # jsonschema.ValidationError, ValueError, KeyError ...
        return [f"ray: {type(err).__name__}: {str(err).splitlines()[0]}"]
    return []


def head_problems(config: dict) -> list[str]:
    head = config["available_node_types"][config["head_node_type"]]
    node = head["node_config"]
    problems = []
    for key, amount in head.get("resources", {}).items():
        if (key in ("GPU", "TPU") or key.startswith("TPU-") or key.startswith("accelerator_type")) and amount:
            problems.append(f"head advertises {key}: {amount}")
    problems += [f"head node_config has {key}" for key in ACCELERATOR_KEYS if key in node]
    machine = node.get("machineType")
    if machine not in GCE_MACHINES:
        problems.append(f"head machine type {machine!r} is not a known GCE machine type")
    elif GCE_MACHINES[machine][0]:
        problems.append(f"head machine type {machine} has GPUs")
    if is_spot(node):
        problems.append("head is spot/preemptible (it holds the Ray job state)")
    return problems


def worker_problems(name: str, node_type: dict) -> list[str]:
    """The resources a worker type advertises are its machine type's accelerators."""
    from ray._private.accelerators import tpu
    from ray._private.accelerators.tpu import TPUAcceleratorManager

    node = node_type["node_config"]
    res = node_type.get("resources", {})
    problems = []
    if is_tpu(node):
        kind = node.get("acceleratorType")
        if kind is None or not TPUAcceleratorManager.is_valid_tpu_accelerator_type(kind):
            return [f"{name}: TPU acceleratorType {kind!r} is not valid for Ray"]
        chips = tpu.get_num_tpu_visible_chips_per_host(kind)
        if tpu.get_total_chips_from_accelerator_type(kind) != chips:
            problems.append(f"{name}: {kind} is a multi-host slice (the autoscaler treats hosts singly)")
        if res.get("TPU") != chips:
            problems.append(f"{name}: advertises TPU {res.get('TPU')} but a {kind} host has {chips} chips")
        if res.get("GPU"):
            problems.append(f"{name}: a TPU VM advertises GPU {res['GPU']}")
        if not node.get("runtimeVersion"):
            problems.append(f"{name}: TPU VM without runtimeVersion")
        cpus = TPU_HOST_CPUS.get(kind)
    else:
        machine = node.get("machineType")
        if machine not in GCE_MACHINES:
            return [f"{name}: machine type {machine!r} is not in the table of known machine types"]
        gpus, cpus = GCE_MACHINES[machine]
        if res.get("GPU", 0) != gpus:
            problems.append(f"{name}: advertises GPU {res.get('GPU', 0)} but {machine} has {gpus}")
        if any(key == "TPU" or key.startswith("TPU-") for key in res):
            problems.append(f"{name}: a GCE VM advertises TPU")
        if gpus and node.get("scheduling", {}).get("onHostMaintenance") != "TERMINATE":
            problems.append(f"{name}: GPU VMs need scheduling.onHostMaintenance: TERMINATE")
    if cpus is not None and not 0 < res.get("CPU", 0) <= cpus:
        problems.append(f"{name}: advertises CPU {res.get('CPU')} (host has {cpus} vCPUs)")
    return problems


def spot_problems(path_name: str, config: dict) -> list[str]:
    """A *-spot.yaml has only spot/preemptible workers, the others only on-demand ones."""
    want = "spot" in path_name
    return [
        f"{path_name}: worker {name} is {'on-demand' if want else 'spot'}"
        for name, node_type in workers(config).items()
        if is_spot(node_type["node_config"]) != want
    ]


def pins(text: str) -> dict[str, str]:
    """`name==version` / `name[extra]==version` pins of PINNED packages in a text."""
    found: dict[str, str] = {}
    for name, version in re.findall(r"\b(torch|jax|ray)(?:\[[\w,]+\])?==([\w.]+)", text):
        found.setdefault(name, version)
        if found[name] != version:
            found[name] = "conflict"
    return found


def setup_problems(config: dict, docker_pins: dict[str, str]) -> list[str]:
    """Setup installs this package on every node with the Dockerfile's pins; Ray starts from
    that environment; TPU workers get jax[tpu], GPU workers jax[cuda12]."""
    common = "\n".join(config.get("setup_commands", []))
    worker = "\n".join(config.get("worker_setup_commands", []))
    problems = []
    installs = [c for c in config.get("setup_commands", [])
                if "pip install" in c and re.search(r"(\s~/gemmascope/?(\s|$))|gemmascope @ ", c)]
    if not installs:
        problems.append("setup_commands do not pip install the gemmascope package")
    elif "gemmascope @ " not in installs[0] and config.get("file_mounts", {}).get("~/gemmascope") != ".":
        problems.append("setup installs ~/gemmascope but file_mounts does not copy the checkout there")
    found = pins(common + "\n" + worker)
    for name in PINNED:
        if found.get(name) != docker_pins.get(name):
            problems.append(f"setup pins {name}=={found.get(name)}, the Dockerfile {docker_pins.get(name)}")
    kinds = {is_tpu(t["node_config"]) for t in workers(config).values()}
    if True in kinds and "jax[tpu]==" not in common + worker:
        problems.append("TPU workers: setup does not install jax[tpu]")
    gpu_workers = any(GCE_MACHINES.get(t["node_config"].get("machineType"), (0, 0))[0]
                      for t in workers(config).values())
    if gpu_workers and "jax[cuda12]==" not in common + worker:
        problems.append("GPU workers: setup does not install jax[cuda12]")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key, []) if "ray start" in c]
        if not starts or any("gemmascope-venv/bin/ray start" not in c for c in starts):
            problems.append(f"{key}: ray does not start from the setup's environment")
        elif any("export PATH=$HOME/gemmascope-venv/bin:$PATH;" not in c for c in starts):
            # Ray jobs inherit the node's PATH: `make submit`'s entrypoint calls `gemmascope`.
            problems.append(f"{key}: the setup's environment is not on Ray's PATH")
    return problems


def exposure_problems(config: dict, text: str) -> list[str]:
    """No public dashboard, token authentication on every node, and no credentials in the file."""
    problems = []
    head_start = " ".join(config.get("head_start_ray_commands", []))
    if "--dashboard-host=127.0.0.1" not in head_start:
        problems.append("the dashboard is not bound to 127.0.0.1 on the head")
    if re.search(r"dashboard-host[= ](0\.0\.0\.0|::)", head_start):
        problems.append("the dashboard listens on every interface")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if "export RAY_AUTH_MODE=token;" not in " ".join(config.get(key, [])):
            problems.append(f"{key} start Ray without token authentication")
    if config.get("file_mounts", {}).get("~/.ray/auth_token") != "~/.ray/auth_token":
        problems.append("file_mounts do not give every node the cluster's token")
    if "ssh_private_key" in config.get("auth", {}):
        problems.append("auth names a private key file")
    for pattern in (r"PRIVATE KEY", r"GOOGLE_APPLICATION_CREDENTIALS", r"\"private_key\"",
                    r"credentials\.json", r"\bAIza[0-9A-Za-z_-]{20,}"):
        if re.search(pattern, text):
            problems.append(f"credential-like text: {pattern}")
    return problems


def dockerfile_pins(text: str) -> dict[str, str]:
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    return {"torch": args.get("TORCH_VERSION"), "jax": args.get("JAX_VERSION"),
            "ray": args.get("RAY_VERSION")}


def dockerfile_problems(text: str, pyproject: dict, makefile: str) -> list[str]:
    """The image's Python and pins fall within pyproject.toml and match the Makefile's torch."""
    problems = []
    base = re.search(r"^FROM python:(\d+\.\d+)", text, re.M)
    requires = pyproject["project"]["requires-python"]
    if not base:
        problems.append("the image is not based on a python:X.Y image")
    elif base.group(1) != "3.11" or Version(base.group(1)) not in Requirement(f"python{requires}").specifier:
        problems.append(f"the image has Python {base.group(1)}, want 3.11 within {requires}")
    ranges = {Requirement(d).name: Requirement(d).specifier for d in pyproject["project"]["dependencies"]}
    for name, version in dockerfile_pins(text).items():
        if version is None:
            problems.append(f"the Dockerfile does not pin {name}")
        elif Version(version) not in ranges[name]:
            problems.append(f"the Dockerfile pins {name}=={version}, pyproject wants {ranges[name]}")
    make_torch = re.search(r"torch==([\w.]+)", makefile)
    if not make_torch or make_torch.group(1) != dockerfile_pins(text)["torch"]:
        problems.append("the Dockerfile's torch is not the Makefile's torch pin")
    if not re.search(r"^COPY pyproject\.toml", text, re.M) or "pip install \"/opt/gemmascope\"" not in text:
        problems.append("the image does not install the package from this pyproject.toml")
    return problems


# --- the real files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_text() -> str:
    return DOCKERFILE.read_text()


def test_the_cluster_files_exist():
    names = {p.name for p in YAMLS}
    assert {"gcp-gpu.yaml", "gcp-gpu-spot.yaml", "gcp-tpu.yaml", "gcp-tpu-spot.yaml"} <= names
    assert DOCKERFILE.exists()


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_cluster_yaml(path: Path, docker_text: str):
    config = load(path)
    assert config["provider"]["type"] == "gcp"
    problems = ray_problems(config) + head_problems(config) + spot_problems(path.name, config)
    for name, node_type in workers(config).items():
        problems += worker_problems(name, node_type)
    problems += setup_problems(config, dockerfile_pins(docker_text))
    problems += exposure_problems(config, path.read_text())
    assert problems == []


def test_gpu_and_tpu_workers_come_on_demand_and_spot():
    seen = set()
    for path in YAMLS:
        for node_type in workers(load(path)).values():
            node = node_type["node_config"]
            seen.add(("tpu" if is_tpu(node) else "gpu", is_spot(node)))
    assert seen >= {("gpu", False), ("gpu", True), ("tpu", False), ("tpu", True)}


def test_spot_files_match_their_on_demand_files():
    """gcp-X-spot.yaml offers the same machines as gcp-X.yaml, only spot."""
    for spot in (p for p in YAMLS if p.stem.endswith("-spot")):
        plain = spot.with_name(spot.name.replace("-spot", ""))
        def machines(path):
            return sorted((t["node_config"].get("machineType") or t["node_config"].get("acceleratorType"),
                           tuple(sorted(t["resources"].items()))) for t in workers(load(path)).values())
        assert machines(spot) == machines(plain), spot.name


def test_dockerfile_pins_match_pyproject(docker_text: str):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert dockerfile_problems(docker_text, pyproject, (ROOT / "Makefile").read_text()) == []


def test_cluster_ray_is_the_ray_that_launches_it(docker_text: str):
    import ray

    assert dockerfile_pins(docker_text)["ray"] == ray.__version__


# --- each rule can fail ----------------------------------------------------------------------


def _gpu() -> dict:
    return load(RAY_DIR / "gcp-gpu.yaml")


def _tpu() -> dict:
    return load(RAY_DIR / "gcp-tpu.yaml")


def _first_worker(config: dict) -> dict:
    return next(iter(workers(config).values()))


def _set(config: dict, fn) -> dict:
    fn(config)
    return config


BROKEN_RAY = {
    "unknown key": lambda c: c.update(bogus_key=1),
    "wrong type": lambda c: c.update(max_workers="many"),
    "head type missing": lambda c: c.update(head_node_type="nope"),
    "min above max": lambda c: (c.update(max_workers=1), _first_worker(c).update(min_workers=2)),
}


@pytest.mark.parametrize("break_it", BROKEN_RAY.values(), ids=BROKEN_RAY.keys())
def test_ray_validation_can_fail(break_it):
    assert ray_problems(_gpu()) == []
    assert ray_problems(_set(_gpu(), break_it))


BROKEN_HEAD = {
    "GPU": lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1),
    "TPU": lambda c: c["available_node_types"]["head"]["resources"].update(TPU=4),
    "GPU machine": lambda c: c["available_node_types"]["head"]["node_config"].update(machineType="g2-standard-8"),
    "spot": lambda c: c["available_node_types"]["head"]["node_config"].update(
        scheduling={"provisioningModel": "SPOT"}),
    "guestAccelerators": lambda c: c["available_node_types"]["head"]["node_config"].update(
        guestAccelerators=[{"acceleratorType": "nvidia-l4", "acceleratorCount": 1}]),
}


@pytest.mark.parametrize("break_it", BROKEN_HEAD.values(), ids=BROKEN_HEAD.keys())
def test_head_rule_can_fail(break_it):
    assert head_problems(_set(_gpu(), break_it))


BROKEN_WORKER = {
    "GPU count": (_gpu, lambda t: t["resources"].update(GPU=4)),
    "unknown machine": (_gpu, lambda t: t["node_config"].update(machineType="a9-imaginary-8g")),
    "TPU on GCE": (_gpu, lambda t: t["resources"].update(TPU=4)),
    "too many CPUs": (_gpu, lambda t: t["resources"].update(CPU=1000)),
    "live migration": (_gpu, lambda t: t["node_config"].update(scheduling={"onHostMaintenance": "MIGRATE"})),
    "TPU chips": (_tpu, lambda t: t["resources"].update(TPU=4)),
    "GPU on TPU": (_tpu, lambda t: t["resources"].update(GPU=1)),
    "bad TPU type": (_tpu, lambda t: t["node_config"].update(acceleratorType="tpu-v5e")),
    "multi-host": (_tpu, lambda t: t["node_config"].update(acceleratorType="v5litepod-16")),
    "no runtime": (_tpu, lambda t: t["node_config"].pop("runtimeVersion")),
}


@pytest.mark.parametrize("case", BROKEN_WORKER.values(), ids=BROKEN_WORKER.keys())
def test_worker_rule_can_fail(case):
    make, break_it = case
    node_type = _first_worker(make())
    assert worker_problems("w", copy.deepcopy(node_type)) == []
    break_it(node_type)
    assert worker_problems("w", node_type)


def test_spot_rule_can_fail():
    spot = load(RAY_DIR / "gcp-gpu-spot.yaml")
    _first_worker(spot)["node_config"]["scheduling"].pop("provisioningModel")
    assert spot_problems("gcp-gpu-spot.yaml", spot)
    assert spot_problems("gcp-gpu.yaml", load(RAY_DIR / "gcp-gpu-spot.yaml"))
    tpu_spot = load(RAY_DIR / "gcp-tpu-spot.yaml")
    _first_worker(tpu_spot)["node_config"].pop("schedulingConfig")
    assert spot_problems("gcp-tpu-spot.yaml", tpu_spot)


BROKEN_SETUP = {
    "no install": (_gpu, lambda c: c.update(setup_commands=[s for s in c["setup_commands"] if "-e ~/gemmascope" not in s])),
    "no checkout": (_gpu, lambda c: c.update(file_mounts={})),
    "torch pin": (_gpu, lambda c: c.update(setup_commands=[s.replace("torch==2.13.0", "torch==2.12.0") for s in c["setup_commands"]])),
    "ray unpinned": (_gpu, lambda c: c.update(setup_commands=[s.replace("ray[default]==", "ray[default]>=") for s in c["setup_commands"]])),
    "no jax[tpu]": (_tpu, lambda c: c.update(worker_setup_commands=[])),
    "no jax[cuda12]": (_gpu, lambda c: c.update(setup_commands=[s.replace("jax[cuda12]", "jax") for s in c["setup_commands"]])),
    "system ray": (_tpu, lambda c: c.update(worker_start_ray_commands=["ray stop", "ray start --address=$RAY_HEAD_IP:6379"])),
    "venv off PATH": (_gpu, lambda c: c.update(head_start_ray_commands=[
        s.replace("export PATH=$HOME/gemmascope-venv/bin:$PATH;", "") for s in c["head_start_ray_commands"]])),
}


@pytest.mark.parametrize("case", BROKEN_SETUP.values(), ids=BROKEN_SETUP.keys())
def test_setup_rule_can_fail(case, docker_text: str):
    make, break_it = case
    assert setup_problems(make(), dockerfile_pins(docker_text)) == []
    assert setup_problems(_set(make(), break_it), dockerfile_pins(docker_text))


def test_exposure_rule_can_fail():
    text = (RAY_DIR / "gcp-gpu.yaml").read_text()
    public = _set(_gpu(), lambda c: c.update(head_start_ray_commands=[
        s.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0") for s in c["head_start_ray_commands"]]))
    assert exposure_problems(public, text)
    assert exposure_problems(_set(_gpu(), lambda c: c["auth"].update(ssh_private_key="~/.ssh/key.pem")), text)
    assert exposure_problems(_gpu(), text + "\n# -----BEGIN PRIVATE KEY-----\n")
    no_auth = _set(_gpu(), lambda c: c.update(worker_start_ray_commands=[
        s.replace("export RAY_AUTH_MODE=token;", "") for s in c["worker_start_ray_commands"]]))
    assert exposure_problems(no_auth, text) == ["worker_start_ray_commands start Ray without token authentication"]
    no_token = _set(_gpu(), lambda c: c["file_mounts"].pop("~/.ray/auth_token"))
    assert exposure_problems(no_token, text) == ["file_mounts do not give every node the cluster's token"]


BROKEN_DOCKERFILE = {
    "torch outside pyproject": lambda t: t.replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.99.0"),
    "jax outside pyproject": lambda t: t.replace("ARG JAX_VERSION=0.10.2", "ARG JAX_VERSION=0.9.0"),
    "ray unpinned": lambda t: re.sub(r"^ARG RAY_VERSION=.*$", "", t, flags=re.M),
    "python 3.13": lambda t: t.replace("FROM python:3.11", "FROM python:3.13"),
    "python 3.12": lambda t: t.replace("FROM python:3.11", "FROM python:3.12"),
    "not installed": lambda t: t.replace('pip install "/opt/gemmascope"', 'pip install "gemmascope"'),
}


@pytest.mark.parametrize("break_it", BROKEN_DOCKERFILE.values(), ids=BROKEN_DOCKERFILE.keys())
def test_dockerfile_rule_can_fail(break_it, docker_text: str):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    makefile = (ROOT / "Makefile").read_text()
    broken = break_it(docker_text)
    assert broken != docker_text
    assert dockerfile_problems(broken, pyproject, makefile)


def test_makefile_torch_pin_rule_can_fail(docker_text: str):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    makefile = (ROOT / "Makefile").read_text().replace("torch==2.13.0", "torch==2.14.0")
    assert dockerfile_problems(docker_text, pyproject, makefile)
