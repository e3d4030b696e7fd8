"""The ``gelato`` command line: one sub-command per pipeline stage.

Each sub-command validates its arguments and checks its storage before starting any Prefect or Ray
machinery, so a typo fails in a second with a message naming what is wrong.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import gelato
import gelato.api
from flows import prefect_server

STAGES = {
    "ingest": "turn raw images into sharded WebDataset archives + manifest.json (local or s3://)",
    "pretrain": "pretrain a backbone with an SSL objective on Ray Train workers (resumable)",
    "evaluate": "linear probe, kNN, fine-tune and few-label evaluation with baselines; writes report.md/.json",
    "run": "the whole pipeline: ingest -> pretrain -> evaluate -> report, as one Prefect flow",
    "deploy": "register prefect.yaml's deployments with the Prefect API (process work pool)",
    "serve": "serve prefect.yaml's deployments from this process, with their schedules",
    "doctor": "what gelato will do on this machine: CPU/GPU, precision auto, a measured step, versions, data",
    "export": "write a run's backbone for torchvision, timm, TorchScript or ONNX (+ a JSON of its input), checked",
    "embed": "embeddings of a run's split or of any folder / S3 prefix of images, as Parquet (resumable)",
}


FLOW_STAGES = ("ingest", "pretrain", "evaluate", "run")  # the stages that run a Prefect flow


def _add_ingest(sub) -> None:
    p = sub.add_parser("ingest", help=STAGES["ingest"], description=STAGES["ingest"])
    p.add_argument("source", help="'fashion-mnist', 'moving-fashion-mnist' (generated videos; "
                                  "'moving-fashion-mnist-sound': with a sound track), 'spoken-digits' (speech "
                                  "generated with espeak-ng), an ImageFolder root, a flat folder of images, a folder "
                                  "of videos or of audio files (class sub-folders, flat, or labels.csv), or a VOC2007 root")
    p.add_argument("--out", required=True, metavar="RUN_URI", help="run directory: local path or s3://bucket/prefix")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--image-format", choices=["keep", "png", "jpeg", "webp"], default="keep",
                   help="keep the original bytes (default) or re-encode")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="seeded share of train held out as val (default 0.1, or 0 where the source has val)")
    p.add_argument("--test-fraction", type=float, default=None, metavar="F",
                   help="seeded share of train held out as test, where a labelled source has no test split "
                        "(default 0.1 there, else 0): evaluation reports on test")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the val and test splits (default 0)")
    p.add_argument("--overwrite", action="store_true", help="delete what --out holds and start afresh")
    p.add_argument("--data-root", default=None, help="folder holding Fashion-MNIST's idx files")
    p.add_argument("--kind", default="auto",
                   choices=["auto", "fashion-mnist", "moving-fashion-mnist", "moving-fashion-mnist-sound", "spoken-digits", "imagefolder", "flat", "voc",
                            "videofolder", "audiofolder"],
                   help="source layout (default: detected)")
    p.add_argument("--clip-frames", type=int, default=16, metavar="T", help="videos: frames per clip (default 16)")
    p.add_argument("--clip-fps", type=float, default=10.0, metavar="FPS", help="videos: clip frame rate (default 10)")
    p.add_argument("--clip-size", type=int, default=None, metavar="PX",
                   help="videos: resize frames to PX x PX (default: as decoded; moving-fashion-mnist: 64)")
    p.add_argument("--clip-codec", default="png", choices=["png", "ffv1", "h264"],
                   help="videos: how clips are stored in the shards: png (default; a lossless PNG per frame, the "
                        "fastest to decode), ffv1 (one lossless video), h264 (one lossy video, the smallest)")
    p.add_argument("--audio-rate", type=int, default=16000, metavar="HZ",
                   help="audio: resample every file to HZ, mono (default 16000)")
    p.add_argument("--audio-seconds", type=float, default=1.0, metavar="S",
                   help="audio: segment length; longer files are cut into segments of S seconds, and the loader "
                        "centres every utterance in S seconds (default 1.0)")
    p.add_argument("--config", default=None, help="YAML whose storage_options (s3fs keyword arguments) open --out")
    p.add_argument("--repair", nargs="*", default=None, metavar="SHARD",
                   help="a finished ingest: check these shards (none named: all) against manifest.json and rewrite "
                        "only the damaged ones (the command an error about a damaged shard gives)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_ingest(a) -> int:
    m = gelato.ingest(a.source, a.out, shard_size=a.shard_size, image_format=a.image_format,
                      val_fraction=a.val_fraction, test_fraction=a.test_fraction, seed=a.seed, overwrite=a.overwrite,
                      data_root=a.data_root, kind=a.kind, storage_options=gelato.api.storage_options_of(a.config),
                      progress=not a.no_progress, repair=a.repair, clip_frames=a.clip_frames, clip_fps=a.clip_fps,
                      clip_size=a.clip_size, clip_codec=a.clip_codec, audio_rate=a.audio_rate,
                      audio_seconds=a.audio_seconds).manifest
    print(f"\n{a.out}/manifest.json: {m['count']} samples, {len(m['rejected'])} rejected, "
          f"{m['channels']} channel(s), classes: {len(m['classes'] or [])}")
    for split, s in m["splits"].items():
        print(f"  {split:<5} {s['count']:>8} samples  {len(s['shards']):>4} shards")
    for r in m["rejected"][:10]:
        print(f"  rejected {r['path']}: {r['reason']}")
    if len(m["rejected"]) > 10:
        print(f"  ... and {len(m['rejected']) - 10} more rejected (see manifest.json)")
    return 0


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help=STAGES["pretrain"], description=STAGES["pretrain"] + (
        ". Overrides are key=value pairs on top of the config, e.g. workers=2 epochs=5 "
        "objective_params.temperature=0.2"))
    p.add_argument("--run", required=True, metavar="RUN_URI", help="run directory holding the ingested shards")
    p.add_argument("--config", default=None, help="YAML config (see configs/); defaults: SimCLR, ResNet-18/32, 28 px")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="discard this run's checkpoints and start afresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ray-dashboard", action="store_true",
                   help="with a local Ray (no --address), start its dashboard too (off by default: faster start)")


def _run_pretrain(a) -> int:
    r = gelato.pretrain(a.run, a.config, overrides=a.overrides, address=a.address, overwrite=a.overwrite,
                        progress=not a.no_progress, ray_dashboard=a.ray_dashboard)
    print(f"\n{r.backbone}: {r.summary['objective']} / {r.summary['backbone']}, {r.steps} steps")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help=STAGES["evaluate"], description=STAGES["evaluate"] + (
        ". Every protocol reports on the test split; baselines run on the same splits and protocols. Settings: "
        "--config (an evaluation YAML, or a pipeline YAML's evaluate: section), then the options below, then "
        "KEY=VALUE overrides (any EvalConfig field, e.g. frozen_grid=2 probe_max_iter=50). Each evaluation "
        "is written to RUN/report-<settings hash>.json; report.md shows the latest; report.json keeps the "
        "first settings'. A run already evaluated with these settings is shown, not recomputed (--again)."))
    p.add_argument("--run", required=True, metavar="RUN_URI", help="run directory (ingested, and pretrained)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="evaluation settings: a YAML of EvalConfig fields, or a pipeline YAML (its evaluate: "
                        "section, e.g. configs/pipeline_demo.yaml for the demo's); its storage_options open --run")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="evaluation config overrides")
    p.add_argument("--protocols", default=None, metavar="LIST",
                   help="comma-separated subset of probe,knn,finetune,fewshot (default: all)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="backbone.pt, or a Ray checkpoint folder / its state.pt; a path relative to the run works "
                        "(default: RUN_URI/checkpoints/final/backbone.pt)")
    p.add_argument("--baselines", default=None, metavar="LIST",
                   help="comma-separated subset of raw_pixels,random_init,supervised, or 'none' "
                        "(default: raw_pixels,random_init; supervised costs a training run)")
    p.add_argument("--finetune-epochs", type=float, default=None, metavar="N",
                   help="fine-tuning epochs, a fraction allowed (default 5)")
    p.add_argument("--finetune-lr", type=float, default=None, metavar="LR",
                   help="AdamW learning rate of the new head, and of the supervised reference (default 1e-2); "
                        "the pretrained backbone gets a tenth of it")
    p.add_argument("--supervised-epochs", type=int, default=None, metavar="N",
                   help="epochs of the supervised reference (default: as many as the pretraining)")
    p.add_argument("--knn-k", type=int, default=None, metavar="K", help="kNN neighbours (default 200)")
    p.add_argument("--knn-t", type=float, default=None, metavar="T", help="kNN temperature (default 0.1)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N samples per split (quick runs)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 where the device runs it natively, fp16 on older GPUs, else fp32")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="size the evaluation to about M minutes on this machine, from measured costs")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of random init, few-label subsets, fine-tuning (default 0)")
    p.add_argument("--on-corrupt", choices=["fail", "skip"], default=None,
                   help="a damaged shard: fail (default; the error names it and the repair command) or skip it "
                        "(counted in the report)")
    p.add_argument("--again", action="store_true",
                   help="evaluate even where the run holds this checkpoint's evaluation with these settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _csv(value: str, allowed: tuple, flag: str) -> tuple:
    items = tuple(x.strip() for x in value.split(",") if x.strip() and x.strip() != "none")
    bad = [x for x in items if x not in allowed]
    if bad:
        raise ValueError(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


EVAL_OPTIONS = ("checkpoint", "finetune_epochs", "finetune_lr", "supervised_epochs", "knn_k", "knn_t", "limit",
                "device", "precision", "budget_minutes", "seed", "on_corrupt")


def _run_evaluate(a) -> int:
    from workers.evaluate.config import BASELINES, PROTOCOLS
    from workers.evaluate.report import table_markdown

    options = {k: getattr(a, k) for k in EVAL_OPTIONS if getattr(a, k) is not None}
    if a.protocols is not None:
        options["protocols"] = _csv(a.protocols, PROTOCOLS, "--protocols")
        if not options["protocols"]:
            raise ValueError("--protocols: name at least one of " + ", ".join(PROTOCOLS))
    if a.baselines is not None:
        options["baselines"] = _csv(a.baselines, BASELINES, "--baselines")
    r = gelato.evaluate(a.run, a.config, overrides=a.overrides, options=options, progress=not a.no_progress,
                        again=a.again)
    print(f"\n{r.run}/report.md ({r.report.get('report_file', 'report.json')}; checkpoint {r.report['checkpoint']}):\n")
    print(table_markdown(r.table))
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help=STAGES["run"], description=STAGES["run"] + (
        ". Overrides are key=value pairs, e.g. pretrain.budget_minutes=10 evaluate.finetune_epochs=2"))
    p.add_argument("--config", default=None, help="pipeline YAML (see configs/pipeline_*.yaml)")
    p.add_argument("--run", default=None, metavar="RUN_URI", help="run directory (overrides the config's run)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_run(a) -> int:
    from workers.evaluate.report import table_text

    overrides = list(a.overrides) + ([f"run={a.run}"] if a.run else [])
    r = gelato.run(a.config, overrides=overrides, progress=not a.no_progress)
    print(f"\nThe Gelato Bet on {r.run} (test split, %):\n")
    print(table_text(r.table))
    print(f"\nreport: {r.run}/report.md")
    return 0


def _add_deployments(sub) -> None:
    for name in ("deploy", "serve"):
        p = sub.add_parser(name, help=STAGES[name], description=STAGES[name])
        p.add_argument("--file", default=None, help="deployments file (default: prefect.yaml at the repository root)")
        p.add_argument("--only", nargs="*", default=None, metavar="NAME", help="only these deployments")
        if name == "deploy":
            p.add_argument("--work-pool", default=None, help="override the work pool of every deployment")


def _run_deploy(a) -> int:
    from flows.deploy import deploy, read_deployments

    read_deployments(a.file, a.only)  # a bad file fails before contacting the API
    ids = deploy(a.file, a.only, a.work_pool)
    print(f"registered {len(ids)} deployment(s); run them with a worker: prefect worker start --pool "
          f"{a.work_pool or 'gelato-process'}")
    return 0


def _run_serve(a) -> int:
    from flows.deploy import read_deployments, serve

    names = [d["name"] for d in read_deployments(a.file, a.only)]
    print(f"serving {', '.join(names)} (Ctrl-C to stop)")
    serve(a.file, a.only)
    return 0


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help=STAGES["doctor"], description=STAGES["doctor"])
    p.add_argument("--no-measure", action="store_true", help="skip the measured training steps")


def _run_doctor(a) -> int:
    from workers.doctor import main as doctor

    return doctor(measure=not a.no_measure)


def _add_export(sub) -> None:
    from workers.export import FORMATS

    p = sub.add_parser("export", help=STAGES["export"], description=STAGES["export"] + (
        ". The file is loaded back with the target library and its features compared with gelato's "
        "backbone on the same batch; OUT.json beside it holds the architecture, input size, channels, "
        "normalisation and a line that loads it."))
    p.add_argument("--run", required=True, help="a run (local or s3://), or a backbone.pt")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="local path of the exported file")
    p.add_argument("--config", help="YAML whose storage_options reach the run's storage")


def _run_export(a) -> int:
    spec = gelato.export(a.run, a.format, a.out, storage_options=gelato.api.storage_options_of(a.config)).spec
    print(f"{a.format}: {a.out} ({spec['architecture']}, {spec['in_channels']} x {spec['image_size']} x "
          f"{spec['image_size']} -> {spec['feature_dim']}); max |difference| from gelato's backbone "
          f"{spec['check']['max_abs_diff']:.1e} on a batch of {spec['check']['batch']}")
    print(f"input: /255, resize to {spec['image_size']}, normalise with mean {spec['mean']} std {spec['std']}; "
          f"spec: {a.out}.json")
    print(f"load: {spec['load']}")
    return 0


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help=STAGES["embed"], description=STAGES["embed"] + (
        ": key, label (null when unknown) and vector columns in OUT/part-NNNNN.parquet, written as they are "
        "finished; the same command again resumes. pyarrow.parquet.read_table(OUT) reads them all."))
    p.add_argument("--run", required=True, help="the run whose backbone embeds (local or s3://)")
    p.add_argument("--data", required=True, help="a split of the run (train, val, test) or a folder / s3:// prefix of images")
    p.add_argument("--out", required=True, help="folder or s3:// prefix for the Parquet parts")
    p.add_argument("--checkpoint", default=None, help="another backbone.pt than the run's checkpoints/final/")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace embeddings of other inputs already at --out")
    p.add_argument("--config", help="YAML whose storage_options reach the run's and --out's storage")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_embed(a) -> int:
    r = gelato.embed(a.run, a.data, a.out, checkpoint=a.checkpoint, batch_size=a.batch_size, overwrite=a.overwrite,
                     storage_options=gelato.api.storage_options_of(a.config), progress=not a.no_progress)
    print(f"{a.out}: {r.count} vectors of {r.feature_dim} floats in {r.parts} part(s), "
          f"{r.parts_written} written now, {r.parts - r.parts_written} already there")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gelato",
        description="Self-supervised pretraining as a pipeline. Stages:\n"
                    + "\n".join(f"  {k:<10} {v}" for k, v in STAGES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    _add_ingest(sub)
    _add_pretrain(sub)
    _add_evaluate(sub)
    _add_run(sub)
    _add_deployments(sub)
    _add_doctor(sub)
    _add_export(sub)
    _add_embed(sub)
    return parser


RUNNERS = {"ingest": _run_ingest, "pretrain": _run_pretrain, "run": _run_run, "deploy": _run_deploy, "serve": _run_serve, "evaluate": _run_evaluate,
           "doctor": _run_doctor, "export": _run_export, "embed": _run_embed}


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input or data: one line each, never a traceback."""
    from workers.config import ConfigError
    from workers.data.integrity import CorruptShard
    from workers.ingest.shards import IngestError
    from workers.ingest.records import SourceError
    from workers.storage import StorageError

    return (ConfigError, SourceError, StorageError, IngestError, CorruptShard, ValueError, FileNotFoundError)


class OneTraceback(logging.Filter):
    """On Prefect's flow- and task-run loggers: an expected error is not logged there at all (the
    command prints it as one line, and the run's state carries it to the UI); an unexpected one
    keeps its traceback the first time it is logged, and only its message after (a task, its flow
    and a parent flow each log the same exception)."""

    def __init__(self, expected: tuple):
        super().__init__()
        self.expected, self.shown = expected, set()
        self.names = tuple(t.__name__ for t in expected)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.expected):
            return False
        if exc is None:
            msg = record.getMessage()
            if "Finished in state Failed" in msg and any(f"{n}:" in msg or f"{n}(" in msg for n in self.names):
                return False
        if exc is not None:
            if id(exc) in self.shown:
                record.exc_info, record.exc_text = None, None
            self.shown.add(id(exc))
        return True


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    expected = expected_errors()
    one_traceback = OneTraceback(expected)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(one_traceback)

    if args.stage in FLOW_STAGES:  # Prefect's temporary server boots while the command checks its inputs
        prefect_server.start_early()
    try:
        return RUNNERS[args.stage](args)
    except expected as e:
        print(f"gelato {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if id(e) not in one_traceback.shown:
            raise  # its traceback, printed once by Python
        print(f"gelato {args.stage}: failed: {type(e).__name__}: {e} (traceback above)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gelato {args.stage}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        prefect_server.stop()
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).removeFilter(one_traceback)


if __name__ == "__main__":
    sys.exit(main())
