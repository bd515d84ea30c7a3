#!/usr/bin/env python3
"""MLServer interop: tritonclient through Keel to a real MLServer serving scikit-learn.

At the start it trains a logistic regression on scikit-learn's built-in iris data, saves it
with joblib as MLServer's scikit-learn runtime loads it (`mlserver_sklearn.SKLearnModel`),
starts `mlserver start` on OS-chosen loopback ports with `parallel_workers = 0` (the model
runs in MLServer's main process, so SIGSTOP stops inference), and a `keel serve` whose
policy forwards the model `iris-sklearn` to it. Then, with tritonclient against Keel:

* ModelMetadata is MLServer's own, as MLServer answers it directly;
* inference of iris rows answers exactly what the model's `predict` answers in this process,
  and a request for `predict_proba` (which MLServer's metadata does not list) what
  `predict_proba` answers: Keel lets the upstream decide (`strict_outputs` off);
* a tensor of the wrong datatype or shape for MLServer's declared input is INVALID_ARGUMENT
  from Keel (Keel's ErrorInfo and BadRequest naming the field, the request id echoed), and
  MLServer's own metrics show it never received it;
* with MLServer stopped (SIGSTOP), a call with a 1 s timeout is DEADLINE_EXCEEDED after 1 s,
  and so is one with a 10 s timeout, by Keel's own 1 s deadline for the model (the policy's
  `timeout`; Keel's ErrorInfo): Keel never hangs on a silent upstream. After SIGCONT Keel
  serves again, answering what scikit-learn answers.

Run it through tests/interop/run.sh, or directly with the interop virtualenv:

    target/interop-venv/bin/python tests/interop/test_mlserver.py --keel target/release/keel
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import grpc
import joblib
import numpy as np
import tritonclient.grpc as grpcclient
from google.rpc import error_details_pb2, status_pb2
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import harness
from harness import RPC_TIMEOUT, STOP_TIMEOUT, KeelProcess

MODEL = "iris-sklearn"  # not `iris`: that is the name of Keel's embedded model
UPSTREAM = "mlserver"
INPUT = "input-0"  # the name MLServer gives a model's first input

# MLServer imports pandas, scikit-learn, FastAPI and OpenTelemetry before it listens: seconds
# on a warm machine, more on a fresh one.
MLSERVER_START_TIMEOUT = 180.0
DEADLINE = 1.0  # the client timeout of the call to a stopped MLServer
DEADLINE_SLACK = 0.5  # how late its DEADLINE_EXCEEDED may arrive
RESUME_TIMEOUT = 30.0  # from SIGCONT until Keel serves again

# Three rows of each class, the first and last of each block of 50 and one from inside it.
ROWS = [0, 25, 49, 50, 77, 99, 100, 133, 149]

KEEL_BINARY: str = ""  # set by main() from --keel


# --------------------------------------------------------------------------------------
# The model and MLServer
# --------------------------------------------------------------------------------------


def train(model_dir: str) -> LogisticRegression:
    """Trains the iris model, saves it for MLServer with its model-settings.json, returns it.

    The settings declare the input and the `predict` output, as an operator would: Keel
    checks requests against the declared input, and the declared outputs leave out
    `predict_proba`, which the runtime answers anyway.
    """
    features, labels = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=1000).fit(features, labels)
    os.makedirs(model_dir)
    joblib.dump(model, os.path.join(model_dir, "model.joblib"))
    settings = {
        "name": MODEL,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "inputs": [{"name": INPUT, "datatype": "FP64", "shape": [-1, 4]}],
        "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1, 1]}],
        "parameters": {"uri": "./model.joblib"},
    }
    with open(os.path.join(model_dir, "model-settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
    return model


class MLServerProcess:
    """`mlserver start` on a model repository, its three listeners on free loopback ports.

    Its output goes to a temporary file that is shown when something goes wrong.
    """

    def __init__(self, repository: str):
        self.grpc_port, self.http_port, self.metrics_port = (harness.free_port() for _ in range(3))
        settings = {
            "host": "127.0.0.1",
            "grpc_port": self.grpc_port,
            "http_port": self.http_port,
            "metrics_port": self.metrics_port,
            # The model in MLServer's own process: SIGSTOP must stop inference itself.
            "parallel_workers": 0,
            "debug": False,
        }
        with open(os.path.join(repository, "settings.json"), "w") as f:
            json.dump(settings, f, indent=2)
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.log = tempfile.NamedTemporaryFile(prefix="mlserver-interop-", suffix=".log", delete=False)
        # The `mlserver` command of the interpreter running this file (the interop venv).
        command = os.path.join(os.path.dirname(sys.executable), "mlserver")
        self.proc = subprocess.Popen([command, "start", repository], cwd=repository,
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = MLSERVER_START_TIMEOUT) -> None:
        """Polls MLServer's own ModelReady until the model is loaded, MLServer dies or
        `timeout` passes."""
        client = grpcclient.InferenceServerClient(self.address)
        try:
            def ready():
                if self.proc.poll() is not None:
                    raise AssertionError(f"mlserver exited with {self.proc.returncode}\n"
                                         + self.log_tail())
                try:
                    return True if client.is_model_ready(MODEL, client_timeout=RPC_TIMEOUT) else None
                except InferenceServerException:
                    return None  # not listening yet

            try:
                harness.poll(ready, timeout, "mlserver's model ready", interval=0.2)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{self.log_tail()}") from None
        finally:
            client.close()

    def metrics(self) -> str:
        return harness.scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def infer_calls(self) -> float:
        """ModelInfer calls MLServer's gRPC server has started handling (its own metric)."""
        return harness.metric(self.metrics(), "grpc_server_started_total",
                              grpc_service="inference.GRPCInferenceService",
                              grpc_method="ModelInfer")

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM, kill on timeout."""
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        os.unlink(self.log.name)

    def log_tail(self, lines: int = 40) -> str:
        return harness.file_tail(self.log, "mlserver's log", lines)


# --------------------------------------------------------------------------------------
# One MLServer and one Keel for the module
# --------------------------------------------------------------------------------------

class Servers:
    """What setUpModule starts for every test: the model, MLServer serving it, Keel in front."""

    workdir: str
    sklearn: LogisticRegression
    mlserver: MLServerProcess
    keel: KeelProcess


UP = Servers()


def setUpModule():
    UP.workdir = tempfile.mkdtemp(prefix="keel-mlserver-")
    repository = os.path.join(UP.workdir, "models")
    try:
        UP.sklearn = train(os.path.join(repository, MODEL))
        UP.mlserver = MLServerProcess(repository)
    except BaseException:
        shutil.rmtree(UP.workdir, ignore_errors=True)
        raise
    try:
        UP.mlserver.wait_ready()
        # One inference straight to MLServer, so whatever it does lazily on its first call
        # is done before Keel's 1 s deadline for the model applies.
        direct = grpcclient.InferenceServerClient(UP.mlserver.address)
        try:
            direct.infer(MODEL, [iris_input(iris_rows())], client_timeout=MLSERVER_START_TIMEOUT)
        finally:
            direct.close()
        config = os.path.join(UP.workdir, "keel.toml")
        with open(config, "w") as f:
            # No load balancer to drain: stop at once on SIGTERM.
            f.write('[server]\ndrain_grace = "100ms"\n\n'
                    f'[upstreams.{UPSTREAM}]\nendpoints = ["{UP.mlserver.address}"]\n\n'
                    f'[models.{MODEL}]\nbackend = "{UPSTREAM}"\n'
                    # Keel's own deadline for calls that bring a longer one (StoppedUpstreamTest).
                    f'timeout = "{DEADLINE:g}s"\n')
        UP.keel = harness.start_keel(KEEL_BINARY, config)
    except BaseException:
        UP.mlserver.stop()
        shutil.rmtree(UP.workdir, ignore_errors=True)
        raise


def tearDownModule():
    """Stops both; Keel must exit 0 on SIGTERM (an error of the run otherwise)."""
    try:
        code, _ = UP.keel.stop()
        if code != 0:
            raise AssertionError(f"keel exited with {code} after SIGTERM\n{UP.keel.log_tail()}")
    finally:
        UP.keel.close()
        UP.mlserver.stop()
        shutil.rmtree(UP.workdir, ignore_errors=True)


def iris_rows() -> np.ndarray:
    return load_iris().data[ROWS]


def iris_input(rows: np.ndarray, datatype: str = "FP64") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(INPUT, list(rows.shape), datatype)
    inp.set_data_from_numpy(rows)
    return inp


def raw_request(rows: np.ndarray, datatype: str) -> service_pb2.ModelInferRequest:
    """A raw ModelInferRequest of `rows` as `datatype`, its shape whatever `rows` has."""
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name=INPUT, datatype=datatype, shape=list(rows.shape))
    req.raw_input_contents.append(rows.tobytes())
    return req


# --------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------


class ForwardingTest(unittest.TestCase):
    """Keel in front of a healthy MLServer."""

    def setUp(self):
        self.client = grpcclient.InferenceServerClient(UP.keel.address)
        self.channel = grpc.insecure_channel(UP.keel.address)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def tearDown(self):
        self.client.close()
        self.channel.close()

    def test_model_metadata_is_mlservers(self):
        meta = self.client.get_model_metadata(MODEL, client_timeout=RPC_TIMEOUT)
        self.assertEqual(meta.name, MODEL)
        self.assertEqual([(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                         [(INPUT, "FP64", [-1, 4])])
        self.assertEqual([(t.name, t.datatype, list(t.shape)) for t in meta.outputs],
                         [("predict", "INT64", [-1, 1])])
        direct = grpcclient.InferenceServerClient(UP.mlserver.address)
        try:
            self.assertEqual(meta, direct.get_model_metadata(MODEL, client_timeout=RPC_TIMEOUT))
        finally:
            direct.close()
        self.assertTrue(self.client.is_model_ready(MODEL, client_timeout=RPC_TIMEOUT))

    def test_inference_equals_sklearns_predict(self):
        rows = iris_rows()
        expected = UP.sklearn.predict(rows)
        self.assertEqual(set(expected.tolist()), {0, 1, 2}, "the rows should cover every class")
        result = self.client.infer(MODEL, [iris_input(rows)], client_timeout=RPC_TIMEOUT)
        answer = result.as_numpy("predict")
        self.assertEqual(answer.dtype, np.int64)
        self.assertEqual(answer.shape, (len(ROWS), 1))
        np.testing.assert_array_equal(answer.reshape(-1), expected)
        self.assertEqual(result.get_response().model_name, MODEL)
        self.assertEqual(result.get_response().parameters["keel.tier"].string_param, "primary")

    def test_predict_proba_is_answered_though_metadata_lists_only_predict(self):
        rows = iris_rows()
        result = self.client.infer(MODEL, [iris_input(rows)],
                                   outputs=[grpcclient.InferRequestedOutput("predict_proba")],
                                   client_timeout=RPC_TIMEOUT)
        self.assertEqual([o.name for o in result.get_response().outputs], ["predict_proba"])
        proba = result.as_numpy("predict_proba")
        self.assertEqual(proba.dtype, np.float64)
        self.assertEqual(proba.shape, (len(ROWS), 3))
        np.testing.assert_allclose(proba, UP.sklearn.predict_proba(rows), rtol=1e-12, atol=0)
        np.testing.assert_allclose(proba.sum(axis=1), np.ones(len(ROWS)), atol=1e-9)

    def test_a_bad_tensor_is_refused_by_keel_and_never_reaches_mlserver(self):
        rows = iris_rows()
        bad = [
            # FP32 where MLServer declares FP64 (MLServer itself would take it and answer).
            ("datatype", raw_request(rows.astype(np.float32), "FP32"), "inputs[0].datatype",
             ["FP32", "FP64"]),
            # Three features where MLServer declares four.
            ("shape", raw_request(rows[:, :3].copy(), "FP64"), "inputs[0].shape",
             [f"[{len(ROWS)}, 3]"]),
        ]
        before = UP.mlserver.infer_calls()
        for rule, req, field, needles in bad:
            with self.subTest(rule=rule):
                request_id = f"mlserver-bad-{rule}"
                with self.assertRaises(grpc.RpcError) as caught:
                    self.stub.ModelInfer(req, timeout=RPC_TIMEOUT,
                                         metadata=[("x-request-id", request_id)])
                err = caught.exception
                self.assertEqual(err.code(), grpc.StatusCode.INVALID_ARGUMENT, err.details())
                for needle in [INPUT, rule, *needles]:
                    self.assertIn(needle, err.details())
                trailers = {m.key: m.value for m in err.trailing_metadata()}
                self.assertEqual(trailers.get("x-request-id"), request_id)
                info, violations = keel_error(trailers)
                self.assertEqual(info.reason, "INVALID_REQUEST")
                self.assertEqual(info.metadata["model"], MODEL)
                self.assertEqual(info.metadata["upstream"], UPSTREAM)
                self.assertEqual(info.metadata["class"], "client_error")
                self.assertEqual([v.field for v in violations], [field])
        self.assertEqual(UP.mlserver.infer_calls(), before,
                         "MLServer received a request Keel should have refused")
        # The same counter moves for a request Keel does forward, so it could have failed.
        self.client.infer(MODEL, [iris_input(rows)], client_timeout=RPC_TIMEOUT)
        self.assertEqual(UP.mlserver.infer_calls(), before + 1)


class StoppedUpstreamTest(unittest.TestCase):
    """MLServer stopped with SIGSTOP: its socket accepts, nothing answers. Runs after
    ForwardingTest, whose MLServer counters the calls it leaves queued would disturb."""

    def test_sigstop_is_deadline_exceeded_on_time_and_sigcont_serves_again(self):
        client = grpcclient.InferenceServerClient(UP.keel.address)
        channel = grpc.insecure_channel(UP.keel.address)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        rows = iris_rows()
        try:
            # The forward path works, and Keel has MLServer's contract, before the stop.
            client.infer(MODEL, [iris_input(rows)], client_timeout=RPC_TIMEOUT)

            UP.mlserver.pause()
            try:
                # 1. The client's own 1 s deadline, which Keel carries upstream. Keel's copy
                #    of it (from grpc-timeout) ends within a few ms of the client's own, so
                #    either may answer first; the client sees DEADLINE_EXCEEDED on time.
                start = time.monotonic()
                with self.assertRaises(InferenceServerException) as caught:
                    client.infer(MODEL, [iris_input(rows)], client_timeout=DEADLINE)
                self.assert_on_time(time.monotonic() - start)
                self.assertEqual(caught.exception.status(), "StatusCode.DEADLINE_EXCEEDED",
                                 caught.exception.message())

                # 2. A client that would wait 10 s: Keel's own 1 s deadline for the model
                #    (the policy's `timeout`) answers, so Keel itself never hangs.
                start = time.monotonic()
                with self.assertRaises(grpc.RpcError) as caught:
                    stub.ModelInfer(raw_request(rows, "FP64"), timeout=RPC_TIMEOUT,
                                    metadata=[("x-request-id", "mlserver-stopped")])
                self.assert_on_time(time.monotonic() - start)
                err = caught.exception
                self.assertEqual(err.code(), grpc.StatusCode.DEADLINE_EXCEEDED, err.details())
                trailers = {m.key: m.value for m in err.trailing_metadata()}
                self.assertEqual(trailers.get("x-request-id"), "mlserver-stopped")
                info, _ = keel_error(trailers)
                self.assertEqual(info.reason, "DEADLINE_EXCEEDED")
                self.assertEqual(info.metadata["upstream"], UPSTREAM)
                self.assertEqual(info.metadata["model"], MODEL)
            finally:
                UP.mlserver.resume()

            expected = UP.sklearn.predict(rows)

            def served():
                try:
                    result = client.infer(MODEL, [iris_input(rows)], client_timeout=RPC_TIMEOUT)
                except InferenceServerException:
                    return None
                return result.as_numpy("predict").reshape(-1)

            answer = harness.poll(served, RESUME_TIMEOUT, "keel serving after SIGCONT")
            np.testing.assert_array_equal(answer, expected)
        finally:
            client.close()
            channel.close()

    def assert_on_time(self, elapsed: float) -> None:
        self.assertGreaterEqual(elapsed, DEADLINE - 0.1, "DEADLINE_EXCEEDED came early")
        self.assertLess(elapsed, DEADLINE + DEADLINE_SLACK, "DEADLINE_EXCEEDED came late")


def keel_error(trailers: dict) -> tuple[error_details_pb2.ErrorInfo, list]:
    """Keel's ErrorInfo (domain `keel`) and BadRequest field violations from an error's
    `grpc-status-details-bin`; fails the test if there is no Keel ErrorInfo."""
    blob = trailers.get("grpc-status-details-bin")
    if blob is None:
        raise AssertionError(f"no grpc-status-details-bin in {sorted(trailers)}")
    status = status_pb2.Status.FromString(blob)
    info, violations = None, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(bad.field_violations)
    if info is None or info.domain != "keel":
        raise AssertionError(f"not Keel's error: {status}")
    return info, violations


def main() -> int:
    global KEEL_BINARY
    args = harness.parse_args(__doc__)
    KEEL_BINARY = args.keel
    return harness.run_suite("mlserver", [ForwardingTest, StoppedUpstreamTest], args.pattern)


if __name__ == "__main__":
    sys.exit(main())
