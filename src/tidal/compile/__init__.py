"""Compiled forms of the dense network for serving: the ONNX Runtime backend
(`tidal.compile.ort`), each program checked against the eager network it came from."""

from tidal.compile.ort import ONNX_MISSING, OnnxProgram, to_onnx

__all__ = ["ONNX_MISSING", "OnnxProgram", "to_onnx"]
