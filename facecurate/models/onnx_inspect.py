"""What an ONNX file holds, read from its graph, never from its file name (as
insightface's ``model_zoo``): :func:`inspect_onnx` / :func:`find_model` tell a pack's
SCRFD detector from its recogniser (and from its landmark / gender-age models, which
are ignored); :func:`input_normalisation` reads the first node names (with ``onnx``
when installed, else a minimal protobuf reader) for ArcFace's input rule.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from .onnx_session import CPU_PROVIDER, OnnxModelError, onnxruntime_module, select_session


def static_dim(d):
    """Static dimension as int, dynamic (str / None / <=0) as None."""
    if isinstance(d, (int, np.integer)) and d > 0:
        return int(d)
    return None


def _signature(session):
    ins = [(i.name, list(i.shape), i.type) for i in session.get_inputs()]
    outs = [(o.name, list(o.shape), o.type) for o in session.get_outputs()]
    return ins, outs


def open_checked(path: Path, kind: str, what: str, device: str, threads):
    """(session, provider, inputs, outputs) of the ONNX model at ``path``, refused with
    an OnnxModelError ("PATH is not WHAT: ...") unless its graph is a ``kind``."""
    session, provider = select_session(path, device, threads)
    ins, outs = _signature(session)
    found, desc = _classify(ins, outs)
    if found != kind:
        raise OnnxModelError(f"{path} is not {what}: {desc}")
    return session, provider, ins, outs


def _io_signature(path):
    """(inputs, outputs) as lists of (name, shape, type) read with a light session."""
    ort = onnxruntime_module()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        s = ort.InferenceSession(str(path), sess_options=so, providers=[CPU_PROVIDER])
    except Exception as e:
        raise OnnxModelError(f"cannot read ONNX model {path}: {e}") from e
    return _signature(s)


#: SCRFD layouts by number of outputs: (strides, anchors per location, has keypoints)
SCRFD_LAYOUTS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}


def _classify(ins, outs):
    """Return (kind, description). kind is "detector", "recognizer" or None."""
    if len(ins) != 1:
        return None, f"{len(ins)} inputs"
    shape = ins[0][1]
    if len(shape) != 4 or static_dim(shape[1]) != 3:
        return None, f"input shape {shape} (not N x 3 x H x W)"
    h, w = static_dim(shape[2]), static_dim(shape[3])
    n_out = len(outs)
    if n_out in SCRFD_LAYOUTS:
        strides, _, kps = SCRFD_LAYOUTS[n_out]
        fmc = len(strides)
        want = [1] * fmc + [4] * fmc + ([10] * fmc if kps else [])
        last = [static_dim(o[1][-1]) if o[1] else None for o in outs]
        rank_ok = all(len(o[1]) in (2, 3) for o in outs)
        if rank_ok and all(d is None or d == k for d, k in zip(last, want)):
            return "detector", f"SCRFD detector, {n_out} outputs, input {shape}"
        return None, f"{n_out} outputs that do not follow SCRFD's score/bbox/kps layout"
    if n_out == 1:
        oshape = outs[0][1]
        d = static_dim(oshape[-1]) if oshape else None
        if len(oshape) == 2 and d is not None:
            if h is not None and h == w and 64 <= d <= 4096 and d % 32 == 0:
                return "recognizer", f"recognition model, input {shape}, output {oshape}"
            if d == 3:
                return None, f"gender/age attribute model (input {shape}, output {oshape})"
            if d in (212, 3309) or (h == 192 and w == 192):
                return None, f"landmark model (input {shape}, output {oshape})"
        return None, f"1 output of shape {oshape} with input {shape}"
    return None, f"{n_out} outputs with input {shape}"


def inspect_onnx(path) -> str:
    """Kind of model in ``path``: "detector" (SCRFD signature: one N x 3 x H x W input,
    6 / 9 / 10 / 15 outputs, scores / boxes / keypoints per stride, 2-D or batched 3-D)
    or "recognizer" (one square 3-channel input, one 2-D [N, D] output).  Anything
    else (landmark, gender/age, unrelated graphs) raises :class:`OnnxModelError`."""
    kind, desc = _classify(*_io_signature(path))
    if kind is None:
        raise OnnxModelError(
            f"{path}: not a face detector (SCRFD) or recognition model: {desc}"
        )
    return kind


def find_model(model_dir_or_file, kind: str) -> Path:
    """Path of the model of ``kind`` ("detector" or "recognizer") in a pack directory
    (e.g. ``~/.insightface/models/buffalo_l``), decided by inspecting every ``*.onnx``
    graph in it.  A file is checked and returned as is.  Errors list what was found."""
    if kind not in ("detector", "recognizer"):
        raise ValueError(f"kind must be 'detector' or 'recognizer', not {kind!r}")
    p = Path(os.path.expanduser(str(model_dir_or_file)))
    if p.is_file():
        got = inspect_onnx(p)
        if got != kind:
            raise OnnxModelError(f"{p} is a {got}, not a {kind}")
        return p
    if not p.is_dir():
        raise OnnxModelError(f"model directory or file not found: {p}")
    found = []
    for f in sorted(p.glob("*.onnx")):
        try:
            k, desc = _classify(*_io_signature(f))
        except OnnxModelError as e:
            k, desc = None, f"unreadable ({e})"
        found.append((f, k, desc))
    matches = [f for f, k, _ in found if k == kind]
    if len(matches) == 1:
        return matches[0]
    listing = "; ".join(f"{f.name}: {desc}" for f, _, desc in found) or "no .onnx files"
    if not matches:
        raise OnnxModelError(f"no {kind} model in {p} (found {listing})")
    raise OnnxModelError(
        f"several {kind} models in {p}: {', '.join(m.name for m in matches)}; pass the "
        f".onnx file you want instead of the directory (found {listing})"
    )


# ---------------------------------------------------------------------------------
# First node names (for ArcFace's input normalisation rule)
# ---------------------------------------------------------------------------------


def _varint(buf, pos):
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start, end):
    """Yield (field_number, wire_type, value_start, value_end) of a protobuf message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            _, npos = _varint(buf, pos)
        elif wt == 1:
            npos = pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            npos = pos + n
        elif wt == 5:
            npos = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield field, wt, pos, npos
        pos = npos


def _first_nodes_protobuf(path, n):
    """(name, op_type) of the first ``n`` graph nodes, read straight from the
    protobuf (ModelProto.graph = 7, GraphProto.node = 1, NodeProto.name = 3,
    op_type = 4) without loading initializers."""
    out = []
    if os.path.getsize(path) == 0:
        return out
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, wt, a, b in _fields(buf, 0, len(buf)):
            if field != 7 or wt != 2:
                continue
            for gf, gwt, ga, gb in _fields(buf, a, b):
                if gf != 1 or gwt != 2:
                    continue
                name = op = ""
                for nf, nwt, na, nb in _fields(buf, ga, gb):
                    if nf == 3 and nwt == 2:
                        name = bytes(buf[na:nb]).decode("utf-8", "replace")
                    elif nf == 4 and nwt == 2:
                        op = bytes(buf[na:nb]).decode("utf-8", "replace")
                out.append((name, op))
                if len(out) >= n:
                    return out
            break
    return out


def first_nodes(path, n: int = 8) -> list[tuple[str, str]]:
    """(name, op_type) of the first ``n`` nodes of the graph (with the ``onnx``
    package when installed, else a minimal protobuf reader)."""
    try:
        import onnx
    except ImportError:
        return _first_nodes_protobuf(path, n)
    model = onnx.load(str(path), load_external_data=False)
    return [(node.name, node.op_type) for node in model.graph.node[:n]]


def input_normalisation(path) -> tuple[float, float]:
    """insightface's rule (``arcface_onnx.py``): if one of the first 8 nodes is named
    ``Sub*`` / ``_minus*`` and one ``Mul*`` / ``_mul*``, the graph normalises itself
    (MXNet-converted models) and expects 0..255 input: mean 0, std 1.  Otherwise the
    caller normalises with mean 127.5, std 127.5."""
    nodes = first_nodes(path, 8)
    has_sub = any(nm.startswith(("Sub", "_minus")) for nm, _ in nodes)
    has_mul = any(nm.startswith(("Mul", "_mul")) for nm, _ in nodes)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)
