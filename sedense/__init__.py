"""sedense: SE-DenseNet and DenseNet image classifiers with PyTorch Lightning."""

__version__ = "0.1.0"
