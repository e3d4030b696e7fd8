"""The evaluation report: ``RUN/report-<settings hash>.json``, ``RUN/report.json``, ``RUN/report.md``
and ``RUN/plots/*.png``.

Each evaluation writes ``report-<hash>.json``, named by the hash of its settings (``EvalConfig.
config_hash``), so evaluations with other settings sit beside each other. ``report.json`` is the run's
report: the first evaluation's (the pipeline's), replaced only by one with the same settings (a
newer checkpoint); ``report.md`` is the latest evaluation's, and names its JSON file and the others.

report.json holds every figure; its ``results`` are one row per table cell
``{"protocol", "features", "metric", "split": "test", "value"}`` (few-label rows also say
``"via": "probe" | "finetune"``), so tools can read it. report.md is for people: the results
table (protocol × {pretrained, random init, raw pixels, supervised}; a cell that was not
computed in this run says "not run"), the pretraining curves, a 2-D PCA of the test features and
the probe's confusion matrix. The figures are drawn by ``workers/plots.py`` and written through
fsspec like everything else in the run.
"""
from __future__ import annotations

import json
import time
from typing import Optional

from workers.data import integrity
from workers.evaluate.config import AUDIO_PROTOCOLS, AV_PROTOCOLS, VIDEO_PROTOCOLS
from workers.model import PRETRAIN_PLOT
from workers.plots import confusion_plot, curve_plot, embedding_plot

COLUMNS = [("pretrained", "pretrained"), ("random_init", "random init"), ("raw_pixels", "raw pixels"),
           ("supervised", "supervised")]
# shown only where the report has it: the weights a pretraining started from (init_from)
INIT_COLUMN = ("init_from", "start (init_from)")
# an audio run's input baseline takes raw pixels' place
AUDIO_COLUMNS = [c if c[0] != "raw_pixels" else ("log_mel", "log-mel") for c in COLUMNS]


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    """The table's columns: the four of every report (an audio run: log-mel for raw pixels), and
    init_from's after random init where computed."""
    base = AUDIO_COLUMNS if any("log_mel" in r for r in rows) else COLUMNS
    if any(INIT_COLUMN[0] in r for r in rows):
        return base[:2] + [INIT_COLUMN] + base[2:]
    return base


# ----------------------------------------------------------------------------- the table

VIDEO_ROWS = [("clip_probe", "top1", None, "clip: linear probe ({what}), top-1"),
              ("clip_knn", "top1", None, "clip: kNN ({what}), top-1"),
              ("label_propagation", "J", None, "clip: label propagation, J (mean IoU)"),
              ("alignment", "top1", None, "clip: cross-view alignment, top-1")]
AV_ROWS = [("av_retrieval", "top1", None, "sound → frame retrieval (sounding item's class), top-1"),
           ("av_localisation", "hit", None, "sound localisation: map's peak on the sounding item")]


AUDIO_ROWS = [("voice_probe", "top1", None, "{target}: linear probe, top-1"),
              ("voice_knn", "top1", None, "{target}: kNN (k={k}, T={t}), top-1")]


def table_rows(multilabel: bool, n_classes: int, knn_k: int, knn_t: float,
               clip: Optional[dict] = None, audio: Optional[str] = None) -> list[tuple[str, str, Optional[str], str]]:
    """(protocol, metric, via, label) of every row the table shows, computed or not. ``clip`` (a clip
    run): ``{"frame_target": "item" | "clip", "clip_classes": [...]}``; its frame rows say what they
    predict and the clip rows follow. ``audio`` (an audio run): the second target's name (the voice);
    the class rows say "utterance class" and that target's rows follow."""
    if audio:
        return ([(p, m, v, f"utterance class: {label}") for p, m, v, label in table_rows(multilabel, n_classes, knn_k,
                                                                                            knn_t)]
                + [(p, m, v, label.format(target=audio, k=knn_k, t=knn_t)) for p, m, v, label in AUDIO_ROWS])
    if clip:
        frame = "frame, item class" if clip.get("frame_target") == "item" else "frame, clip class"
        what = "/".join(clip.get("clip_classes") or []) or "class"
        return ([(p, m, v, f"{frame}: {label}") for p, m, v, label in table_rows(multilabel, n_classes, knn_k, knn_t)]
                + [(p, m, v, label.format(what=what)) for p, m, v, label in VIDEO_ROWS] + AV_ROWS)
    if multilabel:
        return [("probe", "mAP", None, "linear probe, mAP"), ("knn", "mAP", None, f"kNN (k={knn_k}, T={knn_t}), mAP"),
                ("finetune", "mAP", None, "fine-tune, mAP")]
    rows = [("probe", "top1", None, "linear probe, top-1")]
    if n_classes > 5:
        rows.append(("probe", "top5", None, "linear probe, top-5"))
    rows += [("knn", "top1", None, f"kNN (k={knn_k}, T={knn_t}), top-1"), ("finetune", "top1", None, "fine-tune, top-1")]
    for proto, pct in (("fewshot_1pct", "1 %"), ("fewshot_10pct", "10 %")):
        rows += [(proto, "top1", "probe", f"{pct} labels: linear probe, top-1"),
                 (proto, "top1", "finetune", f"{pct} labels: fine-tune, top-1")]
    return rows


def results_table(report: dict) -> list[dict]:
    """The results table of a report.json dict: one row per line shown (a few-label row per
    protocol it went *via*), ``{"protocol": label, "pretrained": %, "random_init": %, ...}``, with
    None where a cell was not computed. The report's markdown, the Prefect table artifact and the
    tables the commands print are all drawn from these rows."""
    cells = {(r["protocol"], r["metric"], r.get("via"), r["features"]): r["value"] for r in report["results"]}
    # the k kNN used: the configured one unless the bank had fewer samples in a class (protocols.knn_k)
    used = [d["k"] for key, d in (report.get("details") or {}).items() if key.startswith("knn/") and "k" in d]
    clip = ({"frame_target": report.get("frame_target"), "clip_classes": report.get("clip_classes")}
            if report.get("modality") == "clip" else None)
    audio = report["eval_config"].get("audio_target", "voice") if report.get("modality") == "audio" else None
    shown = table_rows(report["multilabel"], len(report["classes"] or []), max(used, default=report["eval_config"]["knn_k"]),
                       report["eval_config"]["knn_t"], clip, audio)
    asked = set(report["eval_config"].get("protocols") or ("probe", "knn", "finetune", "fewshot"))
    asked |= set(report["eval_config"].get("video_protocols") or ()) if clip else set()
    asked |= {r["protocol"] for r in report["results"] if r["protocol"] in AV_PROTOCOLS}
    asked |= set(report["eval_config"].get("audio_protocols") or ()) if audio else set()
    rows = []
    cols = ((AUDIO_COLUMNS if audio else COLUMNS)
            + ([INIT_COLUMN] if any(r["features"] == INIT_COLUMN[0] for r in report["results"]) else []))
    for proto, metric, via, label in shown:
        if proto not in asked and proto.split("_")[0] not in asked:  # a protocol nobody asked for: no row
            continue
        vals = {col: cells.get((proto, metric, via, col)) for col, _ in cols}
        rows.append({"protocol": label} | {c: None if v is None else round(100 * v, 2) for c, v in vals.items()})
    return rows


def table_markdown(rows: list[dict]) -> str:
    """:func:`results_table`'s rows as a markdown table (values in % on test)."""
    cols = columns(rows)
    lines = ["| protocol (test, %) | " + " | ".join(label for _, label in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for r in rows:
        lines.append(f"| {r['protocol']} | "
                     + " | ".join("not run" if r[c] is None else f"{r[c]:.1f}" for c, _ in cols) + " |")
    return "\n".join(lines)


def table_text(rows: list[dict]) -> str:
    """:func:`results_table`'s rows as plain text for a terminal."""
    width = max([len("protocol (test, %)")] + [len(r["protocol"]) for r in rows])
    cols = columns(rows)
    head = f"{'protocol (test, %)':<{width}} " + " ".join(f"{label:>12}" for _, label in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['protocol']:<{width}} "
                     + " ".join(f"{'not run' if r[c] is None else '%.1f' % r[c]:>12}" for c, _ in cols))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def read_metrics(loc, fs=None) -> Optional[list[dict]]:
    """Rows of RUN/metrics.jsonl, or None when the run has none."""
    try:
        with (fs or loc.fs()).open(loc.join("metrics.jsonl"), "r") as f:
            return [json.loads(line) for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return None


def _plots(ev, by_key: dict) -> dict[str, str]:
    """Render and write the PNGs; returns {name: relative path} of those drawn."""
    out: dict[str, str] = {}

    def put(name: str, data: Optional[bytes]) -> None:
        if data is not None:
            ev.loc.write_atomic(f"plots/{name}.png", data, ev.fs)
            out[name] = f"plots/{name}.png"

    if ev.fs.exists(ev.loc.join(PRETRAIN_PLOT)):  # drawn when pretraining ended: loss, kNN, lr, throughput
        out["pretrain"] = PRETRAIN_PLOT
    rows = read_metrics(ev.loc, ev.fs) or []
    put("loss", curve_plot(rows, "loss", "pretraining loss", "loss"))
    put("knn", curve_plot(rows, "knn_top1", "online kNN top-1 on val (during pretraining)", "top-1"))
    split = ev.embedding_split
    labels = ev.split(split)["label"] if ev.classes and not ev.multilabel else None
    put("embedding", embedding_plot(ev.features("pretrained", split), labels, ev.classes,
                                    f"pretrained features, {split} split (PCA)"))
    probe = by_key.get(("probe", "pretrained"))
    if probe is not None and "confusion" in probe.details:
        put("confusion", confusion_plot(probe.details["confusion"], ev.classes, "linear probe (pretrained), test"))
    return out


# ----------------------------------------------------------------------------- the files

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def settings_report(config_hash: str) -> str:
    """The file of the evaluation made with settings of this hash, relative to the run."""
    return f"report-{config_hash}.json"


def read_report(loc, rel: str = REPORT_JSON, fs=None) -> Optional[dict]:
    try:
        with (fs or loc.fs()).open(loc.join(rel), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def reusable_report(loc, config_hash: str, checkpoint_sha256: Optional[str], fs=None) -> Optional[dict]:
    """The report made from this checkpoint with these settings, if the run holds one."""
    if checkpoint_sha256 is None:
        return None
    for rel in (settings_report(config_hash), REPORT_JSON):  # report.json alone: runs evaluated before 2026-12
        r = read_report(loc, rel, fs)
        if r is not None and r.get("eval_config_hash") == config_hash and r.get("checkpoint_sha256") == checkpoint_sha256:
            return r
    return None


def other_reports(loc, config_hash: str, fs=None) -> list[dict]:
    """{file, created, settings} of the run's other evaluations, newest first."""
    fs = fs or loc.fs()
    out = []
    for path in fs.glob(loc.join("report-*.json")):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name != settings_report(config_hash):
            r = read_report(loc, name, fs) or {}
            out.append({"file": name, "created": r.get("created", "?"), "checkpoint_steps": r.get("steps")})
    return sorted(out, key=lambda r: r["created"], reverse=True)


def write_report(ev, results: list, total_seconds: float, log=None) -> dict:
    """Write plots, eval/<protocol>.json, report-<hash>.json, report.json (unless it holds another
    settings' evaluation, which is kept) and report.md; return the report's content."""
    by_key = {(r.protocol, r.features): r for r in results}
    plots = _plots(ev, by_key)
    ck = ev.checkpoint
    durations = dict(ev.durations) | {f"{r.protocol}/{r.features}": r.seconds for r in results}
    report = {
        "run": ev.loc.uri,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": ck.uri, "checkpoint_sha256": ck.sha256, "checkpoint_kind": ck.kind, "steps": ck.steps,
        "objective": ck.config.objective, "backbone": ck.config.backbone,
        "config_hash": ck.config.training_hash(), "eval_config_hash": ev.requested.config_hash(),
        "eval_config": ev.config.model_dump(mode="json"), "seed": ev.config.seed, "device": ev.device,
        "execution": ev.execution.as_dict(),
        "eval_budget": ev.budget.as_dict() if ev.budget is not None else None,
        "frozen_train_samples": len(ev.frozen_train_index()) if ev.frozen_train_index() is not None else None,
        "skipped_shards": sorted(r["shard"] for r in integrity.damaged(ev.loc, mode="skip")),
        "classes": ev.classes or None, "multilabel": ev.multilabel,
        **({"clip_classes": ev.clip_classes or None, "frame_target": ev.frame_target} if ev.clip_run else {}),
        "init_from": ev.init_from,
        "modality": ev.manifest.get("modality", "image"),
        "splits": ev.loaded_splits(),
        "refused": [{"protocol": p, "reason": why} for p, why in ev.refused.items()],
        "results": [row for r in results for row in r.rows],
        "details": {f"{r.protocol}/{r.features}": r.details for r in results},
        "durations_s": durations | {"total": total_seconds},
        "plots": plots,
    }
    for proto in ("probe", "knn", "finetune", "fewshot", "video", "audio"):
        mine = {k: v for k, v in report["details"].items()
                if k.split("/")[0].split("_")[0] == proto or proto == "video" and k.split("/")[0] in VIDEO_PROTOCOLS
                or proto == "audio" and k.split("/")[0] in AUDIO_PROTOCOLS + AV_PROTOCOLS}
        if mine:
            ev.loc.write_atomic(f"eval/{proto}.json", json.dumps(mine, indent=1).encode(), ev.fs)
    h = report["eval_config_hash"]
    report["report_file"] = settings_report(h)
    text = json.dumps(report, indent=1).encode()
    ev.loc.write_atomic(settings_report(h), text, ev.fs)
    main = read_report(ev.loc, REPORT_JSON, ev.fs)
    if main is None or main.get("eval_config_hash") in (h, None):
        ev.loc.write_atomic(REPORT_JSON, text, ev.fs)
    elif log is not None:
        log(f"{REPORT_JSON} holds an evaluation with other settings ({main.get('eval_config_hash')}, "
            f"{main.get('created')}) and is kept; this one is {settings_report(h)} (report.md shows it)")
    ev.loc.write_atomic(REPORT_MD, render_markdown(report, other_reports(ev.loc, h, ev.fs)).encode(), ev.fs)
    return report


def track_report(loc, loggers, report: dict, fs=None) -> dict:
    """The report to the experiment trackers (``workers/tracking.py``): the table's cells, report.md,
    report-<hash>.json and the evaluation's plots. Returns {logger: where to look}."""
    from workers.tracking import Tracker

    fs = fs or loc.fs()
    plots = {}
    for name, rel in report.get("plots", {}).items():
        if name != "pretrain":  # the pretraining logged its own figure
            with fs.open(loc.join(rel), "rb") as f:
                plots[name] = f.read()
    tracker = Tracker(loc, loggers)
    try:
        tracker.params({f"eval.{k}": v for k, v in report["eval_config"].items()})
        tracker.report(report, render_markdown(report), plots)
    finally:
        tracker.close()
    return tracker.where()


def _budget_md(plan: Optional[dict]) -> list[str]:
    """One line on how a time budget sized this evaluation (nothing without a budget)."""
    if not plan:
        return []
    est = plan["estimate_s"]
    parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in est.items() if k != "total" and v >= 3)
    what = "; ".join(plan["notes"]) if plan["settings"] else "the configured protocol fits"
    return [f"- sized for a budget of {plan['budget_minutes']:g} min on this machine (measured costs): planned "
            f"{est['total'] / 60:.1f} min" + (f" ({parts} min)" if parts else "") + f"; {what}"
            + ("" if plan["fits"] else "; over the budget even so")]


def _execution_md(ex: Optional[dict], cfg: dict) -> str:
    """``bf16 + channels_last (auto: CPU has native bf16 (avx512_bf16))``; older reports: the config's."""
    if not ex:
        return str(cfg.get("precision", "fp32"))
    return f"{ex['precision']}{' + channels_last' if ex['channels_last'] else ''} ({ex['requested']}: {ex['reason']})"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def render_markdown(report: dict, others: Optional[list[dict]] = None) -> str:
    """report.md of ``report``; ``others`` (:func:`other_reports`) are listed under its header."""
    r, cfg = report, report["eval_config"]
    grid, stages = cfg.get("frozen_grid", 1), cfg.get("frozen_stages", 1)
    md = [f"# gelato evaluation: {r['run']}", "",
          f"- checkpoint: `{r['checkpoint']}` ({r['checkpoint_kind']}, sha256 `{r['checkpoint_sha256'][:16]}`, "
          f"{r['steps']} steps); objective `{r['objective']}`, backbone `{r['backbone']}`",
          f"- pretraining config hash `{r['config_hash']}`; evaluation config hash `{r['eval_config_hash']}`; "
          f"seed {r['seed']}; device {r['device']}; {r['created']}; {r['durations_s']['total']:.1f} s",
          "- samples: " + ", ".join(f"{s} {n}" for s, n in r["splits"].items())
          + (f" (at most {cfg['limit']} per split)" if cfg.get("limit") else "")
          + (f"; probe and kNN on a class-balanced subset of {r['frozen_train_samples']} train samples"
             if r.get("frozen_train_samples") else ""),
          f"- networks run at {_execution_md(r.get('execution'), cfg)}"
          + (f"; frozen features from images resized to {cfg['frozen_input_size']} px (frozen_input_size; "
             f"fine-tuning at the pretraining size)" if cfg.get("frozen_input_size") else "")
          + ((f"; frozen features: the frames of the last {stages} stage(s) (before and after the context) "
              f"averaged over {grid} equal spans of time and concatenated (frozen_grid, frozen_stages; log-mel "
              f"over the same spans)" if r.get("modality") == "audio" else
              f"; frozen features: the last {stages} stage(s) average-pooled to a {grid}×{grid} grid and "
              f"concatenated (frozen_grid, frozen_stages; Goyal et al. 2019)") if (grid, stages) != (1, 1) else ""),
          *_budget_md(r.get("eval_budget")),
          *_clips_md(r),
          *_av_md(r),
          *_audio_md(r),
          *([f"- this evaluation: [{r['report_file']}]({r['report_file']}); the run's other evaluations: "
             + ", ".join(f"[{o['file']}]({o['file']}) ({o['created']})" for o in others)] if others else []),
          *([f"- **{len(r['skipped_shards'])} damaged shard(s) skipped** (on_corrupt: skip): "
             f"{', '.join(r['skipped_shards'][:5])}{' ...' if len(r['skipped_shards']) > 5 else ''}; "
             f"`gelato ingest ... --repair` rewrites them (see damaged_shards/)"] if r.get("skipped_shards") else []),
          "",
          "## Results", "", table_markdown(results_table(r)), "",
          "Every number was computed in this run on the same splits and samples; \"not run\" marks a cell "
          "that was not computed. *random init*: the same architecture with seeded random weights. "
          + ("*log-mel*: the input's log-mel statistics (above). " if r.get("modality") == "audio" else
             "*raw pixels*: flattened, standardised pixels. ")
          + "*supervised*: the same architecture trained from "
          "scratch with the labels (its fine-tune cell is that training's own test figure; its probe and kNN use "
          "its frozen features; with few labels it is trained from scratch on the subset)."
          + (f" *start (init_from)*: the weights the pretraining started from (`{r['init_from']}`), frozen."
             if r.get("init_from") else "")]
    if r["multilabel"]:
        md.append("mAP is the mean over classes of the area under the precision-recall curve; VOC07 11-point "
                  "mAP is listed in the details below.")
    for x in r["refused"]:
        md.append(f"\n**Not run: {x['protocol']}** — {x['reason']}")
    md += _details_md(r)
    md += ["", "## Pretraining", ""]
    if "pretrain" in r["plots"]:
        md += [f"![pretraining: loss, online kNN, learning rate and throughput by step]({r['plots']['pretrain']})", ""]
    for name, caption in (("loss", "loss by epoch"), ("knn", "online kNN top-1 by epoch")):
        md.append(f"![{caption}]({r['plots'][name]})" if name in r["plots"]
                  else f"- {caption}: not available (no such rows in metrics.jsonl)")
    md += ["", "## Features", ""]
    if "embedding" in r["plots"]:
        md.append(f"![2-D PCA of the pretrained features]({r['plots']['embedding']})")
    if "confusion" in r["plots"]:
        md += ["", "## Linear probe confusion matrix (pretrained)", "", f"![confusion matrix]({r['plots']['confusion']})"]
    return "\n".join(md) + "\n"


def _clips_md(r: dict) -> list[str]:
    """What a clip run's rows measure (nothing for an image run)."""
    if r.get("modality") != "clip":
        return []
    cfg = r["eval_config"]
    if r.get("frame_target", "clip") == "clip":  # reports made before 2026-12-05 say nothing of it
        frame = (f"the frame-level protocols (*frame*) read each clip's middle frame, labelled with the clip's class "
                 f"({', '.join(r.get('clip_classes') or r['classes'] or [])}); a class one frame cannot show (a kind "
                 "of motion) scores near chance there, whatever the backbone learned")
    else:
        frame = ("the frame-level protocols (*frame*) read each clip's middle frame, labelled with the item it "
                 "shows most (from the clip's masks and item classes)")
    return [f"- **clips**: {frame}; *clip: linear probe / kNN* predict the clip's class from "
            f"{cfg.get('clip_eval_frames', 4)} evenly spaced frames, their features concatenated; *label propagation* "
            f"carries the first frame's masks through each test clip by feature affinity (top-{cfg.get('propagation_topk')}, "
            f"τ {cfg.get('propagation_temperature')}, the first and {cfg.get('propagation_context')} previous frames) and "
            "scores J, the mean IoU over objects and frames; *cross-view alignment* matches each frame of the main "
            "camera to the nearest frame of the second (chance: 1 / frames)"]


def _av_md(r: dict) -> list[str]:
    """What an audio-visual checkpoint's rows measure, with their chance levels (nothing elsewhere)."""
    ret, loc = r["details"].get("av_retrieval/pretrained"), r["details"].get("av_localisation/pretrained")
    if not ret and not loc:
        return []
    parts = []
    if ret:
        parts.append(f"*sound → frame retrieval*: each test clip's sound ranks every test clip's middle frame; right "
                     f"when the top frame's sounding item has the query's class (chance {100 * ret['chance_class']:.1f} "
                     f"%; the exact clip: {100 * ret['top1_clip']:.1f} %, chance {100 * ret['chance_clip']:.1f} %)")
    if loc:
        parts.append(f"*sound localisation*: the peak of the similarity map of a frame and its own sound lies on the "
                     f"sounding item ({loc['clips']} clips where it is in the middle frame; chance, the share of the "
                     f"{loc['map'][0]}×{loc['map'][1]} map's cells on it: {100 * loc['chance']:.1f} %)")
    return ["- **sound and picture** (the whole audio-visual objective, pretrained and random init): "
            + "; ".join(parts)]


def _audio_md(r: dict) -> list[str]:
    """What an audio run's rows measure (nothing for other runs)."""
    if r.get("modality") != "audio":
        return []
    target = r["eval_config"].get("audio_target", "voice")
    return [f"- **audio**: every protocol reads the utterance vector, the mean over time of the backbone's frame "
            f"features; *utterance class* rows predict the class ({', '.join(r['classes'] or [])}), the *{target}* rows "
            f"the {target} in each utterance's labels for evaluation, from the same frozen features; *log-mel*: each "
            "band's mean and standard deviation over the utterance (80 bands, 25 ms windows every 10 ms), standardised"]


def _details_md(r: dict) -> list[str]:
    md: list[str] = []
    probe = r["details"].get("probe/pretrained")
    if probe:
        md += ["", "## Linear probe details (pretrained)", "",
               f"Weight decay {probe['weight_decay']:g}, chosen on val from "
               + ", ".join(f"{k} → {100 * v:.1f}" for k, v in probe["val_scores"].items()) + f"; {probe['n_train']} train samples."]
        classes = r["classes"] or []
        if "per_class_accuracy" in probe and len(classes) <= 50:
            md += ["", "| class | test accuracy (%) |", "| --- | ---: |"]
            md += [f"| {c} | {_pct(a)} |" for c, a in zip(classes, probe["per_class_accuracy"])]
        if "per_class_ap" in probe:
            md += ["", f"mAP {100 * probe['mAP']:.1f} (area under curve), VOC07 11-point mAP "
                       f"{100 * probe['voc07_mAP']:.1f}, over {probe['classes_scored']} classes with a positive.", "",
                   "| class | AP (%) | VOC07 11-point AP (%) |", "| --- | ---: | ---: |"]
            md += [f"| {c} | {_pct(a)} | {_pct(b)} |"
                   for c, a, b in zip(classes, probe["per_class_ap"], probe["per_class_voc07_ap"])]
    few = next((v for k, v in r["details"].items() if k.startswith("fewshot_")), None)
    if few:
        sizes = ", ".join(f"{k.split('_')[1]}: {v['labels']} labels" for k, v in few.items() if isinstance(v, dict))
        md += ["", f"Few-label subsets (class-balanced, seed {r['seed']}): {sizes}."]
    return md
