"""Compiled forms of the dense network for serving: the `torch.export` program, its
graph rewritten by rules (`tidal.compile.rules`), the ONNX Runtime backend
(`tidal.compile.ort`) and the AOTInductor backend (`tidal.compile.aoti`), each checked
against the network it came from."""

from tidal.compile._checks import differing
from tidal.compile.aoti import AOTI_MISSING, AotiProgram, aoti_available, compiled_for, to_aoti, unfit_here
from tidal.compile.ort import ONNX_MISSING, OnnxProgram, export_program, onnx_available, to_onnx
from tidal.compile.rules import NOT_FOUND, RULES, Rewritten, Rule, RuleOutcome, rewrite
from tidal.compile.sources import GeneratedSources

__all__ = ["AOTI_MISSING", "AotiProgram", "GeneratedSources", "NOT_FOUND", "ONNX_MISSING", "OnnxProgram", "RULES",
           "Rewritten", "Rule", "RuleOutcome", "aoti_available", "compiled_for", "differing", "export_program",
           "onnx_available", "rewrite", "to_aoti", "to_onnx", "unfit_here"]
