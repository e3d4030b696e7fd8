"""An audio run evaluated end to end: spoken-digits (espeak-ng) ingested, an APC backbone pretrained
by hand for a few steps and exported, then probe / kNN / fine-tune of the word and probe / kNN of the
voice, beside log-mel features, random init and the supervised reference, in one report."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from evalrun import pretrain_by_hand
from workers.evaluate.config import EvalConfig
from workers.evaluate.evaluation import evaluate
from workers.ingest.audio import AudioFolder
from workers.ingest.shards import IngestParams, ingest
from workers.storage import RunLocation

pytestmark = [pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make test "
                                                                            "installs it as root on Debian)"),
              pytest.mark.usefixtures("one_torch_thread")]

APC = ["objective=apc", "objective_params={shift: 3}", "backbone=audio_apc", "backbone_params={dim: 16, layers: 1}",
       "batch_size=8", "workers=1", "seed=0", "lr=0.003"]


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    from workers.ingest.spoken_digits import generate

    root = tmp_path_factory.mktemp("audio-eval")
    src = generate(str(root / "sd"), voices=3, repeats=6, test_repeats=2, words=("one", "two", "three"),
                   progress=False)
    run = str(root / "run")
    manifest = ingest(RunLocation(run), AudioFolder(src), IngestParams(shard_size=16, val_fraction=0.25),
                      progress_bar=False)
    pretrain_by_hand(run, manifest, steps=3, base=APC)
    return run, manifest


def test_an_audio_run_is_scored_on_the_word_and_the_voice_beside_log_mel(audio_run):
    run, manifest = audio_run
    assert manifest["modality"] == "audio" and manifest["splits"]["test"]["count"] == 18
    config = EvalConfig(protocols=("probe", "knn", "finetune"), baselines=("raw_pixels", "random_init", "supervised"),
                        knn_k=5, finetune_epochs=1, supervised_epochs=1, finetune_batch_size=8, probe_max_iter=30)
    report = evaluate(run, config, log=lambda *_: None)
    cells = {(r["protocol"], r["features"]): r["value"] for r in report["results"]}
    for proto in ("probe", "knn", "voice_probe", "voice_knn"):
        for source in ("pretrained", "random_init", "log_mel", "supervised"):
            assert (proto, source) in cells, (proto, source)
    assert ("finetune", "pretrained") in cells and ("finetune", "supervised") in cells
    assert not any(s == "raw_pixels" for _, s in cells)            # audio: the input baseline is log-mel
    # three distinct synthetic voices: the log-mel statistics tell them apart far above chance (1/3)
    assert cells["voice_probe", "log_mel"] > 0.6 and cells["voice_knn", "log_mel"] > 0.6
    assert report["details"]["voice_probe/pretrained"]["classes"] == 3
    md = open(os.path.join(run, "report.md")).read()
    assert "| protocol (test, %) | pretrained | random init | log-mel | supervised |" in md
    assert "voice: linear probe, top-1" in md and "utterance class: linear probe, top-1" in md
    assert "**audio**" in md and json.load(open(os.path.join(run, "eval", "audio.json")))


def test_utterances_without_a_voice_refuse_the_voice_rows_and_the_rest_runs(audio_run, tmp_path):
    run, manifest = audio_run
    src = tmp_path / "novoice"
    shutil.copytree(json.load(open(os.path.join(run, "manifest.json")))["source"]["path"], src)
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith(".json") and f != "spoken_digits.json":
                os.remove(os.path.join(dirpath, f))
    run2 = str(tmp_path / "run")
    m2 = ingest(RunLocation(run2), AudioFolder(str(src)), IngestParams(shard_size=16, val_fraction=0.25),
                progress_bar=False)
    pretrain_by_hand(run2, m2, steps=1, base=APC)
    report = evaluate(run2, EvalConfig(protocols=("probe",), baselines=("raw_pixels",), probe_max_iter=10),
                      log=lambda *_: None)
    refused = {r["protocol"]: r["reason"] for r in report["refused"]}
    assert "'voice'" in refused["voice_probe"] and "NAME.json" in refused["voice_probe"]
    assert {(r["protocol"], r["features"]) for r in report["results"]} == {("probe", "pretrained"), ("probe", "log_mel")}
