"""Every container runs on a read-only root file system and writes only to its volumes.

The functions write nothing on the image's file system (gunicorn's heartbeats go to /dev/shm:
functions/_process.py); render and the model pull import torch, which needs Python's temporary
directory (Inductor's default cache is in it: torch/_inductor/runtime/cache_dir_utils.py), so
each has an emptyDir at /tmp.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any

import pytest

from .conftest import OVERLAYS
from .knative_pod import WRITABLE_VOLUME_KINDS

Render = Callable[[str], list[dict[str, Any]]]

# The container securityContext fields Knative Serving lets through with no feature flag
# (pkg/apis/serving/fieldmask.go, SecurityContextMask); its webhook refuses any other.
# `privileged` is let through only when false.
KNATIVE_SECURITY_CONTEXT = {
    "capabilities",
    "readOnlyRootFilesystem",
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "allowPrivilegeEscalation",
    "seccompProfile",
    "privileged",
}
# Where each writer is told to write: the variables naming a directory, and Python's
# temporary directory (tempfile.gettempdir: $TMPDIR, else /tmp).
WRITTEN_DIRECTORIES = ("HF_HOME", "TRITON_HOME", "TMPDIR")
_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes (the integer forms these manifests use)."""
    match = _QUANTITY.fullmatch(quantity)
    assert match, f"not a byte quantity: {quantity}"
    return int(match[1]) * _UNITS[match[2]]


def _pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every Knative Service and Job."""
    for doc in docs:
        knative_service = doc["kind"] == "Service" and "knative" in doc["apiVersion"]
        if knative_service or doc["kind"] == "Job":
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _pod(render: Render, overlay: str, name: str) -> dict[str, Any]:
    [pod] = [pod for found, pod in _pods(render(overlay)) if found == name]
    return pod


def writable_mounts(pod: Mapping[str, Any]) -> dict[str, list[PurePosixPath]]:
    """Container name -> the mount paths it may write: a writable volume kind, not readOnly."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    writable = {}
    for container in pod["containers"]:
        paths = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            claim = volume.get("persistentVolumeClaim") or {}
            if (
                any(kind in volume for kind in WRITABLE_VOLUME_KINDS)
                and not claim.get("readOnly")
                and not mount.get("readOnly")
            ):
                paths.append(PurePosixPath(mount["mountPath"]))
        writable[container["name"]] = paths
    return writable


def unwritable_directories(pod: Mapping[str, Any]) -> list[str]:
    """The directories each container is told to write (or writes to: /tmp) that lie outside
    every writable mount of a read-only root."""
    unwritable = []
    for container in pod["containers"]:
        env = {v["name"]: v["value"] for v in container.get("env") or [] if "value" in v}
        directories = {name: env[name] for name in WRITTEN_DIRECTORIES if name in env}
        directories.setdefault("TMPDIR", "/tmp")  # Python's default
        mounts = writable_mounts(pod)[container["name"]]
        for name, directory in directories.items():
            path = PurePosixPath(directory)
            if not any(path == mount or mount in path.parents for mount in mounts):
                unwritable.append(f"{container['name']}: {name}={directory}")
    return unwritable


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_a_read_only_root(render: Render, overlay: str) -> None:
    pods = dict(_pods(render(overlay)))
    assert {"imagegen-render", "imagegen-enhance", "imagegen-ledger"} <= set(pods)
    if overlay == "prod":
        assert "imagegen-models-pull" in pods
    for name, pod in pods.items():
        for container in pod["containers"]:
            context = container.get("securityContext") or {}
            assert context.get("readOnlyRootFilesystem") is True, (name, container["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_knative_lets_each_security_context_through(render: Render, overlay: str) -> None:
    for doc in render(overlay):
        if doc["kind"] == "Service" and "knative" in doc["apiVersion"]:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                context = container.get("securityContext") or {}
                assert set(context) <= KNATIVE_SECURITY_CONTEXT, doc["metadata"]["name"]
                assert context.get("privileged", False) is False


@pytest.mark.parametrize(
    ("overlay", "name"),
    [
        ("dev", "imagegen-render"),
        ("prod", "imagegen-render"),
        ("prod", "imagegen-models-pull"),
    ],
)
def test_what_imports_torch_writes_to_a_temporary_volume(
    render: Render, overlay: str, name: str
) -> None:
    pod = _pod(render, overlay, name)
    volumes = {v["name"]: v for v in pod["volumes"]}
    [container] = pod["containers"]
    [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    assert not unwritable_directories(pod)


def test_a_cache_outside_the_volumes_is_found(render: Render) -> None:
    pod = _pod(render, "prod", "imagegen-render")
    unchanged = copy.deepcopy(pod)
    [container] = pod["containers"]
    container["env"].append({"name": "TRITON_HOME", "value": "/home/imagegen"})
    assert unwritable_directories(pod) == ["render: TRITON_HOME=/home/imagegen"]
    # The temporary directory, where its volume is gone or mounted read-only.
    pod = copy.deepcopy(unchanged)
    [container] = pod["containers"]
    [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    tmp["readOnly"] = True
    assert "render: TMPDIR=/tmp" in unwritable_directories(pod)
    # The model volume is read-only: a cache there is not written.
    pod = copy.deepcopy(unchanged)
    [container] = pod["containers"]
    [variable] = [v for v in container["env"] if v["name"] == "HF_HOME"]
    variable["value"] = "/models/.hf-home"
    assert unwritable_directories(pod) == ["render: HF_HOME=/models/.hf-home"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_empty_dirs_are_bounded_within_the_pod_s_ephemeral_storage(
    render: Render, overlay: str
) -> None:
    # The kubelet evicts a pod whose emptyDir outgrows its sizeLimit, or whose local storage
    # (emptyDirs, logs) outgrows the containers' ephemeral-storage limits.
    for name, pod in _pods(render(overlay)):
        empty_dirs = [v["emptyDir"] for v in pod.get("volumes") or [] if "emptyDir" in v]
        if not empty_dirs:
            continue
        assert all("sizeLimit" in e for e in empty_dirs), name
        limit = sum(
            _bytes(c["resources"]["limits"]["ephemeral-storage"]) for c in pod["containers"]
        )
        assert sum(_bytes(e["sizeLimit"]) for e in empty_dirs) < limit, name
