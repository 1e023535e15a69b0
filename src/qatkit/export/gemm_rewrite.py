"""Rewrite quantized Gemm nodes that no QuantizeLinear follows into MatMul form, so ONNX Runtime runs them in int8.

ONNX Runtime fuses DQ -> Gemm into an int8 ``QGemm`` only when a QuantizeLinear (possibly after a Relu) follows;
otherwise (a layer before GELU, the logits layer) the Gemm runs in float and dequantizes its whole weight on
every call. A 3-D ``MatMul`` on dequantized inputs is fused into ``MatMulIntegerToFloat`` instead (int8 inputs,
float output). The 3-D form matters: ORT folds a 2-D MatMul + Add back into a Gemm before its QDQ fusion runs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def _feeds_quantize(name: str, consumers: dict, outputs: set[str], inits: dict, through_relu: bool = False) -> bool:
    """True if every use of ``name`` is a QuantizeLinear, directly or through a single Relu.

    ORT drops a Relu before a Q only when the Q's zero point is the bottom of its range (uint8 0, int8 -128):
    then Relu is a no-op on the quantized values and the Gemm still fuses.
    """
    users = consumers.get(name, [])
    if name in outputs or not users:
        return False
    if len(users) == 1 and users[0].op_type == "Relu" and not through_relu:
        return _feeds_quantize(users[0].output[0], consumers, outputs, inits, through_relu=True)
    if not all(u.op_type == "QuantizeLinear" for u in users):
        return False
    return not through_relu or all(_zero_point_is_floor(u, inits) for u in users)


def _zero_point_is_floor(q: onnx.NodeProto, inits: dict) -> bool:
    if len(q.input) < 3 or q.input[2] not in inits:
        return False
    zp = numpy_helper.to_array(inits[q.input[2]])
    return zp.size == 1 and int(zp.reshape(-1)[0]) == int(np.iinfo(zp.dtype).min)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rewrite_unfused_gemms(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every ``Gemm(A, DQ(int8 W), C)`` that no QuantizeLinear follows; returns how many."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    inits = {i.name: i for i in graph.initializer}
    axes_name = "qatkit_axes_0"
    new_nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        a = _attrs(node)
        dq = producers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or dq.input[0] not in inits
            or a.get("transA", 0) != 0
            or a.get("transB", 0) != 1
            or a.get("alpha", 1.0) != 1.0
            or a.get("beta", 1.0) != 1.0
            or _feeds_quantize(node.output[0], consumers, outputs, inits)
        ):
            new_nodes.append(node)
            continue
        codes = numpy_helper.to_array(inits[dq.input[0]])
        if codes.ndim != 2:
            new_nodes.append(node)
            continue
        base = node.name or node.output[0]
        t_name = f"{dq.input[0]}_transposed"
        if t_name not in inits:
            inits[t_name] = numpy_helper.from_array(np.ascontiguousarray(codes.T), t_name)
            graph.initializer.append(inits[t_name])
        per_channel = numpy_helper.to_array(inits[dq.input[1]]).ndim == 1 if dq.input[1] in inits else True
        dq_kwargs = {"axis": 1} if per_channel else {}
        w_t, a3, m3 = f"{base}_weight_t", f"{base}_in3d", f"{base}_mm3d"
        out2d = node.output[0] if len(node.input) < 3 else f"{base}_mm"
        new_nodes += [
            helper.make_node("DequantizeLinear", [t_name, *dq.input[1:]], [w_t], name=f"{base}_dq_t", **dq_kwargs),
            helper.make_node("Unsqueeze", [node.input[0], axes_name], [a3], name=f"{base}_unsqueeze"),
            helper.make_node("MatMul", [a3, w_t], [m3], name=f"{base}_matmul"),
            helper.make_node("Squeeze", [m3, axes_name], [out2d], name=f"{base}_squeeze"),
        ]
        if len(node.input) >= 3:
            new_nodes.append(helper.make_node("Add", [out2d, node.input[2]], [node.output[0]], name=f"{base}_bias"))
        rewritten += 1
    if not rewritten:
        return 0
    graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axes_name))
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused(graph)
    return rewritten


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody uses, then initializers nobody reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    keep_init = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_init)
