"""Giving a pruned model its accuracy back: post-training recovery, without training.

`replay` runs a model forward in segments with ONNX Runtime, caching the live activations;
`layers` describes every Conv/Gemm/MatMul, samples its input patches and writes its weights;
`lsq` solves each layer's weights by ridge regression against the original's outputs;
`stats` matches each layer's output mean and std to the original's; `bias` estimates removed
channels' expected values without data and folds them into the readers' biases.
`recover` wires them into one pipeline stage.
"""
