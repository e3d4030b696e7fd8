"""Learning from sound through the real stages: generated speech and generated clips with sound,
ingested, an audio objective and the audio-visual one trained on Ray Train workers, and both scored
by the evaluation flow (one Prefect server for both, to keep the suite short)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

pytestmark = [pytest.mark.slow,  # a private Ray instance and Prefect's server
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make test "
                                                                            "installs it as root on Debian)")]


def test_wav2vec2_and_audio_visual_correspondence_train_on_ray_and_are_scored(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    import gelato
    from workers.ingest.moving_fmnist import generate as generate_clips
    from workers.ingest.sources import FashionMNIST
    from workers.ingest.spoken_digits import generate

    speech = generate(str(tmp_path / "sd"), voices=2, repeats=6, test_repeats=2, words=("one", "two"), progress=False)
    generate_clips(str(tmp_path / "videos"), {"train": 12, "test": 6}, FashionMNIST(), frames=8, size=32, sound=True)
    audio_run, av_run = str(tmp_path / "audio"), str(tmp_path / "av")
    with prefect_test_harness(server_startup_timeout=90):
        gelato.ingest(speech, audio_run, shard_size=8, val_fraction=0.25, progress=False)
        gelato.ingest(str(tmp_path / "videos"), av_run, shard_size=6, val_fraction=0.25, clip_frames=8, progress=False)
        tiny = ["backbone_params={dim: 16, layers: 1, heads: 2}", "batch_size=4", "workers=1", "loader_workers=0",
                "steps=3", "knn_bank=10", "knn_queries=10", "knn_k=3", "objective_params.num_negatives=4"]
        audio = gelato.pretrain(audio_run, "configs/spoken_digits_wav2vec2.yaml", overrides=tiny, progress=False)
        audio_report = gelato.evaluate(audio_run, {"protocols": ["probe", "knn"], "knn_k": 3, "probe_max_iter": 10,
                                                   "frozen_grid": 3, "frozen_stages": 2}, progress=False).report
        av = ["backbone_params={small_stem: true, width: 8}", "image_size=32", "batch_size=4", "workers=1",
              "loader_workers=0", "steps=3", "knn_monitor=false", "objective_params.embed_dim=8",
              "objective_params.audio_dim=8"]
        gelato.pretrain(av_run, "configs/moving_fmnist_av_correspondence.yaml", overrides=av, progress=False)
        av_report = gelato.evaluate(av_run, {"protocols": ["probe"], "video_protocols": [], "probe_max_iter": 10},
                                    progress=False).report
    rows = [json.loads(x) for x in open(os.path.join(audio_run, "metrics.jsonl"))]
    assert audio.steps == 3 and any("code_perplexity" in r for r in rows) and any("knn_top1" in r for r in rows)
    cells = {(r["protocol"], r["features"]) for r in audio_report["results"]}
    assert {("probe", "pretrained"), ("knn", "log_mel"), ("voice_probe", "pretrained"), ("voice_knn", "random_init"),
            ("voice_probe", "log_mel")} <= cells and audio_report["modality"] == "audio"
    av_cells = {(r["protocol"], r["features"]) for r in av_report["results"]}
    assert {("probe", "pretrained"), ("av_retrieval", "pretrained"), ("av_localisation", "random_init")} <= av_cells
