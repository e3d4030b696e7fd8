"""Taking a pretrained backbone out of gelato: ``gelato export``.

* ``spec.py`` — what a user needs beside the weights: architecture, input size and channels, the
  normalisation the backbone was trained with (``export.json``);
* ``formats.py`` — the backbone written for torchvision, timm, TorchScript or ONNX, each checked by
  loading it back with the target library.
"""

FORMATS = ("torchvision", "timm", "torchscript", "onnx")  # here, torch-free: the command line lists them
