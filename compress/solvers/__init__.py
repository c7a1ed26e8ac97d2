"""Pure numerical solvers used by stages: no model traversal, no I/O, tensors in and tensors out."""
