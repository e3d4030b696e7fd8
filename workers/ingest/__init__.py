"""Ingest: raw images (Fashion-MNIST, an ImageFolder, a flat folder, VOC2007) -> sharded WebDataset
archives and ``manifest.json``, resumable and repairable.

    sources.py   what a source holds, listed per split without reading pixels
    shards.py    the plan, the shard writer (atomic, resumable), the manifest, ``--repair``
"""
