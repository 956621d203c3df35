"""fedhpc: federated learning across supercomputers."""

__version__ = "0.1.0"
