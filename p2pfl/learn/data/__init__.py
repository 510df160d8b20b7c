"""Dataset loaders, one module per family, and the types they return (:mod:`.core`).

The registry that names them is :data:`p2pfl.learn.datasets.DATASETS`.
"""
