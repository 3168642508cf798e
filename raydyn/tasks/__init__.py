"""Tasks: data sets and models. Pure tensors and nn.Modules, no I/O beyond scikit-learn's bundled digits."""
