"""A DenseNet's ONNX graph made ready for integer arithmetic: the same numbers, in operators that quantize well.

``sedense.deploy.quantize`` runs these on the float model before ONNX Runtime quantizes it:

- ``integer_graph`` (exact): every operator gets an integer kernel and the concatenations copy less.
  Norms left after Conv+BatchNormalization fusion become depthwise 1x1 convolutions; squeeze-and-excitation
  is pooled and convolved instead of reshaped; each dense layer's concatenation of all the block's features
  so far takes the previous layer's concatenation and the one new feature (2 inputs, not up to 48); a 1x1
  convolution followed by a k x k average pool of stride k becomes one k x k convolution of stride k.
- ``equalize`` (exact, measured on calibration images): the features a dense block concatenates are scaled,
  channel by channel, to one common range, and the scale undone in the per-channel norms that read them.
  Their concatenations can then share one quantization scale, and ONNX Runtime's integer concatenation
  copies its inputs instead of requantizing each one; without equalization a shared scale crushes the
  channels of small range (it changed 6% of the answers on the TrashNet recipe's model, 1% with it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

__all__ = ["equalize", "integer_graph"]

POSITIVE_HOMOGENEOUS = ("Relu", "MaxPool", "AveragePool")  # f(a * x) = a * f(x) for a > 0, channel by channel


class Graph:
    """An ONNX ``GraphProto`` with the lookups the rewrites need: initializers, producers and consumers."""

    def __init__(self, model) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.graph = model.graph
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.index()

    def index(self) -> None:
        self.producer = {name: node for node in self.graph.node for name in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def array(self, name: str) -> np.ndarray:
        return self.numpy_helper.to_array(self.initializers[name]).astype(np.float32)

    def constant(self, value: np.ndarray, name: str) -> str:
        tensor = self.numpy_helper.from_array(value.astype(np.float32), name)
        if name in self.initializers:
            self.initializers[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.initializers[name] = self.graph.initializer[-1]  # the graph holds a copy
        return name

    def attrs(self, node) -> dict:
        values = {a.name: self.helper.get_attribute_value(a) for a in node.attribute}
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}

    def only_consumer(self, name: str):
        after = self.consumers.get(name, [])
        return after[0] if len(after) == 1 else None

    def own_weight(self, node) -> bool:
        """``node`` is a convolution whose weight (and bias) are constants that no other node reads."""
        return node is not None and node.op_type == "Conv" and all(
            name in self.initializers and len(self.consumers[name]) == 1 for name in node.input[1:])

    def replace(self, replaced: dict[int, list], renamed: dict[str, str] | None = None) -> None:
        """Put the nodes ``replaced[id(node)]`` in place of each node; drop initializers no node reads."""
        nodes = [new for node in self.graph.node for new in replaced.get(id(node), [node])]
        for node in nodes:
            for k, name in enumerate(node.input):
                node.input[k] = (renamed or {}).get(name, name)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = {name for node in self.graph.node for name in node.input}
        kept = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)  # copies: look them up again
        self.initializers = {i.name: i for i in self.graph.initializer}
        del self.graph.value_info[:]  # shapes may have changed
        self.index()


def integer_graph(model):
    """``model`` (an ONNX ``ModelProto``, changed in place) computing the same with operators that quantize.

    - ``BatchNormalization(x)`` -> ``Conv(x, a, b, group=C)`` with a 1x1 kernel: ``a = scale / sqrt(var + eps)``,
      ``b = bias - mean * a``, per channel (the norms left after Conv+BatchNormalization fusion: a DenseNet's
      pre-activation norms).
    - Squeeze-and-excitation, ``ReduceMean(x, [2, 3]) -> Gemm -> Relu -> Gemm -> Sigmoid -> Unsqueeze``, ->
      ``GlobalAveragePool(x) -> Conv 1x1 -> Relu -> Conv 1x1 -> Sigmoid``: the same numbers, kept 4-D, so
      the scale multiplies the feature map without a reshape.
    - ``Concat(x0, ..., xn)`` after ``c = Concat(x0, ..., xk)`` -> ``Concat(c, xk+1, ..., xn)``: a dense block
      concatenates all its features again in every layer; ONNX Runtime's integer concatenation copies one
      input's channels pixel by pixel, so fewer inputs mean far fewer copies.
    - ``Conv 1x1 -> AveragePool(k x k, stride k)`` -> ``Conv(k x k, stride k)`` with the weight spread over the
      window (a DenseNet's transitions): the integer average pool was slower than the convolution before it.
    """
    g = Graph(model)
    norms_and_squeezes(g)
    chain_concatenations(g)
    fold_average_pools(g)
    return model


def norms_and_squeezes(g: Graph) -> None:
    helper, graph = g.helper, g.graph
    constants = {n.output[0]: g.attrs(n).get("value") for n in graph.node if n.op_type == "Constant"}

    def chain(node, ops: tuple[str, ...]) -> list | None:
        """``node`` and the single-consumer path of ``ops`` after it, or None."""
        found = [node]
        for op in ops:
            after = g.only_consumer(found[-1].output[0])
            if after is None or after.op_type != op:
                return None
            found.append(after)
        return found

    def axes(node) -> list[int] | None:
        """The axes of a ReduceMean or Unsqueeze: an attribute (older opsets) or a constant input."""
        if "axes" in g.attrs(node):
            return list(g.attrs(node)["axes"])
        source = node.input[1] if len(node.input) > 1 else None
        if source in g.initializers:
            return g.numpy_helper.to_array(g.initializers[source]).tolist()
        if constants.get(source) is not None:
            return g.numpy_helper.to_array(constants[source]).tolist()
        return None

    replaced: dict[int, list] = {}
    renamed: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization" and all(i in g.initializers for i in node.input[1:5]):
            scale, bias, mean, var = (g.array(i) for i in node.input[1:5])
            a = scale / np.sqrt(var + g.attrs(node).get("epsilon", 1e-5))
            weight = g.constant(a.reshape(-1, 1, 1, 1), f"{node.output[0]}_affine_weight")
            shift = g.constant(bias - mean * a, f"{node.output[0]}_affine_bias")
            replaced[id(node)] = [helper.make_node("Conv", [node.input[0], weight, shift], [node.output[0]],
                                                   name=f"{node.name}_affine", group=len(a), kernel_shape=[1, 1])]
        elif node.op_type == "ReduceMean":
            found = chain(node, ("Gemm", "Relu", "Gemm", "Sigmoid", "Unsqueeze"))
            if found is None or g.attrs(node).get("keepdims", 1) != 0 or axes(node) not in ([2, 3], [-2, -1]) \
                    or axes(found[5]) not in ([2, 3], [-2, -1]):
                continue
            mean, gemms, sigmoid, unsqueeze = found[0], (found[1], found[3]), found[4], found[5]
            if any(i not in g.initializers for gemm in gemms for i in gemm.input[1:] if i):
                continue
            replaced[id(mean)] = [helper.make_node("GlobalAveragePool", [mean.input[0]], [mean.output[0]],
                                                   name=f"{mean.name}_pool")]
            for gemm in gemms:
                a = g.attrs(gemm)
                weight = g.array(gemm.input[1]) * a.get("alpha", 1.0)
                weight = weight if a.get("transB", 0) else weight.T
                inputs = [gemm.input[0], g.constant(weight[:, :, None, None], f"{gemm.output[0]}_conv_weight")]
                if len(gemm.input) > 2 and gemm.input[2]:
                    inputs.append(g.constant(g.array(gemm.input[2]).reshape(-1) * a.get("beta", 1.0),
                                             f"{gemm.output[0]}_conv_bias"))
                replaced[id(gemm)] = [helper.make_node("Conv", inputs, list(gemm.output), name=f"{gemm.name}_conv",
                                                       kernel_shape=[1, 1])]
            replaced[id(unsqueeze)] = []  # the scale stays 4-D: the Mul takes the Sigmoid's output
            renamed[unsqueeze.output[0]] = sigmoid.output[0]
    g.replace(replaced, renamed)


def chain_concatenations(g: Graph) -> None:
    seen: dict[tuple, str] = {}  # (axis, inputs) of each concatenation so far -> its output
    for node in g.graph.node:
        if node.op_type != "Concat":
            continue
        axis, inputs = g.attrs(node).get("axis"), tuple(node.input)
        for k in range(len(inputs) - 1, 1, -1):  # the longest earlier concatenation this one starts with
            earlier = seen.get((axis, inputs[:k]))
            if earlier is not None:
                del node.input[:]
                node.input.extend([earlier, *inputs[k:]])
                break
        seen[(axis, inputs)] = node.output[0]
    g.index()


def fold_average_pools(g: Graph) -> None:
    replaced: dict[int, list] = {}
    for conv in g.graph.node:
        pool = g.only_consumer(conv.output[0]) if conv.op_type == "Conv" else None
        if pool is None or pool.op_type != "AveragePool" or not g.own_weight(conv):
            continue
        c, p = g.attrs(conv), g.attrs(pool)
        k = list(p.get("kernel_shape", []))
        if len(k) != 2 or k[0] != k[1] or list(p.get("strides", [1, 1])) != k or any(p.get("pads", [])) \
                or p.get("ceil_mode", 0) or p.get("auto_pad", "NOTSET") != "NOTSET":
            continue
        if list(c.get("kernel_shape", [1, 1])) != [1, 1] or c.get("group", 1) != 1 or any(c.get("pads", [])) \
                or any(s != 1 for s in c.get("strides", [1, 1])) or any(d != 1 for d in c.get("dilations", [1, 1])) \
                or c.get("auto_pad", "NOTSET") != "NOTSET":
            continue
        weight = g.array(conv.input[1])
        g.constant(np.tile(weight / (k[0] * k[1]), (1, 1, k[0], k[1])), conv.input[1])
        replaced[id(conv)] = [g.helper.make_node("Conv", list(conv.input), list(pool.output),
                                                 name=f"{conv.name}_pooled", kernel_shape=k, strides=k)]
        replaced[id(pool)] = []
    g.replace(replaced)


def concatenated_features(g: Graph) -> list[tuple[list[str], list[str]]]:
    """Each set of features concatenated together (a dense block's): (the features, their concatenations)."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    concatenations = [n for n in g.graph.node if n.op_type == "Concat" and g.attrs(n).get("axis") == 1]
    for node in concatenations:
        for name in node.input:
            parent[root(name)] = root(node.output[0])
    outputs = {n.output[0] for n in concatenations}
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for name in parent:
        features, joined = groups.setdefault(root(name), ([], []))
        (joined if name in outputs else features).append(name)
    return list(groups.values())


def rescalable(g: Graph, feature: str):
    """How to scale the channels of ``feature`` exactly: (the convolution to scale, the squeeze-and-excitation
    convolution that takes the scale back out or None), or None when it cannot be done.

    ``feature`` must come from a convolution through operators that commute with a positive per-channel
    scale (``POSITIVE_HOMOGENEOUS``), or be a squeeze-and-excitation's ``Mul(conv, Sigmoid(...))`` whose
    gate is computed from that convolution (the gate's first convolution then takes the scale back out).
    """
    node = g.producer.get(feature)
    if node is not None and node.op_type == "Mul" and len(node.input) == 2:
        convs = [g.producer.get(name) for name in node.input]
        for conv, gate in (convs, convs[::-1]):
            if conv is None or gate is None or conv.op_type != "Conv" or gate.op_type != "Sigmoid":
                continue
            readers = g.consumers.get(conv.output[0], [])
            pools = [r for r in readers if r.op_type == "GlobalAveragePool"]
            if len(readers) != 2 or len(pools) != 1:
                return None
            squeeze = g.only_consumer(pools[0].output[0])
            if not g.own_weight(conv) or not g.own_weight(squeeze) or g.attrs(squeeze).get("group", 1) != 1:
                return None
            return conv, squeeze
        return None
    while node is not None and node.op_type in POSITIVE_HOMOGENEOUS and g.only_consumer(node.input[0]) is node:
        node = g.producer.get(node.input[0])
    return (node, None) if g.own_weight(node) else None


def per_channel(g: Graph, node, channels: int) -> bool:
    """``node`` is a depthwise 1x1 convolution over ``channels`` channels (a norm) with weights of its own."""
    if node.op_type != "Conv" or not g.own_weight(node):
        return False
    dims = list(g.initializers[node.input[1]].dims)
    return g.attrs(node).get("group", 1) == channels and dims == [channels, 1, 1, 1]


def equalize(model, features_of: Callable[[object, list[str]], Iterable[list[np.ndarray]]]) -> dict[str, float]:
    """Scale the channels of concatenated features to one range; returns each scaled tensor's range ``r`` (-r..r).

    ``features_of(model, names)`` runs the float model on calibration images and yields, batch by batch,
    the tensors ``names``. Each channel's largest magnitude over the calibration images becomes the median
    of those of its group, by scaling the convolution that makes it (and, where a squeeze-and-excitation
    reads it, dividing that out again in the gate); every depthwise (per-channel) convolution that reads the
    channel divides it out. A group is left as it is when anything else reads its tensors.
    """
    g = Graph(model)
    plans = []
    for features, joined in concatenated_features(g):
        ways = {f: rescalable(g, f) for f in features}
        if any(w is None for w in ways.values()):
            continue
        widths = {f: g.initializers[ways[f][0].input[1]].dims[0] for f in features}
        layout: dict[str, list[str]] = {f: [f] for f in features}
        for node in g.graph.node:
            if node.op_type == "Concat" and node.output[0] in joined:
                layout[node.output[0]] = [f for name in node.input for f in layout[name]]
        readers = [(name, r) for name in layout for r in g.consumers.get(name, [])
                   if not (r.op_type == "Concat" and r.output[0] in layout)]
        if all(per_channel(g, r, sum(widths[f] for f in layout[name])) for name, r in readers):
            plans.append((features, ways, layout, readers))
    if not plans:
        return {}
    names = [f for features, *_ in plans for f in features]
    largest = dict.fromkeys(names)
    for outputs in features_of(model, names):
        for name, value in zip(names, outputs):
            m = np.abs(value).max(axis=tuple(i for i in range(value.ndim) if i != 1))
            largest[name] = m if largest[name] is None else np.maximum(largest[name], m)
    ranges: dict[str, float] = {}
    for features, ways, layout, readers in plans:
        target = float(np.median(np.concatenate([largest[f] for f in features])))
        if target <= 0:
            continue
        scale = {f: np.where(largest[f] > 1e-6 * target, target / np.maximum(largest[f], 1e-30), 1.0)
                 .astype(np.float32) for f in features}
        for f, (conv, squeeze) in ways.items():
            a = scale[f]
            g.constant(g.array(conv.input[1]) * a[:, None, None, None], conv.input[1])
            if len(conv.input) > 2 and conv.input[2]:
                g.constant(g.array(conv.input[2]) * a, conv.input[2])
            if squeeze is not None:
                g.constant(g.array(squeeze.input[1]) / a[None, :, None, None], squeeze.input[1])
        for name, reader in readers:
            a = np.concatenate([scale[f] for f in layout[name]])
            g.constant(g.array(reader.input[1]) / a[:, None, None, None], reader.input[1])
        ranges.update(dict.fromkeys(layout, target))
    return ranges
