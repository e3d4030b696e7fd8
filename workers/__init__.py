"""The work itself, one sub-package per stage, as plain functions (no Prefect: ``flows/`` sits above).

    data/       shards as every stage reads them: storage format, images, manifest, stream, loader
    ingest/     raw images -> shards (sources, resumable writing, repair)
    pretrain/   the training loop and its launchers (Ray Train, torchrun), run log, export
    evaluate/   probe, kNN, fine-tune, few-label, baselines, the report
    export/     a run's backbone for torchvision, timm, TorchScript, ONNX, checked by loading it back
    embed/      embeddings of a split or any folder of images, as a resumable Parquet dataset

The modules beside them are shared by the stages: ``config`` (the pretraining config), ``model``
(building and loading backbones), ``storage`` and ``credentials`` (local disk or S3), ``hardware``
(what the machine can do; precision auto), ``knn``, ``plots``, and ``doctor`` (``gelato doctor``).
Stages import the shared modules and ``data``, never each other (``evaluate`` loads what
``pretrain`` exported through ``model``). May import ray, fsspec/s3fs and ssl_models; never prefect.
"""
