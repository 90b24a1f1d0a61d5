"""The plan record and its execution: tensors computed on demand and written as a model folder with its card."""
