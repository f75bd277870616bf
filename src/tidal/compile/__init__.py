"""Compiled forms of the dense network for serving: the `torch.export` program, its
graph rewritten by rules (`tidal.compile.rules`) and the ONNX Runtime backend
(`tidal.compile.ort`), each checked against the network it came from."""

from tidal.compile.ort import ONNX_MISSING, OnnxProgram, export_program, onnx_available, to_onnx
from tidal.compile.rules import RULES, Rewritten, Rule, RuleOutcome, rewrite

__all__ = ["ONNX_MISSING", "OnnxProgram", "RULES", "Rewritten", "Rule", "RuleOutcome", "export_program",
           "onnx_available", "rewrite", "to_onnx"]
