"""Embeddings of images with a pretrained backbone: ``gelato embed``.

* ``embedding.py`` — a run's split, or any folder or S3 prefix of images, through the run's backbone
  (its own input preprocessing), written as a Parquet dataset of (key, label, vector) parts; resumable.
"""
