"""FoldBatchNorm: fold inference BatchNorm into the preceding conv2d (weights and a bias add).

Requires: a Relax module with constant conv weights (as the frontends produce).
Guarantees: no ``relax.nn.batch_norm`` left (BN not after a conv is decomposed into multiply/add),
constants folded, and every conv / linear keeps its layer name. Numerically equal to the input
module up to float rounding.

Reuses TVM's ``FoldBatchnormToConv2D``; that pass rebuilds the bindings it rewrites, so the
layer names are restored afterwards by position.
"""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_compress.frontend.layers import restore_layer_names


@tvm.ir.transform.module_pass(opt_level=0, name="tvmc.FoldBatchNorm")
class FoldBatchNorm:
    """Fold BatchNorm into conv2d weights and bias, keeping layer names."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        folded = tvm.transform.Sequential([
            relax.transform.FoldBatchnormToConv2D(),
            relax.transform.DecomposeOpsForInference(),
            relax.transform.FoldConstant(),
        ])(mod)
        return restore_layer_names(mod, folded)
