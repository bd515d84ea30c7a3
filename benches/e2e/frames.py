#!/usr/bin/env python3
"""Stored gRPC frames for benches/e2e.sh, built from the protobuf wire format by hand.

  frames.py request OUT     # the ModelInfer request `keel load --payload simple` sends:
                            # model "simple", INPUT0 = 0..15 and INPUT1 = 1 x 16, [1,16] INT32
  frames.py capture PORT REQUEST OUT
                            # posts REQUEST to the ModelInfer of the gRPC server on
                            # 127.0.0.1:PORT (a Keel on its embedded backend) over HTTP/2 in
                            # clear text, writes the answer's one gRPC message to OUT, less
                            # the `keel.*` response parameters that Keel's labelling added
                            # (a model server such as Triton sends none), and checks it as
                            # `check` does
  frames.py check FRAME     # FRAME is one gRPC message holding a ModelInferResponse for
                            # `simple` (OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1):
                            # decodes it and exits non-zero when it is not that answer
  frames.py h2load OUT LOG JSON
                            # h2load's summary (OUT) and --log-file (LOG) as the figures
                            # benches/e2e/report.py reads (what `keel load --json` writes)

So the canned upstream's answer is the model's real answer, captured once, not a guess.
"""
import struct
import sys


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def string(num, s):
    return field(num, 2, s if isinstance(s, bytes) else s.encode())


def tensor(name, datatype, shape):
    packed = b"".join(varint(d) for d in shape)
    return string(1, name) + string(2, datatype) + field(3, 2, packed)


def request():
    a = struct.pack("<16i", *range(16))
    b = struct.pack("<16i", *([1] * 16))
    msg = (
        string(1, "simple")
        + field(5, 2, tensor("INPUT0", "INT32", [1, 16]))
        + field(5, 2, tensor("INPUT1", "INT32", [1, 16]))
        + field(7, 2, a)
        + field(7, 2, b)
    )
    return b"\x00" + struct.pack(">I", len(msg)) + msg


def read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def fields(buf):
    """(number, wire type, value) for each field of one message."""
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = read_varint(buf, i)
        elif wire == 2:
            n, i = read_varint(buf, i)
            v = buf[i : i + n]
            i += n
        elif wire == 1:
            v = buf[i : i + 8]
            i += 8
        elif wire == 5:
            v = buf[i : i + 4]
            i += 4
        else:
            raise ValueError(f"wire type {wire} at byte {i}")
        yield num, wire, v


def check(frame):
    if len(frame) < 5 or frame[0] != 0:
        raise ValueError("not an uncompressed gRPC message")
    (n,) = struct.unpack(">I", frame[1:5])
    if n != len(frame) - 5:
        raise ValueError(f"length prefix {n}, message {len(frame) - 5} bytes")
    # ModelInferResponse: model_name 1, model_version 2, id 3, parameters 4, outputs 5,
    # raw_output_contents 6.
    model, outputs, raw = None, [], []
    for num, wire, v in fields(frame[5:]):
        if num == 1 and wire == 2:
            model = v.decode()
        elif num == 5 and wire == 2:
            outputs.append({k: val for k, w, val in fields(v) if k in (1, 2)})
        elif num == 6 and wire == 2:
            raw.append(v)
    if model != "simple":
        raise ValueError(f"model_name {model!r}")
    names = [o.get(1, b"").decode() for o in outputs]
    if names != ["OUTPUT0", "OUTPUT1"] or len(raw) != 2:
        raise ValueError(f"outputs {names}, {len(raw)} raw contents")
    sums = list(struct.unpack("<16i", raw[0]))
    diffs = list(struct.unpack("<16i", raw[1]))
    if sums != [i + 1 for i in range(16)] or diffs != [i - 1 for i in range(16)]:
        raise ValueError(f"OUTPUT0 {sums}, OUTPUT1 {diffs}")
    return f"ModelInferResponse for simple, {len(frame)} bytes: OUTPUT0 and OUTPUT1 as expected"


def without_keel_labels(frame):
    """FRAME less its `keel.*` response parameters (field 4 entries), prefix rewritten."""
    out = b""
    for num, wire, v in fields(frame[5:]):
        if num == 4 and any(k == 1 and val.startswith(b"keel.") for k, _, val in fields(v)):
            continue
        out += field(num, wire, v) if wire == 2 else field(num, wire, varint(v) if wire == 0 else v)
    return b"\x00" + struct.pack(">I", len(out)) + out


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(name, value):
    """An HPACK literal header field without indexing, no Huffman coding (both < 127 bytes)."""
    name, value = name.encode(), value.encode()
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def capture(port, request_frame):
    """One unary ModelInfer over a bare HTTP/2 connection; the answer's DATA bytes."""
    import socket

    headers = b"".join(
        literal(k, v)
        for k, v in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/inference.GRPCInferenceService/ModelInfer"),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + h2_frame(4, 0, 0, b"")
        + h2_frame(1, 0x4, 1, headers)
        + h2_frame(0, 0x1, 1, request_frame)
    )
    buf, data = b"", b""
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            more = s.recv(65536)
            if not more:
                raise ValueError("the server closed the connection before the answer ended")
            buf += more
        n = int.from_bytes(buf[:3], "big")
        kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload, buf = buf[9 : 9 + n], buf[9 + n :]
        if kind == 4 and not flags & 0x1:
            s.sendall(h2_frame(4, 0x1, 0, b""))
        elif kind == 6 and not flags & 0x1:
            s.sendall(h2_frame(6, 0x1, 0, payload))
        elif kind == 7:
            raise ValueError("GOAWAY from the server")
        elif stream == 1 and kind == 3:
            raise ValueError(f"RST_STREAM {int.from_bytes(payload, 'big')} from the server")
        elif stream == 1 and kind == 0:
            if flags & 0x8:
                payload = payload[1 : len(payload) - payload[0]]
            data += payload
        if stream == 1 and kind in (0, 1) and flags & 0x1:
            s.close()
            return data


def h2load(out, log, json_out):
    """h2load's figures for one run, in the shape of `keel load --json`."""
    import json
    import re

    text = open(out).read()
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    rps = float(m.group(3))  # h2load's: successes over the measured duration
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", text)
    done, ok = int(m.group(3)), int(m.group(4))
    lat = []
    for line in open(log):
        cols = line.split("\t")
        if len(cols) >= 3 and cols[1] == "200":
            lat.append(int(cols[2]) / 1000)
    lat.sort()

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    json.dump(
        {
            "elapsed_s": secs,
            "requests": done,
            "ok": ok,
            "rps": rps,
            "success_ratio": ok / done if done else 0.0,
            "latency_ms": {
                "p50": pct(0.5),
                "p90": pct(0.9),
                "p99": pct(0.99),
                "p999": pct(0.999),
                "max": lat[-1] if lat else float("nan"),
                "mean": sum(lat) / len(lat) if lat else float("nan"),
            },
        },
        open(json_out, "w"),
    )


if __name__ == "__main__":
    what, path = sys.argv[1], sys.argv[2]
    if what == "request":
        open(path, "wb").write(request())
    elif what == "capture":
        try:
            frame = without_keel_labels(capture(int(path), open(sys.argv[3], "rb").read()))
            print(f"==> captured the answer: {check(frame)}")
        except (OSError, ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
            sys.exit(f"capturing the simple model's answer from 127.0.0.1:{path}: {e}")
        open(sys.argv[4], "wb").write(frame)
    elif what == "h2load":
        h2load(path, sys.argv[3], sys.argv[4])
    elif what == "check":
        try:
            print(check(open(path, "rb").read()))
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
            sys.exit(f"{path}: not the simple model's answer: {e}")
    else:
        sys.exit(__doc__)
