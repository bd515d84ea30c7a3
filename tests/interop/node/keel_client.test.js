'use strict';
// Keel as a Node.js client sees it: @grpc/grpc-js with @grpc/proto-loader on Keel's own protos
// (proto/inference/grpc_service.proto) and gRPC's grpc.health.v1 (a copy in proto/ here, as
// Keel's proto/ has none), against a real `keel serve` on its embedded models.
//
// Run it through tests/interop/node/run.sh, which installs the pinned packages with `npm ci`
// into target/interop-node, or by hand:
//
//   KEEL_BINARY=target/release/keel NODE_PATH=target/interop-node/node_modules \
//     node --test tests/interop/node/keel_client.test.js
//
// Every wait is bounded; nothing sleeps for a fixed time. Keel is stopped by SIGTERM at the
// end (killed after 15 s) and must exit 0.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const path = require('node:path');
const readline = require('node:readline');
const { setTimeout: sleep } = require('node:timers/promises');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..', '..');
const STARTUP_TIMEOUT_MS = 60_000; // until Keel prints its listening line
const READY_TIMEOUT_MS = 30_000; // until ServerReady answers true
const RPC_TIMEOUT_MS = 10_000; // any single call
const STOP_TIMEOUT_MS = 15_000; // from SIGTERM to exit
const POLL_INTERVAL_MS = 50;
const LISTENING = /^keel \S+ listening on (\S+) \(gRPC, OIP v2\), admin on (\S+), serving models: (.*)$/;

const definition = protoLoader.loadSync(
  ['inference/grpc_service.proto', 'grpc/health/v1/health.proto'],
  {
    includeDirs: [path.join(REPO, 'proto'), path.join(__dirname, 'proto')],
    keepCase: true, // the proto's field names, as every other OIP client uses them
    longs: Number, // shapes are int64; ours are small
    enums: String,
    defaults: true,
    oneofs: true,
  },
);
const proto = grpc.loadPackageDefinition(definition);

let keel; // { proc, address, models, exited: Promise<{code, signal}> }
let inference; // inference.GRPCInferenceService client
let health; // grpc.health.v1.Health client
let stderr = ''; // Keel's logs, shown when something goes wrong

function keelLogTail(lines = 30) {
  return `--- last lines of keel's log ---\n${stderr.split('\n').slice(-lines).join('\n')}`;
}

/** Starts `keel serve` on ephemeral loopback ports; resolves when it prints its banner. */
function startKeel(binary) {
  const proc = spawn(binary, ['serve', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  proc.stderr.setEncoding('utf8');
  proc.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-64 * 1024);
  });
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const banner = new Promise((resolve, reject) => {
    const seen = [];
    const timer = setTimeout(
      () => reject(new Error(`keel printed no listening line within ${STARTUP_TIMEOUT_MS} ms; stdout: ${seen}\n${keelLogTail()}`)),
      STARTUP_TIMEOUT_MS,
    );
    proc.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    exited.then(({ code }) => {
      clearTimeout(timer);
      reject(new Error(`keel exited with ${code} before listening\n${keelLogTail()}`));
    });
    readline.createInterface({ input: proc.stdout }).on('line', (line) => {
      seen.push(line);
      const m = LISTENING.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve({ address: m[1], admin: m[2], models: m[3].split(',').map((s) => s.trim()) });
      }
    });
  });
  return { proc, exited, banner };
}

/** One unary call with a deadline, as a promise; rejects with the grpc-js error. */
function call(client, method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + RPC_TIMEOUT_MS }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

/** Calls `fn` and expects it to reject with `code`; returns the error. */
async function rejectsWith(fn, code) {
  try {
    await fn();
  } catch (err) {
    assert.equal(err.code, code, `expected ${grpc.status[code]}, got ${grpc.status[err.code]}: ${err.details}`);
    return err;
  }
  assert.fail(`expected ${grpc.status[code]}, the call succeeded`);
}

function int32Buffer(values) {
  const buf = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => buf.writeInt32LE(v, i * 4));
  return buf;
}

function int32Values(buf) {
  assert.equal(buf.length % 4, 0, `raw INT32 buffer of ${buf.length} bytes`);
  return Array.from({ length: buf.length / 4 }, (_, i) => buf.readInt32LE(i * 4));
}

before(async () => {
  const binary = process.env.KEEL_BINARY;
  assert.ok(binary, 'KEEL_BINARY must name the keel binary');
  const started = startKeel(path.resolve(binary));
  keel = { proc: started.proc, exited: started.exited };
  Object.assign(keel, await started.banner);
  for (const where of [keel.address, keel.admin]) {
    assert.match(where, /^127\.0\.0\.1:\d+$/, `keel listens on ${where}, not on 127.0.0.1`);
  }
  const insecure = grpc.credentials.createInsecure();
  inference = new proto.inference.GRPCInferenceService(keel.address, insecure);
  health = new proto.grpc.health.v1.Health(keel.address, insecure);

  // Poll ServerReady until it answers true, bounded.
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    try {
      if ((await call(inference, 'ServerReady', {})).ready) break;
    } catch (_) {
      // not serving yet
    }
    if (Date.now() > deadline) assert.fail(`keel not ready within ${READY_TIMEOUT_MS} ms\n${keelLogTail()}`);
    await sleep(POLL_INTERVAL_MS);
  }
});

after(async () => {
  inference?.close();
  health?.close();
  if (!keel) return;
  if (keel.proc.exitCode === null && keel.proc.signalCode === null) keel.proc.kill('SIGTERM');
  let timer;
  const timeout = new Promise((resolve) => {
    timer = setTimeout(() => resolve(null), STOP_TIMEOUT_MS);
  });
  const exit = await Promise.race([keel.exited, timeout]);
  clearTimeout(timer);
  if (exit === null) {
    keel.proc.kill('SIGKILL');
    await keel.exited;
    assert.fail(`keel still running ${STOP_TIMEOUT_MS} ms after SIGTERM (killed)\n${keelLogTail()}`);
  }
  assert.deepEqual(exit, { code: 0, signal: null }, `keel's exit after SIGTERM\n${keelLogTail()}`);
});

test('ServerMetadata names keel and its version', async () => {
  const meta = await call(inference, 'ServerMetadata', {});
  assert.equal(meta.name, 'keel');
  assert.match(meta.version, /^\d+\.\d+\.\d+/);
  assert.ok(keel.models.includes('simple'), `banner lists ${keel.models}`);
});

test('ModelMetadata of simple is its contract', async () => {
  const meta = await call(inference, 'ModelMetadata', { name: 'simple' });
  assert.equal(meta.name, 'simple');
  assert.deepEqual(
    meta.inputs.map((t) => [t.name, t.datatype, t.shape]),
    [['INPUT0', 'INT32', [-1, 16]], ['INPUT1', 'INT32', [-1, 16]]],
  );
  assert.deepEqual(
    meta.outputs.map((t) => [t.name, t.datatype, t.shape]),
    [['OUTPUT0', 'INT32', [-1, 16]], ['OUTPUT1', 'INT32', [-1, 16]]],
  );
});

test('ModelInfer of simple answers the sum and the difference', async () => {
  // Negative numbers, and one overflow: simple wraps as INT32 does (docs/models.md).
  const in0 = Array.from({ length: 16 }, (_, i) => i * 3 - 20);
  const in1 = Array.from({ length: 16 }, (_, i) => 7 - i);
  in0[15] = 2147483647;
  in1[15] = 1;
  const metadata = new grpc.Metadata();
  metadata.set('x-request-id', 'node-infer-1');
  const response = await call(inference, 'ModelInfer', {
    model_name: 'simple',
    id: 'node-1',
    inputs: [
      { name: 'INPUT0', datatype: 'INT32', shape: [1, 16] },
      { name: 'INPUT1', datatype: 'INT32', shape: [1, 16] },
    ],
    outputs: [{ name: 'OUTPUT0' }, { name: 'OUTPUT1' }],
    raw_input_contents: [int32Buffer(in0), int32Buffer(in1)],
  }, metadata);
  assert.equal(response.model_name, 'simple');
  assert.equal(response.id, 'node-1');
  assert.deepEqual(
    response.outputs.map((t) => [t.name, t.datatype, t.shape]),
    [['OUTPUT0', 'INT32', [1, 16]], ['OUTPUT1', 'INT32', [1, 16]]],
  );
  assert.equal(response.raw_output_contents.length, 2, 'Keel answers raw, as Triton does');
  const sum = int32Values(response.raw_output_contents[0]);
  const difference = int32Values(response.raw_output_contents[1]);
  assert.deepEqual(sum, in0.map((a, i) => (a + in1[i]) | 0));
  assert.deepEqual(difference, in0.map((a, i) => (a - in1[i]) | 0));
  assert.equal(sum[15], -2147483648, '2147483647 + 1 wraps');
});

test('an unknown model is NOT_FOUND, naming it, with the request id', async () => {
  const metadata = new grpc.Metadata();
  metadata.set('x-request-id', 'node-nope-1');
  const err = await rejectsWith(
    () => call(inference, 'ModelInfer', {
      model_name: 'nope',
      inputs: [{ name: 'INPUT0', datatype: 'INT32', shape: [1, 16] }],
      raw_input_contents: [int32Buffer(new Array(16).fill(0))],
    }, metadata),
    grpc.status.NOT_FOUND,
  );
  assert.match(err.details, /nope/);
  assert.deepEqual(err.metadata.get('x-request-id'), ['node-nope-1']);
  assert.ok(err.metadata.get('grpc-status-details-bin').length === 1, "Keel's error details");

  const meta = await rejectsWith(() => call(inference, 'ModelMetadata', { name: 'nope' }), grpc.status.NOT_FOUND);
  assert.match(meta.details, /nope/);
});

test('grpc.health.v1 Check is SERVING for the server and the inference service', async () => {
  for (const service of ['', 'inference.GRPCInferenceService']) {
    const answer = await call(health, 'Check', { service });
    assert.equal(answer.status, 'SERVING', `service "${service}"`);
  }
  await rejectsWith(() => call(health, 'Check', { service: 'no.such.Service' }), grpc.status.NOT_FOUND);
});
