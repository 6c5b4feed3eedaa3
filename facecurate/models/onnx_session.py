"""ONNX Runtime sessions: open a graph on the device asked for and report the
execution provider the session *really* got (``session.get_providers()``):
onnxruntime-gpu lists ``CUDAExecutionProvider`` even on a machine without CUDA and
silently falls back to the CPU.  Every error a user can cause (missing onnxruntime,
CUDA asked for but not obtained, ...) is an :class:`OnnxModelError` meant for humans.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

from .base import ModelError

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

#: default batch sizes for graphs with a dynamic batch dimension
DEFAULT_BATCH = {CPU_PROVIDER: 32, CUDA_PROVIDER: 256}

INSTALL_HINT = "pip install 'facecurate[cpu]'  or '[gpu]' on a CUDA machine"
GPU_HINT = (
    "install the GPU build with pip install 'facecurate[gpu]' (onnxruntime-gpu; never "
    "together with the CPU package onnxruntime: pip uninstall onnxruntime first) and "
    "make sure its CUDA / cuDNN versions match the ones on this machine"
)


class OnnxModelError(ModelError):
    """A model file, pack or runtime problem, explained for the user."""


def onnxruntime_module():
    """ONNX Runtime, imported on first use (an optional dependency); OnnxModelError when absent."""
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OnnxModelError(
            f"ONNX models need ONNX Runtime, which is not installed: {INSTALL_HINT}"
        ) from e
    return onnxruntime


def _session_options(threads: Optional[int], quiet: bool = False):
    ort = onnxruntime_module()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Same inputs => same outputs (deterministic kernels where ORT has a choice).
    so.use_deterministic_compute = True
    if quiet:
        so.log_severity_level = 3  # errors only (the CUDA fallback warning is ours to report)
    return so


def _check_device(device: str) -> str:
    device = (device or "auto").lower()
    if device == "gpu":
        device = "cuda"
    if device not in DEVICES:
        raise OnnxModelError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    return device


_CUDA_UNUSABLE = False


def _note_cuda_unusable():
    global _CUDA_UNUSABLE
    _CUDA_UNUSABLE = True


def select_session(path, device: str = "auto", threads: Optional[int] = None):
    """Open ``path`` with ONNX Runtime on ``device`` ("auto", "cpu" or "cuda").

    Returns ``(session, provider)`` where ``provider`` is the execution provider the
    session really runs on (``"CUDAExecutionProvider"`` or ``"CPUExecutionProvider"``),
    read back from ``session.get_providers()``.  "auto" asks for CUDA when ONNX
    Runtime lists it and takes what it gets; "cuda" raises :class:`OnnxModelError`
    unless the session really obtained CUDA.  ``threads`` sets the intra-op thread
    count (None: ONNX Runtime's default, all physical cores).
    """
    ort = onnxruntime_module()
    device = _check_device(device)
    path = str(path)
    if not os.path.isfile(path):
        raise OnnxModelError(f"model file not found: {path}")
    available = list(ort.get_available_providers())
    want_cuda = device in ("auto", "cuda") and CUDA_PROVIDER in available
    if device == "auto" and _CUDA_UNUSABLE:
        want_cuda = False  # found out earlier in this process; don't retry per model
    if device == "cuda" and not want_cuda:
        raise OnnxModelError(
            f"--device cuda: this ONNX Runtime ({ort.__version__}) has no {CUDA_PROVIDER} "
            f"(available: {', '.join(available)}); {GPU_HINT}"
        )
    session = None
    if want_cuda:
        cuda_opts = {"cudnn_conv_algo_search": "HEURISTIC"}
        if device == "auto":
            # A failed CUDA provider logs two lines per session (per worker process);
            # "auto" reports the fallback once, as a Python warning, instead.
            ort.set_default_logger_severity(4)
        try:
            session = ort.InferenceSession(
                path,
                sess_options=_session_options(threads, quiet=True),
                providers=[(CUDA_PROVIDER, cuda_opts), CPU_PROVIDER],
            )
        except Exception as e:  # some builds raise instead of falling back
            if device == "cuda":
                raise OnnxModelError(f"--device cuda: could not start a CUDA session: {e}; {GPU_HINT}") from e
            session = None
        finally:
            if device == "auto":
                ort.set_default_logger_severity(2)  # ONNX Runtime's default (warnings)
        if session is not None and CUDA_PROVIDER not in session.get_providers():
            if device == "cuda":
                raise OnnxModelError(
                    f"--device cuda: ONNX Runtime lists {CUDA_PROVIDER} but the session fell "
                    f"back to {', '.join(session.get_providers())} (no usable GPU / CUDA "
                    f"libraries here); {GPU_HINT}"
                )
            # auto: rebuild the session cleanly on the CPU only.
            session = None
        if session is None:
            _note_cuda_unusable()
            warnings.warn(
                f"ONNX Runtime lists {CUDA_PROVIDER} but cannot use it here (no GPU, or "
                f"CUDA / cuDNN libraries missing or of another version): running on the CPU",
                RuntimeWarning, stacklevel=2,
            )
    if session is None:
        try:
            session = ort.InferenceSession(
                path, sess_options=_session_options(threads), providers=[CPU_PROVIDER]
            )
        except Exception as e:
            raise OnnxModelError(f"cannot load ONNX model {path}: {e}") from e
    got = session.get_providers()
    provider = CUDA_PROVIDER if CUDA_PROVIDER in got else got[0]
    return session, provider
