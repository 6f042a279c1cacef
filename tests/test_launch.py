"""The cluster launch files in launch/: the AWS cluster-launcher config, the KubeRay RayJob and submit.sh.

The YAML files are checked against Ray's own schema and runtime-env validation where Ray has one, and
against the recipe they are sized for; submit.sh runs for real, against a stand-in `ray` that records
what it was given (a real cluster is not needed to see what would be sent to one).
"""

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SUBMIT = LAUNCH / "submit.sh"
FAKE_KEY = "0123456789abcdef" * 2 + "feedface"  # the shape of a wandb key: 40 hex digits
WANDB_KEY_SHAPE = re.compile(r"\b[0-9a-f]{40}\b")


def _pins() -> dict[str, str]:
    """requirements.txt as {name: version}, extras dropped."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.split("[")[0].lower()] = version
    return pins


def _recipe(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


def _cluster() -> dict:
    return yaml.safe_load((LAUNCH / "aws-gpu-cluster.yaml").read_text())


def _rayjob() -> dict:
    return yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())


def _containers(job: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod spec, container) for the head and every worker group of a RayJob."""
    spec = job["spec"]["rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"], c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def _gpu_worker_type(cluster: dict) -> dict:
    (gpu_type,) = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    return gpu_type


def _submit(*args: str, env: dict[str, str] | None = None, path: str | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RAY_ADDRESS"))}
    base["PATH"] = path or os.environ["PATH"]
    return subprocess.run([str(SUBMIT), *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=30)


# --- aws-gpu-cluster.yaml ------------------------------------------------------------------------------


def test_every_launch_yaml_parses():
    """Guards against a YAML syntax slip (a tab, a bad indent) that only `ray up` or `kubectl` would report."""
    files = sorted(LAUNCH.glob("*.yaml"))
    assert {"aws-gpu-cluster.yaml", "rayjob.yaml"} <= {f.name for f in files}
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_cluster_config_passes_ray_schema():
    """Guards against a misspelt or misplaced cluster-launcher field: Ray's own schema, the one `ray up`
    applies after filling in the AWS defaults, rejects unknown keys."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(copy.deepcopy(_cluster())))


def test_cluster_config_has_a_cpu_head_and_a_gpu_worker_type():
    """Guards against a cluster that cannot train: no GPU node type, a GPU head, or limits of zero."""
    cluster = _cluster()
    assert cluster["cluster_name"]
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = _gpu_worker_type(cluster)
    assert gpu["node_config"]["InstanceType"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cluster["max_workers"]


def test_cluster_config_fits_the_imagenet1k_recipe():
    """Guards against a cluster too small for the recipe it is written for: Ray Train would wait forever
    for GPUs or CPUs (dist.num_workers workers, each one GPU and dist.cpus_per_worker CPUs)."""
    dist = _recipe("imagenet1k")["dist"]
    gpu = _gpu_worker_type(_cluster())
    per_node = gpu["resources"]
    assert gpu["max_workers"] * per_node["GPU"] >= dist["num_workers"]
    assert per_node["CPU"] >= per_node["GPU"] * dist["cpus_per_worker"]


def test_cluster_config_installs_the_project_with_its_pins():
    """Guards against nodes running other versions than the tested set: the image's Ray and Python must be
    the pinned ones, setup must install requirements.txt (torch==2.13.0) and the package, and the
    check after it must expect the pinned torch and Ray."""
    cluster, pins = _cluster(), _pins()
    assert pins["torch"] == "2.13.0"
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{pins['ray']}-py311-")
    setup = "\n".join(cluster["setup_commands"])
    assert re.search(r"pip install .*-r \S*requirements\.txt", setup)
    assert re.search(r"pip install .*--no-deps \S*iil-dist", setup)
    assert f"'{pins['ray']}'" in setup and f"'{pins['torch']}'" in setup
    # what is mounted must exist here (`ray up` runs from the repository root), requirements.txt included
    mounts = cluster["file_mounts"]
    for local in mounts.values():
        assert (REPO / local).exists(), local
    assert "requirements.txt" in {Path(local).name for local in mounts.values()}


def test_cluster_config_mounts_shared_storage_into_the_container():
    """Guards against run directories or shards on a node-local disk: /mnt/shared must be mounted (EFS)
    on every host and passed into the container, with the file system id left as a marked placeholder."""
    cluster = _cluster()
    init = "\n".join(cluster["initialization_commands"])
    assert re.search(r"mount -t nfs4 .*<your-efs-id>.*/mnt/shared", init, re.S)
    assert "-v /mnt/shared:/mnt/shared" in cluster["docker"]["run_options"]
    assert _recipe("imagenet1k")["run_root"].startswith("/mnt/shared/")


# --- rayjob.yaml ---------------------------------------------------------------------------------------


def test_rayjob_has_the_fields_kuberay_needs():
    """Guards against a RayJob that KubeRay rejects or that keeps GPU nodes after the job: kind and API
    version, an `iil-dist train` entrypoint, a head group, a GPU worker group, shutdown when finished,
    and an image of the pinned Ray for Python 3.11 with CUDA."""
    job, pins = _rayjob(), _pins()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "iil-dist train" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == pins["ray"]
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [
        c["resources"]["limits"]["nvidia.com/gpu"]
        for group, _, c in _containers(job)
        if group != "head" and "nvidia.com/gpu" in c["resources"].get("limits", {})
    ]
    assert gpu_groups and all(int(n) > 0 for n in gpu_groups)
    for _, _, container in _containers(job):
        assert re.fullmatch(rf"rayproject/ray:{re.escape(pins['ray'])}-py311-(gpu|cu\d+)", container["image"])


def test_rayjob_fits_the_imagenet1k_recipe():
    """Guards against a GPU worker group smaller than the recipe's worker count, or pods whose CPU limit
    (what Ray advertises) cannot hold one worker per GPU at dist.cpus_per_worker."""
    dist = _recipe("imagenet1k")["dist"]
    assert "configs/imagenet1k.yaml" in _rayjob()["spec"]["entrypoint"]
    (worker,) = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = int(limits["nvidia.com/gpu"])
    assert worker["replicas"] * gpus >= dist["num_workers"]
    assert float(limits["cpu"]) >= gpus * dist["cpus_per_worker"]


def test_rayjob_takes_the_wandb_key_from_a_secret_only():
    """Guards against a wandb key written into the manifest (and so into git and `kubectl get -o yaml`):
    every WANDB_API_KEY comes from a secretKeyRef, the runtime env (readable by all Ray job users) has
    none, and nothing key-shaped appears anywhere in the file."""
    job = _rayjob()
    for group, _, container in _containers(job):
        (entry,) = [e for e in container["env"] if e["name"] == "WANDB_API_KEY"]
        assert "value" not in entry, group
        assert entry["valueFrom"]["secretKeyRef"]["name"] and entry["valueFrom"]["secretKeyRef"]["key"]
    assert "WANDB_API_KEY" not in job["spec"]["runtimeEnvYAML"]
    assert not WANDB_KEY_SHAPE.search((LAUNCH / "rayjob.yaml").read_text())


def test_rayjob_mounts_the_shared_claim_in_head_and_workers():
    """Guards against a pod without the shared volume: the scenario and the run directory would be missing
    on it (the driver on the head writes results.json, the workers read shards and write logs)."""
    for group, pod, container in _containers(_rayjob()):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        (name,) = [n for n, p in mounts.items() if p == "/mnt/shared"]
        assert volumes[name]["persistentVolumeClaim"]["claimName"], group


def test_rayjob_runtime_env_is_valid_and_pins_the_tested_set():
    """Guards against a runtime env Ray refuses, and against the manifest's pip list drifting from
    requirements.txt (the cluster would train with an untested set)."""
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    listed = {}
    for package in runtime_env["pip"]["packages"]:
        if "==" in package:
            name, version = package.split("==")
            listed[name.split("[")[0].lower()] = version
        else:
            assert package.startswith("iil-dist @ "), package
    assert listed == _pins()


def test_rayjob_entrypoint_reaches_ray_as_one_command():
    """Guards against shell syntax in the entrypoint being run by KubeRay's submitter pod, which pastes the
    entrypoint into its own shell command after `ray job submit ... --`, or the submitter expanding
    WANDB_API_KEY into the job's entrypoint (stored in the job's info)."""
    entrypoint = _rayjob()["spec"]["entrypoint"]
    # the submitter's bash runs `ray job submit ... -- ENTRYPOINT ; fi ; ...`; printf stands in for ray
    script = f"printf '%s\\0' job submit -- {entrypoint} ;"
    env = {**os.environ, "WANDB_API_KEY": FAKE_KEY}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    argv = out.split("\0")[:-1]
    assert argv[:3] == ["job", "submit", "--"]
    assert argv[3:5] == ["sh", "-c"] and len(argv) == 6
    assert "iil-dist train configs/imagenet1k.yaml" in argv[5] and FAKE_KEY not in out


# --- submit.sh -----------------------------------------------------------------------------------------


def test_submit_script_is_valid_bash_and_executable():
    """Guards against a syntax error or a lost executable bit in the script users run first."""
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    assert SUBMIT.stat().st_mode & stat.S_IXUSR


def test_dry_run_prints_the_command_with_the_key_masked():
    """Guards against the wandb key reaching the terminal (and CI logs): the dry run shows the command and
    the runtime env with the key as ***, and needs no `ray`."""
    env = {"WANDB_API_KEY": FAKE_KEY, "WANDB_PROJECT": "iil-check"}
    result = _submit("--dry-run", "configs/digits.yaml", "name=x", env=env, path="/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert FAKE_KEY not in out
    assert "WANDB_API_KEY=***" in out and '"WANDB_API_KEY": "***"' in out
    (command,) = [line for line in out.splitlines() if "ray job submit" in line]
    assert f"--working-dir {REPO}" in command
    assert command.endswith("-- iil-dist train configs/digits.yaml name=x")


def test_resume_sends_the_run_directory_instead_of_a_config():
    """Guards against `--resume` being refused for want of a config, or its overrides being lost."""
    result = _submit("--dry-run", "--resume", "/mnt/shared/runs/x", "dist.max_failures=2")
    assert result.returncode == 0, result.stderr
    assert "-- iil-dist train --resume /mnt/shared/runs/x dist.max_failures=2" in result.stdout


def test_missing_config_or_ray_is_named():
    """Guards against a bare failure (or a submitted job that fails on the cluster) when the config is
    missing or unknown, or when the Ray CLI is not installed."""
    for args, message in (((), "no config given"), (("configs/nope.yaml", "name=x"), "configs/nope.yaml not found")):
        result = _submit(*args)
        assert result.returncode != 0 and message in result.stderr, result.stderr
    if shutil.which("ray", path="/usr/bin:/bin"):
        pytest.skip("a system-wide ray is installed")
    result = _submit("configs/digits.yaml", path="/usr/bin:/bin")
    assert result.returncode != 0 and "ray is not on PATH" in result.stderr


@pytest.fixture
def fake_ray(tmp_path: Path) -> tuple[str, Path]:
    """A `ray` that records its argv, environment and the --runtime-env it was given, then exits 0."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record.json"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f"""#!{sys.executable}
import json, os, stat, sys
argv = sys.argv[1:]
path = argv[argv.index("--runtime-env") + 1]
info = os.stat(path)
record = {{"argv": argv, "env": dict(os.environ), "path": path, "mode": stat.S_IMODE(info.st_mode),
          "regular_file": stat.S_ISREG(info.st_mode), "runtime_env": open(path).read()}}
open({str(record)!r}, "w").write(json.dumps(record))
""")
    (bin_dir / "ray").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", record


def test_submission_sends_wandb_env_without_exposing_the_key(fake_ray, tmp_path):
    """Guards against the key in `ray`'s command line (visible to every user through `ps`), in a file left
    behind or readable by others, or missing from the job; and against a runtime env Ray would refuse
    to merge with the driver's own env_vars (iil-dist's ray.init sets WANDB_MODE and more)."""
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from iil_dist.orchestration.ray_train import _WORKER_ENV

    path, record_file = fake_ray
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {"WANDB_API_KEY": FAKE_KEY, "WANDB_ENTITY": "team", "WANDB_MODE": "online", "TMPDIR": str(scratch)}
    result = _submit("--address", "http://head:8265", "--no-wait", "configs/digits.yaml", "name=x", env=env, path=path)
    assert result.returncode == 0, result.stderr
    assert FAKE_KEY not in result.stdout + result.stderr
    record = json.loads(record_file.read_text())

    # the command line: no key, the address, the repository as working dir, the train command
    argv = record["argv"]
    assert FAKE_KEY not in " ".join(argv)
    assert argv[:6] == ["job", "submit", "--address", "http://head:8265", "--working-dir", str(REPO)]
    assert "--no-wait" in argv
    assert argv[argv.index("--") + 1 :] == ["iil-dist", "train", "configs/digits.yaml", "name=x"]
    assert record["env"]["RAY_USAGE_STATS_ENABLED"] == "0"

    # the runtime env reached ray unmasked, readable by its owner only, and left nothing behind
    assert record["mode"] == 0o600
    if record["regular_file"]:
        assert not Path(record["path"]).exists()
    assert list(scratch.iterdir()) == []
    runtime_env = json.loads(record["runtime_env"])
    for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_MODE"):
        assert runtime_env["env_vars"][name] == env[name]
    RuntimeEnv(**runtime_env)

    # as the driver's ray.init will see it: its own env_vars merged over the job's
    driver_env = {"env_vars": {**_WORKER_ENV, "WANDB_MODE": "online"}}
    override = runtime_env["env_vars"].get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1"
    merged = _merge_runtime_env(runtime_env, driver_env, override=override)
    assert merged is not None and merged["env_vars"]["WANDB_API_KEY"] == FAKE_KEY


def test_wandb_goes_online_only_with_a_key(fake_ray):
    """Guards against a recipe with online wandb failing on the cluster for want of a key: without a key
    or an explicit WANDB_MODE the job runs offline; with a key, the recipe (or WANDB_MODE) decides."""
    path, record_file = fake_ray

    def job_env(env: dict[str, str]) -> dict[str, str]:
        assert _submit("configs/digits.yaml", env=env, path=path).returncode == 0
        return json.loads(json.loads(record_file.read_text())["runtime_env"])["env_vars"]

    assert job_env({})["WANDB_MODE"] == "offline"
    assert "WANDB_MODE" not in job_env({"WANDB_API_KEY": FAKE_KEY})
    assert job_env({"WANDB_MODE": "online"})["WANDB_MODE"] == "online"


def test_upload_keeps_the_package_and_leaves_out_local_state():
    """Guards against an exclude pattern that also drops the package folder iil_dist/data/ (an unanchored
    `data`), or one that uploads .venv, the scenario shards, runs or wandb files to the cluster."""
    from ray._private.runtime_env.packaging import _get_excludes

    result = _submit("--dry-run", "configs/digits.yaml")
    runtime_env = json.loads(result.stdout[result.stdout.index("{") :])
    excluded = _get_excludes(REPO, runtime_env["excludes"])
    for kept in ("iil_dist/data/shards.py", "iil_dist/cli.py", "configs/digits.yaml", "pyproject.toml"):
        assert not excluded(REPO / kept), kept
    for dropped in (".venv/bin/python", "data/digits/manifest.json", "runs/x/results.json", "wandb/run", ".git/HEAD"):
        assert excluded(REPO / dropped), dropped
