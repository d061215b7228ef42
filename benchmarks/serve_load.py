"""Load on the Ray Serve endpoint over loopback; prints JSON.

What it measures (a tiny random-init checkpoint unless ``--checkpoint``; a photo-like
``--size`` square image; ``POST /compress`` without a mask, i.e. the codec path):

- ``direct_encode_ms``: the same ``encode`` called in this process (one torch thread,
  like one codec replica): the floor the service cannot beat.
- ``http_sequential_ms``: one client, one request at a time: the HTTP path's latency;
  ``http_overhead_ms_p50`` is its p50 minus the direct p50 (proxy, ingress, handle
  hops, multipart parsing, image decoding, pickling).
- ``load``: ``--clients`` concurrent clients (threads, httpx) for ``--duration`` seconds
  against a fixed number of codec replicas (each ``--replicas`` value; the app is
  redeployed between them): requests/s, p50/p99 latency, errors (must be 0).

Defaults finish in about two minutes. Example::

    python benchmarks/serve_load.py --duration 15 --clients 4 --replicas 1 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

import numpy as np  # noqa: E402


def _percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms)
    return {"n": len(ms), "p50": round(float(np.percentile(a, 50)), 2), "p99": round(float(np.percentile(a, 99)), 2),
            "mean": round(float(a.mean()), 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(size: int) -> tuple[np.ndarray, bytes]:
    from PIL import Image

    from pipeline.data.samples import photo_like_image

    arr = photo_like_image(size, size, seed=3)[0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return arr, buf.getvalue()


def _checkpoint(path: Path, variant: str) -> Path:
    import torch

    from pipeline.codec.checkpoint import save_checkpoint
    from pipeline.codec.models import build_model

    torch.manual_seed(0)
    model = build_model(variant, N=32, M=48, n_rates=2).eval()
    model.update(force=True)
    return save_checkpoint(model, path)


def direct_latency(checkpoint: Path, arr: np.ndarray, n: int) -> dict[str, float]:
    import torch
    from PIL import Image

    from pipeline.codec.checkpoint import load_checkpoint
    from pipeline.codec.coding import encode, image_to_tensor

    torch.set_num_threads(1)
    model = load_checkpoint(checkpoint)
    img = Image.fromarray(arr)
    for _ in range(3):
        encode(model, image_to_tensor(img), None, 0.3, 0.5)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        encode(model, image_to_tensor(img), None, 0.3, 0.5)
        times.append((time.perf_counter() - t) * 1000)
    return _percentiles(times)


def sequential_latency(url: str, png: bytes, n: int) -> tuple[dict[str, float], int]:
    import httpx

    times, errors = [], 0
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n + 3):
            t = time.perf_counter()
            try:
                r = c.post("compress", files={"image": ("b.png", png, "image/png")})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if i >= 3:  # warm-up requests not counted
                times.append((time.perf_counter() - t) * 1000)
                errors += not ok
    return _percentiles(times), errors


def load(url: str, png: bytes, clients: int, duration: float) -> dict[str, float]:
    import httpx

    deadline = time.monotonic() + duration
    lock = threading.Lock()
    times: list[float] = []
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < deadline:
                t = time.perf_counter()
                try:
                    r = c.post("compress", files={"image": ("b.png", png, "image/png")})
                    err = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:100]}"
                except httpx.HTTPError as exc:
                    err = f"{type(exc).__name__}: {exc}"
                dt = (time.perf_counter() - t) * 1000
                with lock:
                    (errors.append(err) if err else times.append(dt))

    start = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=duration + 90)
    elapsed = time.monotonic() - start
    out = {"clients": clients, "seconds": round(elapsed, 2), "requests": len(times), "errors": len(errors),
           "requests_per_s": round(len(times) / elapsed, 2), "latency_ms": _percentiles(times)}
    if errors:
        out["first_errors"] = sorted(set(errors))[:3]
    return out


def _wait_healthy(url: str, timeout: float = 120) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url + "healthz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("the app never became healthy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: a tiny random-init one)")
    p.add_argument("--variant", default="tma", help="variant of the tiny checkpoint (default %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default %(default)s)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default %(default)s)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per config (default %(default)s)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="codec replica counts (default 1 2)")
    p.add_argument("--latency-requests", type=int, default=30, help="sequential requests (default %(default)s)")
    p.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray (default %(default)s)")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from pipeline.serve.app import deploy

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else _checkpoint(tmp / "model.pt", args.variant)
    arr, png = _image(args.size)
    result: dict = {"config": {"image": f"{args.size}x{args.size}", "endpoint": "POST /compress (no mask)",
                               "clients": args.clients, "duration_s": args.duration, "replicas": args.replicas,
                               "cpu_count": os.cpu_count(), "load_avg_at_start": round(os.getloadavg()[0], 2),
                               "checkpoint": "tiny random-init " + args.variant if not args.checkpoint
                               else str(checkpoint)}}
    result["direct_encode_ms"] = direct_latency(checkpoint, arr, args.latency_requests)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    errors_total = 0
    try:
        result["load"] = {}
        for i, n in enumerate(args.replicas):
            app_args = {"checkpoint": str(checkpoint), "text_masks": False, "use_gpu": False,
                        "codec_replicas": n, "codec_num_cpus": 1.0, "mask_num_cpus": 0.25,
                        "ingress_num_cpus": 0.25, "ingress_max_replicas": 1, "mask_replicas": 1,
                        "torch_threads": 1}
            t = time.monotonic()
            url = deploy(app_args, host="127.0.0.1", port=port, name="roicodec-bench")
            _wait_healthy(url)
            result.setdefault("deploy_s", {})[str(n)] = round(time.monotonic() - t, 1)
            if i == 0:
                seq, seq_errors = sequential_latency(url, png, args.latency_requests)
                errors_total += seq_errors
                result["http_sequential_ms"] = {**seq, "errors": seq_errors}
                result["http_overhead_ms_p50"] = round(seq["p50"] - result["direct_encode_ms"]["p50"], 2)
            load(url, png, args.clients, min(3.0, args.duration))  # warm-up, not reported
            out = load(url, png, args.clients, args.duration)
            errors_total += out["errors"]
            result["load"][f"{n}_replica" + ("s" if n > 1 else "")] = out
        rates = [v["requests_per_s"] for v in result["load"].values()]
        if len(rates) >= 2 and rates[0] > 0:
            result["throughput_ratio_last_vs_first"] = round(rates[-1] / rates[0], 2)
    finally:
        serve.shutdown()
        ray.shutdown()
    result["errors_total"] = errors_total
    result["note"] = ("all parts share this machine's CPUs: with few cores the clients, proxy, ingress and "
                      "replicas compete, so more replicas help only while cores are free")
    print(json.dumps(result, indent=1))
    return 0 if errors_total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
