"""gelato's Python API: the command line's stages as functions, with the same typed configs.

    import gelato

    gelato.ingest("~/my_photos", "runs/mine")                      # -> IngestResult
    gelato.pretrain("runs/mine", "configs/fashion_mnist_simclr.yaml", overrides=["epochs=5"])
    report = gelato.evaluate("runs/mine")                          # -> EvalResult (.table, .report)
    gelato.export("runs/mine", "onnx", "backbone.onnx")            # -> ExportResult
    gelato.embed("runs/mine", "test", "runs/mine/embeddings")      # -> EmbedResult
    backbone = gelato.load_backbone("runs/mine")                   # backbone(uint8 images) -> features
    gelato.run("configs/pipeline_demo.yaml")                       # the whole pipeline

A config is the typed model (``PretrainConfig``, ``EvalConfig``, ``PipelineConfig``), a dict of its
fields, or a YAML path; ``overrides`` are the command line's ``key=value`` strings. Everything is
in ``gelato.api``; torch, Ray and Prefect are imported when a function is called, not on import.
"""
from gelato.api import (Backbone, EmbedResult, EvalResult, ExportResult, IngestResult, PretrainResult,  # noqa: F401
                        embed, evaluate, export, ingest, load_backbone, pretrain, run)
