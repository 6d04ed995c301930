"""The image's two modes (docker/entrypoint.sh) and docker-compose.yml, checked without Docker."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from tests.serve.conftest import ROOT

ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


@pytest.fixture()
def run_entrypoint(tmp_path):
    """Runs the entry point with a stub ``python`` that prints what it was asked to run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text('#!/bin/sh\necho "python $*"\n')
    stub.chmod(0o755)
    other = bin_dir / "storystudio-download"
    other.write_text('#!/bin/sh\necho "download $*"\n')
    other.chmod(0o755)

    def run(*args: str, mode: str | None = None) -> subprocess.CompletedProcess:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
        if mode is not None:
            env["STORYSTUDIO_MODE"] = mode
        return subprocess.run(["/bin/sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)

    return run


def test_default_mode_is_the_runpod_worker(run_entrypoint):
    assert run_entrypoint().stdout == "python -u handler.py\n"
    assert run_entrypoint(mode="runpod").stdout == "python -u handler.py\n"
    assert run_entrypoint("runpod", "--rp_serve_api").stdout == "python -u handler.py --rp_serve_api\n"


def test_http_mode_by_argument_or_env(run_entrypoint):
    assert run_entrypoint(mode="http").stdout == "python -u -m storystudio.serve\n"
    assert run_entrypoint("http", "--port", "9000").stdout == "python -u -m storystudio.serve --port 9000\n"
    assert run_entrypoint("runpod", mode="http").stdout == "python -u handler.py\n", "the argument wins"


def test_other_commands_run_as_given_and_bad_modes_fail(run_entrypoint):
    assert run_entrypoint("storystudio-download", "--models-dir", "/models").stdout == "download --models-dir /models\n"
    bad = run_entrypoint(mode="grpc")
    assert bad.returncode == 2 and "STORYSTUDIO_MODE must be runpod or http, not 'grpc'" in bad.stderr


def test_compose_runs_the_image_in_http_mode_with_gpu_volumes_and_port():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["storystudio"]
    env = svc["environment"]
    assert svc["build"] == "." and env["STORYSTUDIO_MODE"] == "http"
    assert env["STORYSTUDIO_HOST"] == "0.0.0.0"
    assert env["STORYSTUDIO_API_KEYS"].startswith("${STORYSTUDIO_API_KEYS:?"), "no key, no start"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    mounts = {v.split(":")[-2] if v.endswith((":ro", ":rw")) else v.split(":")[-1]: v for v in svc["volumes"]}
    assert mounts[env["STORYSTUDIO_MODELS_DIR"]].endswith(":ro")
    assert mounts[env["STORYSTUDIO_OUTPUT_DIR"]].split(":")[0] in compose["volumes"], "outputs: a named volume"
    assert env["STORYSTUDIO_MEDIA_ROOT"] in mounts
    assert any(p.endswith(f":{env['STORYSTUDIO_PORT']}") for p in svc["ports"])
    assert "/health" in " ".join(svc["healthcheck"]["test"])


def test_compose_env_names_are_read_by_the_code():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    code = "\n".join(p.read_text() for p in (ROOT / "storystudio").rglob("*.py"))
    for name in compose["services"]["storystudio"]["environment"]:
        if name == "STORYSTUDIO_MODE":
            assert name in ENTRYPOINT.read_text()
        else:
            assert name in code, f"{name} is set by docker-compose.yml but read by nothing"
    assert os.access(ENTRYPOINT, os.R_OK)
