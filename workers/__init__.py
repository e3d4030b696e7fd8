"""What runs on Ray nodes: shard writing and reading, training and evaluation loops.

May import ray, webdataset, fsspec/s3fs and ssl_models; never prefect (flows/ sits above).
"""
