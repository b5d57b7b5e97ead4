"""Support code of the examples, benchmarks and tests, installed as ``dfpgen.examples``: not
part of the runtime API.

- :mod:`dfpgen.examples.models`: ResNet-20 (Fashion-MNIST) and a torchvision-shaped ResNet-50
  built in-repo, plain ``nn.Conv2d`` / ``nn.Linear`` layers for ``dfpgen.runtime.convert``;
- :mod:`dfpgen.examples.data`: Fashion-MNIST read from its idx files.

The scripts beside them (``train_fashion_mnist.py``, ``convergence.py``) are the examples.
"""
