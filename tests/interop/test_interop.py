#!/usr/bin/env python3
"""Interop suite: Keel as seen by Triton's own Python client and stock gRPC clients.

It starts a real `keel serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0` and proves,
with unmodified client code:

* tritonclient.grpc (Triton's official client) can use Keel as it uses Triton: health,
  server and model metadata, model config, statistics, unary and streaming inference for
  the embedded `simple`, `simple_int8`, `simple_string`, `simple_identity` and `iris`
  models, in the way Triton's example clients do;
* errors arrive with the gRPC status codes Triton clients expect (NOT_FOUND for an unknown
  model, INVALID_ARGUMENT naming the tensor for a malformed one), and Keel keeps serving;
* requests built from tritonclient's raw protobuf stubs (typed `contents`, malformed raw
  tensors) are understood: the wire format is Triton's;
* a tenant's API key sent with tritonclient's `headers={"authorization": "Bearer ..."}` lets
  it in (hashed by `keel hash-key`); no key is UNAUTHENTICATED, another model
  PERMISSION_DENIED;
* `grpc.health.v1.Health` answers as grpcio-health-checking expects;
* gRPC reflection lists the services, and every message, field and RPC Keel describes is
  wire-compatible with tritonclient's own descriptors (Keel's fields are a subset);
* SIGTERM turns health NOT_SERVING and Keel exits 0 within 15 s.

Run it through tests/interop/run.sh, or directly:

    python tests/interop/test_interop.py --keel target/release/keel
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from functools import partial

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

import harness
from harness import RPC_TIMEOUT, STOP_TIMEOUT, KeelProcess

try:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
except ImportError:  # pragma: no cover - requirements.txt installs it
    reflection_pb2 = reflection_pb2_grpc = None

INFERENCE_SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"

KEEL_BINARY: str = ""  # set by main() from --keel


def start_keel(config: str | None = None) -> KeelProcess:
    """Starts the Keel under test (on `config`, else its embedded default), ready."""
    return harness.start_keel(KEEL_BINARY, config)


# --------------------------------------------------------------------------------------
# Request helpers
# --------------------------------------------------------------------------------------


def simple_inputs(in0: np.ndarray, in1: np.ndarray, datatype: str = "INT32"):
    """INPUT0/INPUT1 as Triton's simple_grpc_infer_client.py builds them."""
    inputs = [
        grpcclient.InferInput("INPUT0", list(in0.shape), datatype),
        grpcclient.InferInput("INPUT1", list(in1.shape), datatype),
    ]
    inputs[0].set_data_from_numpy(in0)
    inputs[1].set_data_from_numpy(in1)
    return inputs


def simple_outputs():
    return [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]


def as_bytes_tensor(values: np.ndarray) -> np.ndarray:
    """Integers as a BYTES tensor of decimal strings (as simple_grpc_string_infer_client.py)."""
    flat = np.array([str(x).encode("utf-8") for x in values.reshape(values.size)], dtype=np.object_)
    return flat.reshape(values.shape)


def raw_simple_request(model: str = "simple") -> service_pb2.ModelInferRequest:
    """An empty ModelInferRequest asking for OUTPUT0 and OUTPUT1."""
    req = service_pb2.ModelInferRequest(model_name=model)
    req.outputs.add(name="OUTPUT0")
    req.outputs.add(name="OUTPUT1")
    return req


def raw_int32_input(req, name: str, values, shape=(1, 16), datatype: str = "INT32") -> None:
    """Adds a raw little-endian INT32 input tensor to `req`."""
    req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    req.raw_input_contents.append(np.asarray(values, dtype="<i4").tobytes())


# Descriptor comparison -----------------------------------------------------------------


def index_file(fdp: descriptor_pb2.FileDescriptorProto, messages: dict, enums: dict) -> None:
    """Adds every message and enum of `fdp`, nested ones too, keyed by `.full.name`."""
    prefix = f".{fdp.package}" if fdp.package else ""

    def walk(scope: str, message_types, enum_types) -> None:
        for e in enum_types:
            enums[f"{scope}.{e.name}"] = e
        for m in message_types:
            full = f"{scope}.{m.name}"
            messages[full] = m
            walk(full, m.nested_type, m.enum_type)

    walk(prefix, fdp.message_type, fdp.enum_type)


def compare_descriptors(keel_files, triton_files) -> list[str]:
    """Every wire incompatibility of Keel's descriptors with tritonclient's, as text."""
    keel_msgs, keel_enums, tri_msgs, tri_enums = {}, {}, {}, {}
    for f in keel_files:
        index_file(f, keel_msgs, keel_enums)
    for f in triton_files:
        index_file(f, tri_msgs, tri_enums)

    problems = []
    for full, msg in sorted(keel_msgs.items()):
        theirs = tri_msgs.get(full)
        if theirs is None:
            problems.append(f"message {full}: not in tritonclient")
            continue
        their_fields = {f.name: f for f in theirs.field}
        for f in msg.field:
            t = their_fields.get(f.name)
            if t is None:
                problems.append(f"{full}.{f.name}: no such field in tritonclient")
                continue
            for attr in ("number", "type", "label", "type_name"):
                ours, other = getattr(f, attr), getattr(t, attr)
                if ours != other:
                    problems.append(f"{full}.{f.name}: {attr} is {ours!r} in Keel, {other!r} in tritonclient")
    for full, enum in sorted(keel_enums.items()):
        theirs = tri_enums.get(full)
        if theirs is None:
            problems.append(f"enum {full}: not in tritonclient")
            continue
        their_values = {v.name: v.number for v in theirs.value}
        for v in enum.value:
            if their_values.get(v.name) != v.number:
                problems.append(f"{full}.{v.name} = {v.number} in Keel, "
                                f"{their_values.get(v.name)!r} in tritonclient")

    def services(files):
        return {f".{f.package}.{s.name}": s for f in files for s in f.service}

    keel_services, tri_services = services(keel_files), services(triton_files)
    for full, svc in sorted(keel_services.items()):
        theirs = tri_services.get(full)
        if theirs is None:
            problems.append(f"service {full}: not in tritonclient")
            continue
        their_methods = {m.name: m for m in theirs.method}
        for m in svc.method:
            t = their_methods.get(m.name)
            if t is None:
                problems.append(f"rpc {full}/{m.name}: not in tritonclient")
                continue
            for attr in ("input_type", "output_type", "client_streaming", "server_streaming"):
                if getattr(m, attr) != getattr(t, attr):
                    problems.append(f"rpc {full}/{m.name}: {attr} is {getattr(m, attr)!r} in Keel, "
                                    f"{getattr(t, attr)!r} in tritonclient")
    return problems


# --------------------------------------------------------------------------------------
# The suite against one Keel
# --------------------------------------------------------------------------------------


class InteropTest(unittest.TestCase):
    """Every check against one Keel; tearDownClass stops it and asserts exit code 0."""

    keel: KeelProcess
    client: grpcclient.InferenceServerClient
    channel: grpc.Channel
    stub: service_pb2_grpc.GRPCInferenceServiceStub

    @classmethod
    def setUpClass(cls):
        cls.keel = start_keel()
        try:
            cls.client = grpcclient.InferenceServerClient(cls.keel.address)
            cls.channel = grpc.insecure_channel(cls.keel.address)
            cls.stub = service_pb2_grpc.GRPCInferenceServiceStub(cls.channel)
        except BaseException:
            cls.keel.kill()
            cls.keel.close()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.client.close()
            cls.channel.close()
        finally:
            code, seconds = cls.keel.stop()
        try:
            if code != 0:
                raise AssertionError(f"keel exited with {code} after SIGTERM (None = killed after "
                                     f"{STOP_TIMEOUT:.0f} s), expected 0\n{cls.keel.log_tail()}")
        finally:
            cls.keel.close()
        print(f"\nkeel stopped by SIGTERM: exit 0 after {seconds * 1000:.0f} ms", file=sys.stderr)

    # Helpers ----------------------------------------------------------------------------

    def assert_still_serving(self):
        """One correct `simple` inference: Keel survived whatever the test did."""
        in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
        in1 = np.full((1, 16), 2, dtype=np.int32)
        res = self.client.infer("simple", simple_inputs(in0, in1), outputs=simple_outputs(),
                                client_timeout=RPC_TIMEOUT)
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), in0 + in1)

    def assert_rpc_error(self, call, code: grpc.StatusCode, *needles: str) -> grpc.RpcError:
        with self.assertRaises(grpc.RpcError) as caught:
            call()
        err = caught.exception
        self.assertEqual(err.code(), code, err.details())
        for needle in needles:
            self.assertIn(needle, err.details())
        return err

    def assert_simple_result(self, result, in0, in1, dtype=np.int32):
        out0, out1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
        self.assertEqual(out0.dtype, dtype)
        self.assertEqual(out0.shape, in0.shape)
        self.assertEqual(out1.shape, in0.shape)
        # Element by element, as the example client checks it.
        for b in range(in0.shape[0]):
            for i in range(16):
                self.assertEqual(out0[b][i], in0[b][i] + in1[b][i], f"sum at [{b}][{i}]")
                self.assertEqual(out1[b][i], in0[b][i] - in1[b][i], f"difference at [{b}][{i}]")

    # Health and metadata ----------------------------------------------------------------

    def test_server_live_and_ready(self):
        self.assertTrue(self.client.is_server_live())
        self.assertTrue(self.client.is_server_ready())

    def test_model_ready(self):
        self.assertTrue(self.client.is_model_ready("simple"))
        self.assertFalse(self.client.is_model_ready("nope"))

    def test_banner_lists_embedded_models(self):
        for model in ("identity", "iris", "simple", "simple_identity", "simple_int8", "simple_string"):
            self.assertIn(model, self.keel.models)

    def test_server_metadata(self):
        meta = self.client.get_server_metadata()
        self.assertEqual(meta.name, "keel")
        self.assertTrue(meta.version, "version is empty")

    def test_model_metadata_simple(self):
        meta = self.client.get_model_metadata("simple")
        self.assertEqual(meta.name, "simple")
        self.assertEqual([(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                         [("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])])
        self.assertEqual([t.name for t in meta.outputs], ["OUTPUT0", "OUTPUT1"])

    def test_model_config_simple(self):
        config = self.client.get_model_config("simple", as_json=True)["config"]
        self.assertEqual(config["name"], "simple")
        self.assertEqual(int(config["max_batch_size"]), 8)
        self.assertEqual([i["name"] for i in config["input"]], ["INPUT0", "INPUT1"])
        for tensor in config["input"]:
            self.assertEqual(tensor["data_type"], "TYPE_INT32")
            self.assertEqual([int(d) for d in tensor["dims"]], [16])  # int64 is a string in JSON
        self.assertEqual([o["name"] for o in config["output"]], ["OUTPUT0", "OUTPUT1"])

    def test_repository_index_lists_ready_models(self):
        index = self.client.get_model_repository_index()
        states = {m.name: m.state for m in index.models}
        for model in ("iris", "simple", "simple_identity", "simple_int8", "simple_string"):
            self.assertEqual(states.get(model), "READY", f"{model}: {states}")

    def test_unsupported_rpc_is_unimplemented(self):
        with self.assertRaises(InferenceServerException) as caught:
            self.client.get_system_shared_memory_status()
        self.assertEqual(caught.exception.status(), "StatusCode.UNIMPLEMENTED")

    # Inference with tritonclient --------------------------------------------------------

    def test_simple_infer_as_triton_example_client(self):
        in0 = np.expand_dims(np.arange(start=0, stop=16, dtype=np.int32), axis=0)
        in1 = np.ones(shape=(1, 16), dtype=np.int32)
        inputs = simple_inputs(in0, in1)
        result = self.client.infer(model_name="simple", inputs=inputs, outputs=simple_outputs(),
                                   client_timeout=RPC_TIMEOUT, headers={"test": "1"})
        self.assert_simple_result(result, in0, in1)
        # And with no outputs requested: every output comes back.
        result = self.client.infer(model_name="simple", inputs=inputs, outputs=None)
        self.assert_simple_result(result, in0, in1)

    def test_simple_infer_batch_of_8(self):
        in0 = np.arange(8 * 16, dtype=np.int32).reshape(8, 16)
        in1 = np.arange(8 * 16, dtype=np.int32).reshape(8, 16)[::-1].copy()
        result = self.client.infer("simple", simple_inputs(in0, in1), outputs=simple_outputs())
        self.assert_simple_result(result, in0, in1)

    def test_simple_infer_with_request_id_header(self):
        in0 = np.expand_dims(np.arange(16, dtype=np.int32), axis=0)
        in1 = np.ones((1, 16), dtype=np.int32)
        result = self.client.infer("simple", simple_inputs(in0, in1), outputs=simple_outputs(),
                                   request_id="req-7", headers={"x-request-id": "interop-1"})
        self.assert_simple_result(result, in0, in1)
        self.assertEqual(result.get_response().id, "req-7")

    def test_answers_say_they_come_from_the_primary(self):
        in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
        result = self.client.infer("simple", simple_inputs(in0, in0), outputs=simple_outputs())
        params = result.get_response().parameters
        self.assertFalse(params["keel.degraded"].bool_param)
        self.assertEqual(params["keel.tier"].string_param, "primary")
        self.assertEqual(params["keel.served_by"].string_param, "simple:1")

    def test_request_id_is_echoed_in_metadata(self):
        req = raw_simple_request()
        raw_int32_input(req, "INPUT0", range(16))
        raw_int32_input(req, "INPUT1", [1] * 16)
        _, call = self.stub.ModelInfer.with_call(req, metadata=[("x-request-id", "interop-1")],
                                                 timeout=RPC_TIMEOUT)
        self.assertIn(("x-request-id", "interop-1"), list(call.initial_metadata()))
        # On an error too (trailers-only answer).
        err = self.assert_rpc_error(
            lambda: self.stub.ModelInfer(raw_simple_request("nope"), timeout=RPC_TIMEOUT,
                                         metadata=[("x-request-id", "interop-2")]),
            grpc.StatusCode.NOT_FOUND)
        metadata = list(err.initial_metadata() or ()) + list(err.trailing_metadata() or ())
        self.assertIn(("x-request-id", "interop-2"), [(m.key, m.value) for m in metadata])

    def test_simple_int8(self):
        in0 = np.expand_dims(np.arange(16, dtype=np.int8), axis=0)
        in1 = np.ones((1, 16), dtype=np.int8)
        result = self.client.infer("simple_int8", simple_inputs(in0, in1, "INT8"),
                                   outputs=simple_outputs())
        self.assert_simple_result(result, in0, in1, dtype=np.int8)

    def test_simple_int8_typed_contents_as_explicit_int8_client(self):
        # grpc_explicit_int8_content_client.py: INT8 values in int_contents.
        req = raw_simple_request("simple_int8")
        for name, values in (("INPUT0", list(range(16))), ("INPUT1", [1] * 16)):
            t = req.inputs.add(name=name, datatype="INT8", shape=[1, 16])
            t.contents.int_contents[:] = values
        resp = self.stub.ModelInfer(req, timeout=RPC_TIMEOUT)
        self.assertEqual([o.name for o in resp.outputs], ["OUTPUT0", "OUTPUT1"])
        # As the example reads it: raw_output_contents, one buffer per output.
        out = [np.frombuffer(resp.raw_output_contents[i], dtype=np.int8) for i in range(2)]
        self.assertEqual(list(out[0]), [i + 1 for i in range(16)])
        self.assertEqual(list(out[1]), [i - 1 for i in range(16)])

    def test_simple_string(self):
        # simple_grpc_string_infer_client.py
        in0 = np.expand_dims(np.arange(start=0, stop=16, dtype=np.int32), axis=0)
        in1 = np.ones(shape=(1, 16), dtype=np.int32)
        result = self.client.infer(
            "simple_string", simple_inputs(as_bytes_tensor(in0), as_bytes_tensor(in1), "BYTES"),
            outputs=simple_outputs())
        out0, out1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
        self.assertEqual(out0.shape, (1, 16))
        for i in range(16):
            self.assertIsInstance(out0[0][i], bytes)
            self.assertEqual(out0[0][i], str(in0[0][i] + in1[0][i]).encode())
            self.assertEqual(out1[0][i], str(in0[0][i] - in1[0][i]).encode())
            self.assertEqual(int(out0[0][i]), in0[0][i] + in1[0][i])

    def test_simple_string_bytes_contents(self):
        # grpc_explicit_byte_content_client.py: decimal strings in bytes_contents.
        req = raw_simple_request("simple_string")
        for name, values in (("INPUT0", [str(i).encode() for i in range(16)]),
                             ("INPUT1", [b"1"] * 16)):
            t = req.inputs.add(name=name, datatype="BYTES", shape=[1, 16])
            t.contents.bytes_contents.extend(values)
        resp = self.stub.ModelInfer(req, timeout=RPC_TIMEOUT)
        # As the example reads it: deserialize_bytes_tensor(raw_output_contents[i]).
        out = [deserialize_bytes_tensor(resp.raw_output_contents[i]) for i in range(2)]
        self.assertEqual(list(out[0]), [str(i + 1).encode() for i in range(16)])
        self.assertEqual(list(out[1]), [str(i - 1).encode() for i in range(16)])

    def test_simple_identity(self):
        # simple_grpc_string_infer_client.py's identity_inference, both of its arrays.
        null_chars = np.array(["he\x00llo".encode("utf-8") for _ in range(16)],
                              dtype=np.object_).reshape([1, 16])
        blobs = np.array([b"\x00\x01\x02\x03" for _ in range(16)], dtype=np.bytes_).reshape([1, 16])
        for array in (null_chars, blobs):
            inp = grpcclient.InferInput("INPUT0", list(array.shape), "BYTES")
            inp.set_data_from_numpy(array)
            result = self.client.infer("simple_identity", [inp],
                                       outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])
            out = result.as_numpy("OUTPUT0")
            self.assertEqual(out.shape, array.shape)
            if array.dtype == np.object_:
                self.assertTrue(np.array_equal(array, out), out)
            else:
                self.assertTrue(np.array_equal(array, np.char.encode(out.astype(str))), out)
            self.assertEqual(out[0][0], array[0][0])

    def test_iris(self):
        samples = np.array([[5.1, 3.5, 1.4, 0.2], [7.0, 3.2, 4.7, 1.4], [6.3, 3.3, 6.0, 2.5]],
                           dtype=np.float32)
        inp = grpcclient.InferInput("features", list(samples.shape), "FP32")
        inp.set_data_from_numpy(samples)
        result = self.client.infer("iris", [inp], outputs=[
            grpcclient.InferRequestedOutput("probabilities"), grpcclient.InferRequestedOutput("label")])
        probs, labels = result.as_numpy("probabilities"), result.as_numpy("label")
        self.assertEqual(probs.dtype, np.float32)
        self.assertEqual(probs.shape, (3, 3))
        self.assertEqual(labels.dtype, np.int64)
        self.assertEqual(labels.shape, (3,))
        np.testing.assert_allclose(probs.sum(axis=1), np.ones(3), atol=1e-5)
        self.assertTrue(np.all(probs >= 0))
        self.assertEqual(labels.tolist(), [0, 1, 2])
        self.assertEqual(np.argmax(probs, axis=1).tolist(), labels.tolist())

    # Statistics -------------------------------------------------------------------------

    def test_statistics_count_inferences(self):
        def snapshot():
            stats = self.client.get_inference_statistics("simple")
            self.assertEqual(len(stats.model_stats), 1)
            s = stats.model_stats[0]
            self.assertEqual(s.name, "simple")
            return s.inference_stats.success.count, s.inference_count, s.execution_count

        success0, inferences0, executions0 = snapshot()
        for batch in (1, 3):
            in0 = np.arange(batch * 16, dtype=np.int32).reshape(batch, 16)
            self.client.infer("simple", simple_inputs(in0, in0))
        success1, inferences1, executions1 = snapshot()
        self.assertEqual(success1 - success0, 2, "two successful requests")
        self.assertEqual(inferences1 - inferences0, 4, "batch 1 + batch 3")
        self.assertEqual(executions1 - executions0, 2)

    # Streaming --------------------------------------------------------------------------

    def test_stream_infer_with_a_bad_request_in_the_middle(self):
        answers: queue.Queue = queue.Queue()

        def callback(q, result, error):
            q.put((result, error))

        n, bad = 6, 3
        sent = {}
        self.client.start_stream(callback=partial(callback, answers))
        try:
            for k in range(n):
                in0 = (np.arange(16, dtype=np.int32) + 100 * k).reshape(1, 16)
                in1 = np.full((1, 16), k, dtype=np.int32)
                sent[str(k)] = (in0, in1)
                model = "nope" if k == bad else "simple"
                self.client.async_stream_infer(model, simple_inputs(in0, in1),
                                               outputs=simple_outputs(), request_id=f"stream-{k}")
            received = []
            deadline = time.monotonic() + RPC_TIMEOUT
            while len(received) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.fail(f"only {len(received)} of {n} stream answers within {RPC_TIMEOUT} s")
                try:
                    received.append(answers.get(timeout=remaining))
                except queue.Empty:
                    pass
        finally:
            self.client.stop_stream()

        # Keel answers in request order, so answer k belongs to request k.
        for k, (result, error) in enumerate(received):
            with self.subTest(request=k):
                if k == bad:
                    self.assertIsNone(result)
                    self.assertIsInstance(error, InferenceServerException)
                    self.assertIn("nope", error.message())
                    continue
                self.assertIsNone(error, error and error.message())
                self.assertEqual(result.get_response().id, f"stream-{k}")
                self.assertEqual(result.get_response().model_name, "simple")
                self.assert_simple_result(result, *sent[str(k)])
        self.assert_still_serving()

    def test_stream_error_names_its_request(self):
        # The raw stream: an error answer carries the failed request's id and model.
        def requests():
            for k, model in enumerate(("simple", "nope", "simple")):
                req = raw_simple_request(model)
                req.id = f"raw-{k}"
                raw_int32_input(req, "INPUT0", range(16))
                raw_int32_input(req, "INPUT1", [1] * 16)
                yield req

        answers = list(self.stub.ModelStreamInfer(requests(), timeout=RPC_TIMEOUT))
        self.assertEqual([a.infer_response.id for a in answers], ["raw-0", "raw-1", "raw-2"])
        self.assertEqual([bool(a.error_message) for a in answers], [False, True, False])
        self.assertIn("nope", answers[1].error_message)
        self.assertEqual(answers[1].infer_response.model_name, "nope")
        # Every answer is the request's last, flagged as Triton flags it, so clients that
        # read until the final response (PyTriton, decoupled-model loops) stop waiting.
        for a in answers:
            self.assertTrue(a.infer_response.parameters["triton_final_response"].bool_param)
        sums = np.frombuffer(answers[2].infer_response.raw_output_contents[0], dtype="<i4")
        self.assertEqual(sums.tolist(), [i + 1 for i in range(16)])

    # Errors -----------------------------------------------------------------------------

    def test_unknown_model_is_not_found(self):
        in0 = np.zeros((1, 16), dtype=np.int32)
        with self.assertRaises(InferenceServerException) as caught:
            self.client.infer("nope", simple_inputs(in0, in0), client_timeout=RPC_TIMEOUT)
        self.assertEqual(caught.exception.status(), "StatusCode.NOT_FOUND")
        self.assertIn("nope", caught.exception.message())
        with self.assertRaises(InferenceServerException) as caught:
            self.client.get_model_metadata("nope")
        self.assertEqual(caught.exception.status(), "StatusCode.NOT_FOUND")
        self.assert_still_serving()

    def test_raw_content_of_wrong_size_is_invalid_argument(self):
        req = raw_simple_request()
        req.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
        req.raw_input_contents.append(b"\x01" * 60)  # 16 INT32 need 64 bytes
        raw_int32_input(req, "INPUT1", [1] * 16)
        self.assert_rpc_error(lambda: self.stub.ModelInfer(req, timeout=RPC_TIMEOUT),
                              grpc.StatusCode.INVALID_ARGUMENT, "INPUT0")
        self.assert_still_serving()

    def test_unknown_datatype_is_invalid_argument(self):
        req = raw_simple_request()
        raw_int32_input(req, "INPUT0", range(16), datatype="FLOAT")
        raw_int32_input(req, "INPUT1", [1] * 16)
        self.assert_rpc_error(lambda: self.stub.ModelInfer(req, timeout=RPC_TIMEOUT),
                              grpc.StatusCode.INVALID_ARGUMENT, "INPUT0", "FLOAT")
        self.assert_still_serving()

    def test_missing_input_is_invalid_argument(self):
        req = raw_simple_request()
        raw_int32_input(req, "INPUT0", range(16))
        self.assert_rpc_error(lambda: self.stub.ModelInfer(req, timeout=RPC_TIMEOUT),
                              grpc.StatusCode.INVALID_ARGUMENT, "INPUT1")
        self.assert_still_serving()

    # Typed contents ---------------------------------------------------------------------

    def test_typed_int_contents_answer_raw_as_triton_does(self):
        # grpc_explicit_int_content_client.py: INT32 values in int_contents, the answer
        # read from raw_output_contents (Triton always answers raw).
        req = raw_simple_request()
        for name, values in (("INPUT0", list(range(16))), ("INPUT1", [1] * 16)):
            t = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
            t.contents.int_contents[:] = values
        self.assertEqual(len(req.raw_input_contents), 0)
        resp = self.stub.ModelInfer(req, timeout=RPC_TIMEOUT)
        self.assertEqual([(o.name, o.datatype, list(o.shape)) for o in resp.outputs],
                         [("OUTPUT0", "INT32", [1, 16]), ("OUTPUT1", "INT32", [1, 16])])
        self.assertEqual(len(resp.raw_output_contents), 2, "answer should be raw, as Triton's")
        out = [np.frombuffer(resp.raw_output_contents[i], dtype=np.int32) for i in range(2)]
        self.assertEqual(list(out[0]), [i + 1 for i in range(16)])
        self.assertEqual(list(out[1]), [i - 1 for i in range(16)])

    # grpc.health.v1 ---------------------------------------------------------------------

    def test_health_check(self):
        health = health_pb2_grpc.HealthStub(self.channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", INFERENCE_SERVICE):
            with self.subTest(service=service):
                resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
                self.assertEqual(resp.status, serving)
        self.assert_rpc_error(
            lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"),
                                 timeout=RPC_TIMEOUT),
            grpc.StatusCode.NOT_FOUND)

    # Reflection -------------------------------------------------------------------------

    def reflect(self, **request) -> reflection_pb2.ServerReflectionResponse:
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        answers = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=RPC_TIMEOUT))
        self.assertEqual(len(answers), 1)
        answer = answers[0]
        self.assertFalse(answer.HasField("error_response"), answer.error_response.error_message)
        return answer

    @unittest.skipIf(reflection_pb2 is None, "grpcio-reflection is not installed")
    def test_reflection_lists_services(self):
        answer = self.reflect(list_services="")
        names = {s.name for s in answer.list_services_response.service}
        self.assertIn(INFERENCE_SERVICE, names)
        self.assertIn(HEALTH_SERVICE, names)

    @unittest.skipIf(reflection_pb2 is None, "grpcio-reflection is not installed")
    def test_reflection_descriptors_match_tritonclient(self):
        answer = self.reflect(file_containing_symbol=INFERENCE_SERVICE)
        files = {}
        for blob in answer.file_descriptor_response.file_descriptor_proto:
            fdp = descriptor_pb2.FileDescriptorProto.FromString(blob)
            files[fdp.name] = fdp
        # Fetch any dependency the server did not send along.
        pending = [d for f in list(files.values()) for d in f.dependency if d not in files]
        while pending:
            name = pending.pop()
            if name in files:
                continue
            for blob in self.reflect(file_by_filename=name).file_descriptor_response.file_descriptor_proto:
                fdp = descriptor_pb2.FileDescriptorProto.FromString(blob)
                files[fdp.name] = fdp
                pending.extend(d for d in fdp.dependency if d not in files)
        keel_files = [f for f in files.values() if f.package == "inference"]
        self.assertTrue(any(s.name == "GRPCInferenceService" for f in keel_files for s in f.service))
        self.assertTrue(any(m.name == "ModelConfig" for f in keel_files for m in f.message_type),
                        "model_config's messages not found")

        triton_files = []
        for module in (service_pb2, model_config_pb2):
            fdp = descriptor_pb2.FileDescriptorProto()
            module.DESCRIPTOR.CopyToProto(fdp)
            triton_files.append(fdp)

        compared = sum(len(f.message_type) for f in keel_files)
        self.assertGreater(compared, 40, "suspiciously few messages")
        problems = compare_descriptors(keel_files, triton_files)
        self.assertEqual(problems, [], "Keel's protos are not wire-compatible with tritonclient's:\n"
                         + "\n".join(problems))


# --------------------------------------------------------------------------------------
# Shutdown, on a Keel of its own
# --------------------------------------------------------------------------------------


class DegradationTest(unittest.TestCase):
    """tritonclient reads the degraded labels of an answer from the fallback ladder."""

    def test_a_static_fallback_answer_is_labelled_degraded(self):
        # A port nothing listens on: the upstream refuses every connection.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(
                f'[upstreams.down]\nendpoints = ["127.0.0.1:{dead}"]\n'
                '[models.simple]\nbackend = "down"\n'
                'fallback = [{ static = [{ name = "OUTPUT0", datatype = "INT32", shape = [1, 16], '
                'data = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] }] }]\n'
            )
            config = f.name
        keel = start_keel(config)
        try:
            client = grpcclient.InferenceServerClient(keel.address)
            try:
                in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
                result = client.infer("simple", simple_inputs(in0, in0),
                                      outputs=[grpcclient.InferRequestedOutput("OUTPUT0")],
                                      client_timeout=RPC_TIMEOUT)
                params = result.get_response().parameters
                self.assertTrue(params["keel.degraded"].bool_param)
                self.assertEqual(params["keel.tier"].string_param, "static")
                self.assertEqual(params["keel.degraded_reason"].string_param, "unavailable")
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"),
                                              np.zeros((1, 16), dtype=np.int32))
            finally:
                client.close()
        finally:
            code, _ = keel.stop()
            keel.close()
            os.unlink(config)
        self.assertEqual(code, 0)


class TenantTest(unittest.TestCase):
    """tritonclient sends a tenant's API key as `authorization: Bearer <key>` metadata."""

    def test_a_bearer_header_lets_a_tenant_in_and_no_header_is_unauthenticated(self):
        key = "interop-tenant-key"
        hashed = subprocess.run([KEEL_BINARY, "hash-key"], input=key, capture_output=True,
                                text=True, timeout=RPC_TIMEOUT, check=True).stdout.strip()
        self.assertEqual(hashed, "sha256:" + hashlib.sha256(key.encode()).hexdigest())
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(f'[tenants.interop]\napi_keys = ["{hashed}"]\nmodels = ["simple"]\n')
            config = f.name
        keel = start_keel(config)
        try:
            client = grpcclient.InferenceServerClient(keel.address)
            try:
                in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
                result = client.infer("simple", simple_inputs(in0, in0), outputs=simple_outputs(),
                                      client_timeout=RPC_TIMEOUT,
                                      headers={"authorization": f"Bearer {key}"})
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), in0 + in0)
                with self.assertRaises(InferenceServerException) as caught:
                    client.infer("simple", simple_inputs(in0, in0), client_timeout=RPC_TIMEOUT)
                self.assertEqual(caught.exception.status(), "StatusCode.UNAUTHENTICATED")
                with self.assertRaises(InferenceServerException) as caught:
                    client.get_model_metadata("iris", headers={"authorization": f"Bearer {key}"})
                self.assertEqual(caught.exception.status(), "StatusCode.PERMISSION_DENIED")
            finally:
                client.close()
        finally:
            code, _ = keel.stop()
            keel.close()
            os.unlink(config)
        self.assertEqual(code, 0)


class ShutdownTest(unittest.TestCase):
    """SIGTERM: health turns NOT_SERVING, then Keel exits 0 within 15 s."""

    def test_sigterm_turns_health_not_serving_and_exits_0(self):
        keel = start_keel()
        try:
            channel = grpc.insecure_channel(keel.address)
            health = health_pb2_grpc.HealthStub(channel)
            # A Watch opened before SIGTERM sees the transition itself.
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=STOP_TIMEOUT)
            try:
                self.assertEqual(next(watch).status, health_pb2.HealthCheckResponse.SERVING)
                keel.terminate()
                self.assertEqual(next(watch).status, health_pb2.HealthCheckResponse.NOT_SERVING)
            finally:
                watch.cancel()
                channel.close()

            # A new Check now: NOT_SERVING, or no connection at all once Keel has closed.
            channel = grpc.insecure_channel(keel.address)
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5)
                self.assertEqual(resp.status, health_pb2.HealthCheckResponse.NOT_SERVING)
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE, e.details())
            finally:
                channel.close()

            code, seconds = keel.wait_exit(STOP_TIMEOUT)
            self.assertIsNotNone(code, f"keel still running {STOP_TIMEOUT:.0f} s after SIGTERM (killed)\n"
                                 + keel.log_tail())
            self.assertEqual(code, 0, keel.log_tail())
            self.assertLess(seconds, STOP_TIMEOUT)
        finally:
            keel.kill()
            keel.close()


# --------------------------------------------------------------------------------------


def main() -> int:
    global KEEL_BINARY
    args = harness.parse_args(__doc__)
    KEEL_BINARY = args.keel
    # The shutdown test runs last, on its own Keel.
    return harness.run_suite("interop", [InteropTest, DegradationTest, TenantTest, ShutdownTest],
                             args.pattern)


if __name__ == "__main__":
    sys.exit(main())
