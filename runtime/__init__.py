"""dfpgen.runtime: the PyTorch binding (the only part of dfpgen that imports torch)."""
import torch  # noqa: F401
