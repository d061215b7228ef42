"""Rate-distortion curves, Bjøntegaard deltas, plots, MLflow logging and champion selection.

**Sweep** (:func:`rd_sweep`): the learned codec over ``rates`` (default 5 points on
[0, 1]) for each ``roi_quality`` of ``roi_qualities`` (default: the main ``roi_quality``
and 1.0, uniform quality), and every classic baseline over its own settings
(:data:`pipeline.eval.baselines` sweeps: JPEG/WebP quality, JPEG 2000 ratio for
~0.02..4 bpp). Each curve point is the mean over the images (bpp from the real files,
PSNRs averaged in dB, ``nan`` ignored). Curves: ``roicodec`` (the main roi-quality),
``learned_uniform`` (roi-quality 1, the non-ROI learned baseline), ``roicodec_q0.10``
(any other roi-quality), ``jpeg``, ``webp``, ``jpeg2000``. Without masks the whole
image is ROI and only the main curve is run (the roi-quality has no effect then).

**BD-rate / BD-PSNR** (:func:`bd_rate`, :func:`bd_psnr`): the classic Bjøntegaard
(VCEG-M33) computation: a least-squares polynomial of degree 3 (``numpy.polyfit``; degree
``n - 1`` with fewer than 4 points) of log-rate against PSNR (BD-rate) or PSNR against
log-rate (BD-PSNR), for the anchor and the test curve, both integrated
(``numpy.polyint``) over the interval where the two curves overlap and averaged.
BD-rate = ``exp(mean log-rate difference) - 1`` in percent (negative: the test curve
needs fewer bits for the same quality); BD-PSNR in dB (positive: better). No overlap,
or fewer than 2 distinct points on a curve, gives ``nan``. Known-answer property: a
curve with every rate scaled by ``s`` has BD-rate ``100 (s - 1)`` exactly; PSNR shifted
by ``d`` has BD-PSNR ``d``. The rate axis is bpp.

Keys: ``bd_rate_<m>_vs_<anchor>`` and ``bd_psnr_<m>_vs_<anchor>`` with ``m`` = ``roi``
(ROI PSNR), ``psnr`` (whole-image PSNR) or ``weighted`` (quality-weighted PSNR), anchors
``jpeg``, ``webp``, ``jpeg2000`` and
``uniform`` (the learned codec with ROI off), test = the ``roicodec`` curve. Every
learned curve against every anchor is in ``bd_by_curve``.

**Outputs** (:func:`write_rd_outputs`): ``rd.json`` (the whole result), ``rd_points.csv``
(one row per curve point), ``bd.csv`` (one row per curve x anchor x metric), and PNG
plots ``rd_roi_psnr.png``, ``rd_psnr.png``, ``rd_weighted_psnr.png``, ``rd_ms_ssim.png``, ``rd_haarpsi.png`` and, with
masks, ``rd_nonroi_psnr.png`` and ``rd_texture_nonroi.png`` (the background's texture ratio, a
line at 1 for the original); matplotlib's Agg canvas, pyplot's global state is not touched.
Every point carries the metrics of :func:`pipeline.eval.evaluate.quality` (the perceptual ones
of :mod:`pipeline.eval.perceptual`; LPIPS with ``lpips=``).

**MLflow**: a checkpoint belongs to a run when its ``extra`` has ``mlflow_run_id``, or a
``run_name`` that matches a run's ``ray_train_run_name`` tag in the store (Ray Train
checkpoints carry the run name). The tracking URI is the ``tracking_uri`` argument,
else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
(:func:`pipeline.mlflow_store.resolve_tracking_uri`); a SQLite store that does not
exist is never created here. Evaluation metrics go in as ``eval/...`` and the output
files as artifacts under ``evaluation/``.

**Champion** (:func:`select_champion`): sweep every candidate checkpoint (a list, a
folder of ``*.pt`` / ``model.pt`` files, or an MLflow experiment whose runs have a
``checkpoint/model.pt`` artifact) on the same images, rank by the criterion (lower is
better for ``bd_rate_*``, higher for ``bd_psnr_*`` and ``bd_ap_*``; ``nan`` ranks last) and point the
``champion`` alias of the registered model version created from the best one's run at
that version.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.codec.checkpoint import checkpoint_extra
from pipeline.codec.models import ROICodec
from pipeline.eval import baselines as bl
from pipeline.eval.evaluate import (DEFAULT_ROI_QUALITY, LEARNED, UNIFORM, EvaluationError, check_knobs, jsonable,
                                    learned_point, list_images, load_model, load_pair, metric_keys, nanmean,
                                    quality, resolve_checkpoint, to_json)
from pipeline.eval.perceptual import LPIPSDistance
from pipeline.mlflow_store import resolve_tracking_uri

log = logging.getLogger(__name__)

DEFAULT_RATES = (0.0, 0.25, 0.5, 0.75, 1.0)
AP_SUFFIXES = ("_AP", "_AP50", "_AP75", "_AP_small", "_AP_medium", "_AP_large")
DISTORTIONS = {"roi": "roi_psnr", "psnr": "psnr", "weighted": "weighted_psnr"}
DEFAULT_CRITERION = "bd_rate_roi_vs_jpeg"
CHAMPION = "champion"
PLOT_METRICS = ("roi_psnr", "psnr", "weighted_psnr", "nonroi_psnr", "ms_ssim", "haarpsi", "texture_nonroi")
NONROI_METRICS = ("nonroi_psnr", "weighted_psnr", "texture_nonroi")  # plotted only with masks
REFERENCES = {"texture_nonroi": 1.0}  # the original's value, drawn as a line
_LABELS = {"roi_psnr": "ROI PSNR (dB)", "psnr": "PSNR (dB)", "nonroi_psnr": "non-ROI PSNR (dB)",
           "weighted_psnr": "quality-weighted PSNR (dB)",
           "ms_ssim": "MS-SSIM", "haarpsi": "HaarPSI (1 = original)",
           "texture_nonroi": "background texture ratio (1 = original)",
           "bbox_AP": "detection AP (COCO, bbox)", "segm_AP": "instance segmentation AP (segm)"}


# -- Bjøntegaard ------------------------------------------------------------------------------

def _clean(rate: Sequence[float], dist: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    r, d = np.asarray(rate, dtype=np.float64), np.asarray(dist, dtype=np.float64)
    if r.shape != d.shape:
        raise ValueError("rate and distortion lists differ in length")
    keep = np.isfinite(r) & np.isfinite(d) & (r > 0)
    return np.log(r[keep]), d[keep]


def _avg_over_overlap(x_a: np.ndarray, y_a: np.ndarray, x_b: np.ndarray, y_b: np.ndarray
                      ) -> tuple[float, float]:
    """Mean of the fitted y over the x interval both curves cover: (anchor, test)."""
    if len(np.unique(x_a)) < 2 or len(np.unique(x_b)) < 2:
        return float("nan"), float("nan")
    lo, hi = max(x_a.min(), x_b.min()), min(x_a.max(), x_b.max())
    if not hi > lo:
        return float("nan"), float("nan")
    out = []
    for x, y in ((x_a, y_a), (x_b, y_b)):
        deg = min(3, len(np.unique(x)) - 1)
        p = np.polyint(np.polyfit(x, y, deg))
        out.append((np.polyval(p, hi) - np.polyval(p, lo)) / (hi - lo))
    return float(out[0]), float(out[1])


def bd_rate(anchor_rate: Sequence[float], anchor_psnr: Sequence[float],
            test_rate: Sequence[float], test_psnr: Sequence[float]) -> float:
    """Bjøntegaard delta rate of test against anchor, in percent (negative: test saves bits)."""
    lr_a, d_a = _clean(anchor_rate, anchor_psnr)
    lr_t, d_t = _clean(test_rate, test_psnr)
    avg_a, avg_t = _avg_over_overlap(d_a, lr_a, d_t, lr_t)  # log-rate as a function of PSNR
    return 100.0 * (math.exp(avg_t - avg_a) - 1.0) if math.isfinite(avg_a + avg_t) else float("nan")


def bd_psnr(anchor_rate: Sequence[float], anchor_psnr: Sequence[float],
            test_rate: Sequence[float], test_psnr: Sequence[float]) -> float:
    """Bjøntegaard delta PSNR of test against anchor, in dB (positive: test is better)."""
    lr_a, d_a = _clean(anchor_rate, anchor_psnr)
    lr_t, d_t = _clean(test_rate, test_psnr)
    avg_a, avg_t = _avg_over_overlap(lr_a, d_a, lr_t, d_t)  # PSNR as a function of log-rate
    return avg_t - avg_a if math.isfinite(avg_a + avg_t) else float("nan")


def curve_bd(anchor: list[dict[str, float]], test: list[dict[str, float]]) -> dict[str, float]:
    """{bd_rate_<m>, bd_psnr_<m>} for m in roi, psnr between two lists of curve points."""
    out = {}
    for short, key in DISTORTIONS.items():
        args = ([p["bpp"] for p in anchor], [p[key] for p in anchor],
                [p["bpp"] for p in test], [p[key] for p in test])
        out[f"bd_rate_{short}"] = bd_rate(*args)
        out[f"bd_psnr_{short}"] = bd_psnr(*args)
    return out


# -- the sweep --------------------------------------------------------------------------------

def curve_name(q: float, main: float) -> str:
    """The name of the learned curve at roi-quality ``q`` when ``main`` is the main one."""
    if math.isclose(q, main):
        return LEARNED
    if math.isclose(q, 1.0):
        return UNIFORM
    return f"{LEARNED}_q{q:.2f}"


def _mean_point(rows: list[dict[str, Any]], setting: float) -> dict[str, Any]:
    return {"setting": float(setting), **{k: nanmean(r[k] for r in rows) for k in metric_keys(rows)},
            "n_images": len(rows)}


def rd_sweep(checkpoint: str | Path | ROICodec, images_dir: str | Path, masks_dir: str | Path | None = None,
             roi_quality: float = DEFAULT_ROI_QUALITY, rates: Sequence[float] = DEFAULT_RATES,
             roi_qualities: Sequence[float] | None = None, baselines: Iterable[str] = bl.BASELINES,
             baseline_settings: dict[str, Sequence[float]] | None = None, progress: bool = True,
             lpips: LPIPSDistance | None = None, graded: bool = False) -> dict[str, Any]:
    """RD curves of the learned codec and the baselines on ``images_dir``, with BD numbers.

    ``roi_qualities`` defaults to (``roi_quality``, 1.0); ``roi_quality`` is always swept.
    ``graded``: the learned codec's steps follow the soft quality map (``--soft``); every curve's
    ``weighted_psnr`` weighs pixels by the main ``roi_quality``'s map ``m + (1 - m) Q``.
    ``baseline_settings`` overrides a baseline's settings, e.g. ``{"jpeg": [5, 50, 90]}``.
    ``lpips``: an LPIPS model (:func:`pipeline.eval.perceptual.load_lpips`) adds the LPIPS metrics.
    """
    rates = sorted({float(r) for r in rates})
    if not rates:
        raise EvaluationError("the sweep needs at least one rate")
    qs = [roi_quality] + [q for q in (roi_qualities if roi_qualities is not None else (1.0,))
                          if not math.isclose(q, roi_quality)]
    for q in qs:
        for r in rates:
            check_knobs(q, r)
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise EvaluationError(f"masks folder not found: {masks_dir}")
    if masks_dir is None:
        qs = [roi_quality]  # no mask: roi-quality does nothing
    names = [bl.get_baseline(n).name for n in baselines]
    run, skipped = bl.available_baselines(names)
    settings = {n: tuple((baseline_settings or {}).get(n, bl.get_baseline(n).sweep)) for n in run}
    files = list_images(images_dir)
    model, ckpt_path = load_model(checkpoint)

    data, errors = [], []
    for path in files:
        try:
            data.append((path, *load_pair(path, masks_dir)))
        except (ValueError, OSError) as exc:
            errors.append({"image": path.name, "error": str(exc).splitlines()[0] if str(exc) else
                           type(exc).__name__})
    if not data:
        first = errors[0]["error"] if errors else "nothing to do"
        raise EvaluationError(f"no image of {images_dir} could be evaluated ({len(errors)} errors; first: {first})")

    total = len(data) * (len(qs) * len(rates) + sum(len(s) for s in settings.values()))
    bar = tqdm(total=total, desc="rd sweep", unit="code", disable=not progress, file=sys.stderr)
    curves: dict[str, dict[str, Any]] = {}
    for q in qs:
        points = []
        for r in rates:
            rows = []
            for _, _, x, mask, _ in data:
                rows.append(learned_point(model, x, mask, q, r, lpips=lpips, graded=graded,
                                          weight_quality=roi_quality))
                bar.update()
            points.append(_mean_point(rows, r))
        curves[curve_name(q, roi_quality)] = {"kind": "learned", "roi_quality": float(q), "points": points}
    for name in run:
        points = []
        for s in settings[name]:
            rows = []
            for _, image, x, mask, _ in data:
                res = bl.encode_at_setting(name, image, s)
                rows.append({"bpp": res.bpp, **quality(x, res.x_hat, mask, lpips, roi_quality)})
                bar.update()
            points.append(_mean_point(rows, s))
        points.sort(key=lambda p: p["bpp"])
        curves[name] = {"kind": "baseline", "roi_quality": None, "points": points}
    bar.close()

    anchors = {n: n for n in run}
    if UNIFORM in curves:
        anchors["uniform"] = UNIFORM
    bd_by_curve: dict[str, dict[str, dict[str, float]]] = {}
    for cname, c in curves.items():
        if c["kind"] != "learned":
            continue
        bd_by_curve[cname] = {a: curve_bd(curves[src]["points"], c["points"])
                              for a, src in anchors.items() if src != cname}
    bd = {f"{k}_vs_{a}": v for a, vals in bd_by_curve.get(LEARNED, {}).items() for k, v in vals.items()}
    return {
        "checkpoint": ckpt_path, "variant": model.variant, "images_dir": str(images_dir),
        "masks_dir": None if masks_dir is None else str(masks_dir), "roi_quality": float(roi_quality),
        "graded": bool(graded),
        "rates": rates, "roi_qualities": [float(q) for q in qs], "baseline_settings": settings,
        "baselines_skipped": skipped, "n_images": len(data), "errors": errors,
        "curves": curves, "bd": bd, "bd_by_curve": bd_by_curve,
    }


# -- outputs ----------------------------------------------------------------------------------

def plot_rd(result: dict[str, Any], metric: str, path: str | Path, bd_key: str | None = None,
            reference: float | None = None) -> Path:
    """One RD plot (``metric`` against bpp) of every curve of a sweep result, as PNG.

    ``bd_key``: whose BD-rates go in the title (``roi``, ``psnr``, ``map``...; default from
    the metric); ``reference``: a horizontal line for the uncompressed original's value.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, c in result["curves"].items():
        pts = [p for p in c["points"] if math.isfinite(p["bpp"]) and math.isfinite(p.get(metric) or math.nan)]
        if not pts:
            continue
        learned = c["kind"] == "learned"
        label = name if not learned else f"{name} (Q={c['roi_quality']:.2f})"
        ax.plot([p["bpp"] for p in pts], [p[metric] for p in pts], "-o" if learned else "--s",
                label=label, linewidth=2 if name == LEARNED else 1.2, markersize=4)
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="black", linestyle=":", linewidth=1, label="original")
    ax.set_xlabel("bits per pixel (real file size)")
    ax.set_ylabel(_LABELS.get(metric, metric))
    bd = result.get("bd", {})
    key = bd_key or ("roi" if metric == "roi_psnr" else "psnr")
    note = ", ".join(f"{a}: {bd[f'bd_rate_{key}_vs_{a}']:+.1f}%" for a in ("jpeg", "webp", "jpeg2000", "uniform")
                     if math.isfinite(bd.get(f"bd_rate_{key}_vs_{a}", float("nan"))))
    title = f"{result.get('variant', '')} on {result['n_images']} images"
    if note and (bd_key or metric in ("roi_psnr", "psnr")):
        title += f"\nBD-rate ({key}) vs {note}"
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_rd_outputs(result: dict[str, Any], out_dir: str | Path, json_path: str | Path | None = None
                     ) -> dict[str, Any]:
    """Write the plots, ``rd_points.csv``, ``bd.csv`` and the JSON (``json_path`` or ``rd.json``).

    Returns {"json", "points_csv", "bd_csv", "plots": [...]} (paths as strings).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points_csv = out / "rd_points.csv"
    keys = metric_keys(p for c in result["curves"].values() for p in c["points"])
    with points_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["curve", "kind", "roi_quality", "setting", *keys, "n_images"])
        for name, c in result["curves"].items():
            for p in c["points"]:
                w.writerow([name, c["kind"], "" if c["roi_quality"] is None else c["roi_quality"], p["setting"],
                            *(_fmt(p.get(k)) for k in keys), p["n_images"]])
    bd_csv = out / "bd.csv"
    with bd_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["curve", "anchor", "metric", "bd_rate_percent", "bd_psnr_db"])
        for cname, per_anchor in result["bd_by_curve"].items():
            for anchor, vals in per_anchor.items():
                for short in DISTORTIONS:
                    w.writerow([cname, anchor, short, _fmt(vals[f"bd_rate_{short}"]),
                                _fmt(vals[f"bd_psnr_{short}"])])
    metrics = [m for m in PLOT_METRICS if m not in NONROI_METRICS or result.get("masks_dir")]
    plots = [str(plot_rd(result, m, out / f"rd_{m}.png", reference=REFERENCES.get(m))) for m in metrics]
    files = {"json": None, "points_csv": str(points_csv), "bd_csv": str(bd_csv), "plots": plots}
    jp = Path(json_path) if json_path is not None else out / "rd.json"
    files["json"] = str(jp)
    to_json({**result, "files": files}, jp)
    return files


def _fmt(v: float) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.6g}"


# -- MLflow -----------------------------------------------------------------------------------

def _store_exists(uri: str) -> bool:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    if uri.startswith("file:") or "://" not in uri:
        return Path(uri.removeprefix("file://").removeprefix("file:")).exists()
    return True  # a server


def _client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def checkpoint_run_id(checkpoint: str | Path, tracking_uri: str | None = None) -> str | None:
    """The MLflow run of a checkpoint (``extra["mlflow_run_id"]``, or its Ray ``run_name``), or None."""
    uri = resolve_tracking_uri(tracking_uri)
    try:
        extra = checkpoint_extra(resolve_checkpoint(checkpoint))
    except Exception:  # noqa: BLE001 - not our business here: loading reports bad files
        return None
    run_id = extra.get("mlflow_run_id")
    if run_id:
        return str(run_id)
    run_name = extra.get("run_name")
    if not run_name or not _store_exists(uri):
        return None
    try:
        c = _client(uri)
        exp_ids = [e.experiment_id for e in c.search_experiments()]
        runs = c.search_runs(exp_ids, f"tags.ray_train_run_name = '{run_name}'", max_results=1,
                             order_by=["attributes.start_time DESC"]) if exp_ids else []
        return runs[0].info.run_id if runs else None
    except Exception as exc:  # noqa: BLE001 - a broken store must not stop an evaluation
        log.warning("MLflow lookup failed: %s", exc)
        return None


def evaluation_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of an evaluation or sweep result (finite values only)."""
    out: dict[str, float] = {}
    if "bd" in result:  # a sweep, or a task evaluation (points keyed by rate, with AP scores)
        task = result.get("kind") == "task"
        prefix = "eval/task" if task else "eval/rd"
        out.update({f"eval/{k}": v for k, v in result["bd"].items()})
        for name, c in result["curves"].items():
            for p in c["points"]:
                keys = [k for k, v in p.items() if isinstance(v, float) and k not in ("setting", "rate")]
                out.update({f"{prefix}/{name}/{k}@{p['rate' if task else 'setting']:g}": p[k] for k in keys})
        if task:
            out.update({f"eval/task/original/{k}": v for k, v in result["original"].items()
                        if isinstance(v, float) and k.endswith(AP_SUFFIXES)})
    if "mean" in result:
        mean = result["mean"]
        for c in result.get("codecs", [LEARNED]):
            m = mean if c == LEARNED else mean.get(c, {})
            out.update({f"eval/{c}/{k}": m.get(k, float("nan")) for k in metric_keys([m])})
    return {k.replace("@", "_at_"): float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def log_to_mlflow(result: dict[str, Any], files: Iterable[str | Path], tracking_uri: str | None = None,
                  run_id: str | None = None) -> dict[str, Any]:
    """Log metrics and files to the checkpoint's MLflow run, when it has one.

    Returns {"tracking_uri", "run_id", "logged": bool, "error"?: str}; never raises.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if run_id is None and result.get("checkpoint"):
        run_id = checkpoint_run_id(result["checkpoint"], uri)
    info: dict[str, Any] = {"tracking_uri": uri, "run_id": run_id, "logged": False}
    if run_id is None:
        return info
    if not _store_exists(uri):
        info["error"] = f"tracking store not found: {uri}"
        return info
    try:
        from mlflow.entities import Metric
        import time

        c = _client(uri)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in evaluation_metrics(result).items()]
        for i in range(0, len(metrics), 900):
            c.log_batch(run_id, metrics=metrics[i:i + 900])
        for f in files:
            if f and Path(f).is_file():
                c.log_artifact(run_id, str(f), "evaluation")
        info["logged"] = True
    except Exception as exc:  # noqa: BLE001 - tracking must not fail the evaluation
        info["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("MLflow logging failed: %s", info["error"])
    return info


# -- champion ---------------------------------------------------------------------------------

def _higher_is_better(criterion: str) -> bool:
    return criterion.startswith(("bd_psnr", "bd_ap"))


def _candidates(candidates: Any, tracking_uri: str, tmp: Path) -> list[tuple[Path, str | None]]:
    """(checkpoint path, MLflow run id or None) of every candidate."""
    if isinstance(candidates, (str, Path)) and Path(candidates).is_file():
        return [(Path(candidates), None)]
    if isinstance(candidates, (str, Path)) and Path(candidates).is_dir():
        root = Path(candidates)
        found = sorted({*root.rglob("*.pt")})
        if not found:
            raise EvaluationError(f"no checkpoint (*.pt) under {root}")
        return [(p, None) for p in found]
    if isinstance(candidates, str):  # an MLflow experiment
        if not _store_exists(tracking_uri):
            raise EvaluationError(f"{candidates!r} is neither a checkpoint path nor an experiment "
                                  f"(tracking store not found: {tracking_uri})")
        c = _client(tracking_uri)
        exp = c.get_experiment_by_name(candidates)
        if exp is None:
            raise EvaluationError(f"{candidates!r} is neither a checkpoint path nor an MLflow experiment "
                                  f"in {tracking_uri}")
        out = []
        for run in c.search_runs([exp.experiment_id], max_results=1000):
            rid = run.info.run_id
            try:
                local = c.download_artifacts(rid, "checkpoint/model.pt", str(tmp / rid))
            except Exception:  # noqa: BLE001 - a run without a checkpoint artifact
                continue
            out.append((Path(local), rid))
        if not out:
            raise EvaluationError(f"no run of experiment {candidates!r} has a checkpoint/model.pt artifact")
        return out
    return [(Path(p), None) for p in candidates]


def _model_version(c, run_id: str, registered_model: str | None) -> tuple[str, str] | None:
    query = f"run_id = '{run_id}'" + (f" and name = '{registered_model}'" if registered_model else "")
    versions = list(c.search_model_versions(query))
    if not versions:
        return None
    best = max(versions, key=lambda mv: int(mv.version))
    return best.name, str(best.version)


def select_champion(candidates: str | Path | Iterable[str | Path], images_dir: str | Path,
                    masks_dir: str | Path | None = None, criterion: str = DEFAULT_CRITERION,
                    tracking_uri: str | None = None, registered_model: str | None = None,
                    set_alias: bool = True, out_dir: str | Path | None = None, progress: bool = True,
                    log: bool = True, sweep: Callable[..., dict[str, Any]] | None = None,
                    write_outputs: Callable[..., dict[str, Any]] | None = None, **sweep_kwargs: Any
                    ) -> dict[str, Any]:
    """Sweep every candidate, rank them by ``criterion`` and set the ``champion`` alias.

    ``candidates``: checkpoint paths, a folder of checkpoints, or an MLflow experiment name.
    ``out_dir``: where each candidate's sweep outputs go (``<out_dir>/<i>_<folder>_<stem>/``).
    ``log``: log each candidate's sweep (metrics, plots, tables) to its MLflow run, if any.
    ``sweep`` / ``write_outputs``: the evaluation and its writer (default :func:`rd_sweep` and
    :func:`write_rd_outputs`; the task metrics: :func:`pipeline.eval.task.task_sweep` with
    its keywords bound, and :func:`pipeline.eval.task.write_task_outputs`).
    Checkpoints downloaded from an experiment's runs live in a temporary folder that is
    gone when this returns (the ranking names them by run id).
    Returns {"criterion", "higher_is_better", "best": {...}, "ranking": [...], "alias": ... or None}.
    """
    uri = resolve_tracking_uri(tracking_uri)
    higher = _higher_is_better(criterion)
    with tempfile.TemporaryDirectory(prefix="roicodec-champion-") as tmp:
        cands = _candidates(candidates, uri, Path(tmp))
        ranking = []
        for i, (path, run_id) in enumerate(cands):
            row: dict[str, Any] = {"checkpoint": str(path), "run_id": run_id or checkpoint_run_id(path, uri),
                                   "value": float("nan")}
            try:
                res = (sweep or rd_sweep)(path, images_dir, masks_dir, progress=progress, **sweep_kwargs)
                if criterion not in res["bd"]:
                    raise EvaluationError(f"unknown criterion {criterion!r} (have: {', '.join(sorted(res['bd']))})")
                row["value"] = res["bd"][criterion]
                row["variant"] = res["variant"]
                base = Path(out_dir) if out_dir is not None else Path(tmp) / "outputs"
                files = (write_outputs or write_rd_outputs)(res, base / f"{i:02d}_{path.parent.name}_{path.stem}")
                if out_dir is not None:
                    row["files"] = files
                if log and row["run_id"]:
                    row["mlflow"] = log_to_mlflow(res, [files["json"], files["points_csv"], files["bd_csv"],
                                                        *files["plots"]], uri, row["run_id"])
            except EvaluationError as exc:
                if str(exc).startswith("unknown criterion"):
                    raise
                row["error"] = str(exc)
            except ValueError as exc:  # a bad checkpoint: recorded, the others go on
                row["error"] = str(exc).splitlines()[0]
            ranking.append(row)
    finite = [r for r in ranking if math.isfinite(r["value"])]
    ranking.sort(key=lambda r: (not math.isfinite(r["value"]), -r["value"] if higher else r["value"]))
    if not finite:
        raise EvaluationError(f"no candidate has a finite {criterion} (curves do not overlap, or every "
                              f"evaluation failed)")
    best = dict(ranking[0])
    alias = None
    if set_alias and best.get("run_id") and _store_exists(uri):
        c = _client(uri)
        mv = _model_version(c, best["run_id"], registered_model)
        if mv is not None:
            name, version = mv
            c.set_model_version_tag(name, version, criterion, repr(best["value"]))
            c.set_registered_model_alias(name, CHAMPION, version)
            alias = {"registered_model": name, "version": version, "alias": CHAMPION}
            best.update(registered_model=name, version=version)
    return jsonable({"criterion": criterion, "higher_is_better": higher, "tracking_uri": uri, "best": best,
                     "ranking": ranking, "alias": alias})
