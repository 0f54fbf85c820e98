"""The Dockerfile and Kubernetes manifests: valid against Kubernetes' schemas (offline, kubernetes-validate),
consistent with each other, and running a command line the CLI accepts."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).parents[1]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def _docs() -> dict[str, dict]:
    docs = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def _container() -> dict:
    (c,) = _docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def _dockerfile() -> dict[str, str]:
    """Each Dockerfile instruction's arguments (continuation lines joined; repeated ones joined by newlines)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out[word.upper()] = (out[word.upper()] + "\n" if word.upper() in out else "") + rest.strip()
    return out


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path):
    version = kubernetes_validate.latest_version()
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError on a wrong field


def test_schema_check_catches_mistakes():
    bad = _docs()["Deployment"]
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_manifests_fit_together():
    docs = _docs()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"} <= set(docs)
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    c = _container()
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "requests" in c["resources"] and "cpu" in c["resources"]["requests"]  # CPU utilization needs a request
    claim = dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    args = c["args"]
    assert int(args[args.index("--port") + 1]) == port_names["http"]
    assert args[args.index("--host") + 1] == "0.0.0.0"  # reachable from the kubelet's probes and the Service


def test_image_runs_as_non_root_and_matches_the_manifests():
    d = _dockerfile()
    user = d["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) > 0
    pod = _docs()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == int(user)
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in d["RUN"]  # not the CUDA build
    assert d["ENTRYPOINT"] == '["llmclock"]'
    cmd = yaml.safe_load(d["CMD"])  # the exec form is a JSON list
    assert cmd[0] == "serve" and d["EXPOSE"] == cmd[cmd.index("--port") + 1]
    assert _container()["args"][: len(cmd)] == cmd  # the pods run the image's own command (plus --slots)


@pytest.mark.slow
def test_image_build_context_installs_the_kernels(tmp_path):
    """The files the Dockerfile COPYs are enough for its `pip install .` to build the C++ kernels.

    No Docker daemon (nor Docker Hub) is reachable here, so the image itself is not built: its
    context is, as a wheel, from exactly the COPY'd files.
    """
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for line in _dockerfile()["COPY"].splitlines():
        *sources, dest = line.split()
        for src in sources:
            target = ctx / dest / src if dest.endswith("/") and dest != "./" else ctx / (src if dest == "./" else dest)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / src, target)
    # One ISA level keeps this quick; the image builds all of them (setup.py).
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(ctx)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "LLMCLOCK_ISA_LEVELS": "base"})
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llmclock-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "llmclock/_kernels_base.so" in names, names
    assert "llmclock/server/static/index.html" in names
