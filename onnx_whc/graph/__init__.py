"""The ONNX graph and its channels: reading a model (`load`, `storage`), the channel analysis (`ops` as
the op table, `dependency`, `reshape_target`), the plan surgery reads (`plan`) and the rewrite (`surgery`),
the exactness oracle (`equivalence`), constant values, segments of a graph, reverse-mode gradients
written as ONNX nodes (`backward`), and running models in ONNX Runtime (`runtime`)."""
