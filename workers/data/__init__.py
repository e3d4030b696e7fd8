"""Shards as every stage reads them: written by ``ingest``, read by ``pretrain`` and ``evaluate``.

    tarformat.py   the shards' tar format (a plain ustar writer and reader, header checksums)
    images.py      image validation, encoding for shards, decoding to uint8 tensors
    manifest.py    manifest.json: the run's shards, classes and channels
    integrity.py   every shard's sha256 checked; damage named with its fix, recorded in the run
    stream.py      a split as a WebDataset stream: rank/worker splitting, verified shards
    loader.py      per-rank batches for pretraining, whole splits in memory for evaluation
"""
