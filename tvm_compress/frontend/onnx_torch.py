"""A small ONNX -> PyTorch interpreter, so ZeroQ can take gradients through an ONNX CNN.

Covers plain CNN graphs exported with their BatchNorms preserved (``export_onnx(...,
keep_batchnorm=True)``): Conv, BatchNormalization, Relu, Clip, Add, Mul, Concat, MaxPool,
AveragePool, GlobalAveragePool, ReduceMean, Gemm, MatMul, Flatten, Reshape, Transpose, Identity,
Dropout. BatchNormalization nodes become ``nn.BatchNorm2d`` modules (with their running
statistics) so forward hooks see them; other ops run as torch functions in graph order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tvm_compress.errors import UserError

if TYPE_CHECKING:
    import onnx

_SUPPORTED = {"Conv", "BatchNormalization", "Relu", "Clip", "Add", "Mul", "Concat", "MaxPool",
              "AveragePool", "GlobalAveragePool", "ReduceMean", "Gemm", "MatMul", "Flatten",
              "Reshape", "Transpose", "Identity", "Dropout", "Constant"}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(a: dict[str, Any], dims: int) -> list[int]:
    pads = list(a.get("pads", [0] * (2 * dims)))
    if pads[:dims] != pads[dims:]:
        raise UserError("asymmetric ONNX padding is not supported by the ONNX->torch converter")
    return pads[:dims]


class OnnxModule(nn.Module):
    """Runs an ONNX graph with torch ops; BatchNorms are real ``nn.BatchNorm2d`` submodules."""

    def __init__(self, model: onnx.ModelProto, where: str) -> None:
        from onnx import numpy_helper

        super().__init__()
        self.graph = model.graph
        self.consts: dict[str, torch.Tensor] = {
            i.name: torch.from_numpy(np.array(numpy_helper.to_array(i)))
            for i in model.graph.initializer}
        self.input_name = next(i.name for i in model.graph.input if i.name not in self.consts)
        self.bns = nn.ModuleDict()
        for index, node in enumerate(model.graph.node):
            if node.op_type not in _SUPPORTED:
                raise UserError(f"{where}: ONNX op {node.op_type} (node '{node.name or index}') is "
                                "not supported by the ONNX->torch converter ZeroQ needs; give the "
                                "torch model (tvm_compress.from_torch) instead")
            if node.op_type == "Constant":
                self.consts[node.output[0]] = torch.from_numpy(
                    np.array(numpy_helper.to_array(_attrs(node)["value"])))
            if node.op_type == "Identity" and node.input[0] in self.consts:
                # the TorchScript exporter shares equal parameters through Identity nodes
                self.consts[node.output[0]] = self.consts[node.input[0]]
            if node.op_type == "BatchNormalization":
                scale, bias, mean, var = (self.consts[n] for n in node.input[1:5])
                bn = nn.BatchNorm2d(len(scale), eps=float(_attrs(node).get("epsilon", 1e-5)))
                bn.weight.data.copy_(scale), bn.bias.data.copy_(bias)
                bn.running_mean.copy_(mean), bn.running_var.copy_(var)
                self.bns[f"bn{index}"] = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: C901 - one branch per op
        env = {**self.consts, self.input_name: x}
        for index, node in enumerate(self.graph.node):
            a, ins = _attrs(node), [env[n] if n else None for n in node.input]
            op = node.op_type
            if op == "Conv":
                k = len(ins[1].shape) - 2
                y = F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None,
                             list(a.get("strides", [1] * k)), _pads(a, k),
                             list(a.get("dilations", [1] * k)), int(a.get("group", 1)))
            elif op == "BatchNormalization":
                y = self.bns[f"bn{index}"](ins[0])
            elif op == "Relu":
                y = F.relu(ins[0])
            elif op == "Clip":
                lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
                hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
                y = torch.clamp(ins[0], None if lo is None else float(lo),
                                None if hi is None else float(hi))
            elif op in ("Add", "Mul"):
                y = ins[0] + ins[1] if op == "Add" else ins[0] * ins[1]
            elif op == "Concat":
                y = torch.cat(ins, dim=int(a["axis"]))
            elif op in ("MaxPool", "AveragePool"):
                fn = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
                y = fn(ins[0], list(a["kernel_shape"]), list(a.get("strides", a["kernel_shape"])),
                       _pads(a, 2), ceil_mode=bool(a.get("ceil_mode", 0)))
            elif op == "GlobalAveragePool":
                y = ins[0].mean((2, 3), keepdim=True)
            elif op == "ReduceMean":
                axes = a.get("axes") or [int(v) for v in ins[1].tolist()]
                y = ins[0].mean(tuple(axes), keepdim=bool(a.get("keepdims", 1)))
            elif op == "Gemm":
                w = ins[1].T if a.get("transB", 0) else ins[1]
                xin = ins[0].T if a.get("transA", 0) else ins[0]
                y = float(a.get("alpha", 1.0)) * xin @ w
                if len(ins) > 2 and ins[2] is not None:
                    y = y + float(a.get("beta", 1.0)) * ins[2]
            elif op == "MatMul":
                y = ins[0] @ ins[1]
            elif op == "Flatten":
                y = torch.flatten(ins[0], int(a.get("axis", 1)))
            elif op == "Reshape":
                shape = [int(v) for v in ins[1].tolist()]
                shape = [ins[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
                y = ins[0].reshape(shape)
            elif op == "Transpose":
                y = ins[0].permute(*a["perm"])
            elif op == "Constant":
                y = env[node.output[0]]
            else:  # Identity, Dropout (inference)
                y = ins[0]
            env[node.output[0]] = y
        return env[self.graph.output[0].name]


def onnx_to_torch(model: onnx.ModelProto, *, where: str = "ONNX model") -> nn.Module:
    """An eval-mode torch module computing the same function as ``model``."""
    return OnnxModule(model, where).eval()
