"""The passes: expand, collapse, fold_bn, and what they build and swap into a model."""
