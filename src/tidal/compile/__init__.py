"""Compiled forms of the dense network for serving: the `torch.export` program and
the ONNX Runtime backend (`tidal.compile.ort`), each checked against the network it
came from."""

from tidal.compile.ort import ONNX_MISSING, OnnxProgram, export_program, onnx_available, to_onnx

__all__ = ["ONNX_MISSING", "OnnxProgram", "export_program", "onnx_available", "to_onnx"]
