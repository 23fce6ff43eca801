"""The numeric example models under numpy 2: a real tritonserver whose Python-backend stub runs in a venv
with numpy 2 (the project pins numpy<2, so that venv is made here, from the package index pip is set up
with), serving risk, risk_lite and work; their outputs must equal what numpy 1 computes in this process.

textgen (BYTES in and out) and vision's JPEG input are not here: BYTES tensors have no DLPack form, and this
Triton build's stub fails on them under numpy 2 (README, the example models).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from controlplane.procs import ManagedProcess, free_port
from controlplane.shards.base import probe_ready
from controlplane.shards.triton import TritonInstall

from .conftest import ROOT

NUMPY_2 = "numpy==2.2.6"
MODELS = ROOT / "examples" / "models"
FEATURES = np.linspace(-2, 2, 5 * 16, dtype=np.float32).reshape(5, 16)


@pytest.fixture(scope="module")
def numpy2_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("numpy2") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    NUMPY_2], check=True, timeout=300)
    version = subprocess.run([venv / "bin" / "python", "-c", "import numpy; print(numpy.__version__)"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert version.startswith("2.")
    return venv / "bin"


@pytest.fixture(scope="module")
def numpy2_server(numpy2_python: Path, tmp_path_factory: pytest.TempPathFactory):
    install = TritonInstall.find()
    port = free_port()
    env = install.env(None)
    env["PATH"] = f"{numpy2_python}:{env['PATH']}"  # the stub's python3, and so its numpy, is the numpy 2 venv's
    log = tmp_path_factory.mktemp("numpy2-log") / "tritonserver.log"
    server = ManagedProcess(install.argv(MODELS, ["risk", "risk_lite", "work"], port, free_port()), env=env,
                            log_path=log)
    try:
        for _ in range(600):  # bounded: up to 60 s for three Python models to load
            if asyncio.run(probe_ready("127.0.0.1", port, 0.2)):
                break
            assert server.poll() is None, server.log_tail()
            time.sleep(0.1)
        else:
            raise AssertionError(f"tritonserver did not become ready: {server.log_tail()}")
        yield httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=30)
    finally:
        server.stop()


def infer(client: httpclient.InferenceServerClient, model: str, name: str, output: str) -> np.ndarray:
    tensor = httpclient.InferInput(name, list(FEATURES.shape), "FP32")
    tensor.set_data_from_numpy(FEATURES)
    return client.infer(model, [tensor]).as_numpy(output)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_risk_scores_under_numpy_2_as_under_numpy_1(numpy2_server) -> None:
    weights = np.load(MODELS / "risk" / "1" / "weights.npz")
    hidden = FEATURES
    for i in range(2):
        hidden = np.maximum(hidden @ weights[f"w{i}"] + weights[f"b{i}"], 0)
    expected = sigmoid(hidden @ weights["w2"] + weights["b2"])
    np.testing.assert_allclose(infer(numpy2_server, "risk", "features", "score"), expected, rtol=1e-5)


def test_risk_lite_scores_under_numpy_2_as_under_numpy_1(numpy2_server) -> None:
    weights = np.load(MODELS / "risk_lite" / "1" / "weights.npz")
    expected = sigmoid(FEATURES @ weights["w"] + weights["b"])
    np.testing.assert_allclose(infer(numpy2_server, "risk_lite", "features", "score"), expected, rtol=1e-5)


def test_work_echoes_its_input_under_numpy_2(numpy2_server) -> None:
    tensor = httpclient.InferInput("x", list(FEATURES.shape), "FP32")
    tensor.set_data_from_numpy(FEATURES)
    echoed = numpy2_server.infer("work", [tensor], parameters={"work_ms": 0}).as_numpy("y")
    np.testing.assert_array_equal(echoed, FEATURES)
