"""The deployment recipes in configs/deploy agree with themselves and with the runtime:
process count, coordinator name and port, the variables ryzen_jax reads."""

from __future__ import annotations

import os
import re

import yaml

from ryzen_jax.distributed import DEFAULT_PORT, detect_cluster
from tests.mp_helpers import ROOT

DEPLOY = os.path.join(ROOT, "configs", "deploy")


def read(*parts: str) -> str:
    with open(os.path.join(DEPLOY, *parts)) as f:
        return f.read()


def container_env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def check_pod(job_spec: dict, coordinator: str) -> None:
    """One pod per process: completions = WORLD_SIZE, RANK = the completion index, the
    coordinator address and port as given, GPUs requested; the env forms a group."""
    pod = job_spec["template"]["spec"]
    [container] = pod["containers"]
    env = container_env(container)
    assert job_spec["completionMode"] == "Indexed"
    assert job_spec["completions"] == job_spec["parallelism"] == int(env["WORLD_SIZE"])
    assert env["RANK"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["MASTER_ADDR"] == coordinator
    assert int(env["MASTER_PORT"]) == DEFAULT_PORT == container["ports"][0]["containerPort"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert pod["restartPolicy"] == "Never" and job_spec["backoffLimit"] == 0
    assert container["image"] == docker_tag()
    spec = detect_cluster({**{k: v for k, v in env.items() if isinstance(v, str)}, "RANK": "1"})
    assert (spec.source, spec.coordinator_address, spec.num_processes) == \
        ("torchrun", f"{coordinator}:{DEFAULT_PORT}", int(env["WORLD_SIZE"]))


def docker_tag() -> str:
    """The image tag the Dockerfile's build command gives."""
    return re.search(r"docker build -f configs/deploy/Dockerfile -t (\S+) \.", read("Dockerfile")).group(1)


def test_dockerfile_installs_jax_cuda_and_this_package():
    text = read("Dockerfile")
    assert re.search(r"^FROM nvidia/cuda:12[\d.]+-\S+$", text, re.M)
    assert 'pip install "jax[cuda12]" && pip install .' in text
    assert f"EXPOSE {DEFAULT_PORT}" in text
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"-t {docker_tag()}" in f.read()  # the README builds the tag the manifests run


def test_indexed_job_and_its_headless_service_agree():
    service, job = yaml.safe_load_all(read("k8s", "indexed-job.yaml"))
    assert service["kind"] == "Service" and job["kind"] == "Job"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert service["spec"]["ports"][0]["port"] == DEFAULT_PORT
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    # Pods of an Indexed Job are named <job>-<index>: process 0 is the coordinator.
    check_pod(job["spec"], f"{job['metadata']['name']}-0.{service['metadata']['name']}")


def test_jobset_restarts_the_group_and_names_pod_zero():
    [jobset] = yaml.safe_load_all(read("k8s", "jobset.yaml"))
    spec = jobset["spec"]
    assert spec["failurePolicy"]["maxRestarts"] >= 1 and spec["network"]["enableDNSHostnames"] is True
    [workers] = spec["replicatedJobs"]
    assert workers["replicas"] == 1
    coordinator = f"{jobset['metadata']['name']}-{workers['name']}-0-0.{spec['network']['subdomain']}"
    check_pod(workers["template"]["spec"], coordinator)


def test_slurm_script_runs_one_task_per_node_with_every_gpu():
    text = read("slurm.sbatch")
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert sbatch["ntasks-per-node"] == "1" and int(sbatch["nodes"]) >= 2
    assert re.search(r"^GPUS_PER_NODE=(\d+)", text, re.M).group(1) == sbatch["gpus-per-node"]
    assert int(re.search(r"^COORDINATOR_PORT=(\d+)", text, re.M).group(1)) == DEFAULT_PORT
    assert "export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))" in text
    assert re.search(r"srun --ntasks-per-node=1 --kill-on-bad-exit=1", text)
    # What jax.distributed sees inside the step is what detect_cluster reads.
    spec = detect_cluster({"SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": sbatch["nodes"], "SLURM_PROCID": "1"})
    assert (spec.source, spec.num_processes, spec.process_id) == ("slurm", int(sbatch["nodes"]), 1)
