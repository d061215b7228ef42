"""One real Ray Serve app on 127.0.0.1 for the whole test session (HTTP and browser tests).

Loaded as a pytest plugin (``pytest_plugins = ["serve_fixtures"]`` in the test modules)
so the session-scoped fixture exists once, however many modules use it: Ray starts
once, the app (the session's trained tiny model, conftest's ``trained(VARIANT)``, saved in
tmp; random-init tiny CLIP from a config) is deployed once, and ``serve.shutdown();
ray.shutdown()`` run at the end of the session.
The tests that use it are moved to the end of the run (``pytest_collection_modifyitems``
below) so that the app never holds Ray while other tests run.
"""

from __future__ import annotations

import io
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CLIP

# A trained model: its reconstructions follow the image, so quality (ROI, graded maps) shows in
# PSNR; random-init latents are all-zero symbols. sft: the variant the rest of the suite trains
# (conftest's ``trained`` caches it for the session), so a whole run trains nothing more.
VARIANT = "sft"
APP_NAME = "roicodec-test"
MAX_UPLOAD_MB = 0.5
MAX_PIXELS = 256 * 256
# The first test that uses the app sets it up: Ray, the deployment and, in a run where no earlier
# test trained it (``pytest tests/test_serve.py``), the trained model (1000 steps: minutes on a
# busy 2-core machine). Its time limit allows for that; the other tests keep the suite's.
FIRST_TEST_TIMEOUT_S = 1800


@dataclass
class ServeApp:
    url: str                 # ends with "/"
    checkpoint: Path         # the deployed checkpoint
    other_checkpoint: Path   # another model's checkpoint (its files must be refused)
    clip_config: Path
    args: dict
    tmp: Path

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


PORT_ATTEMPTS = 3


def free_port() -> int:
    """A port free now; someone else may take it before Serve's proxy binds it (see :func:`serving`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(url: str, seconds: float = 60.0) -> bool:
    """Whether our Serve proxy holds the port and the app answers ``/healthz`` within ``seconds``.

    A proxy reports HEALTHY only once it has bound its socket, so a port another process took
    between :func:`free_port` and the bind (the proxy cannot bind, stays STARTING/UNHEALTHY) is
    never mistaken for ours, even if that process answers ``/healthz`` too."""
    from ray import serve
    from ray.serve.schema import ProxyStatus

    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < deadline:
            proxies = serve.status().proxies
            if proxies and all(status == ProxyStatus.HEALTHY for status in proxies.values()):
                try:
                    if c.get("healthz").status_code == 200:
                        return True
                except httpx.HTTPError:  # the proxy may lag a moment after serve.run returns
                    pass
            time.sleep(1)
    return False


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def sample_image(size: int = 64, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like uint8 RGB image and its objects' float mask."""
    from pipeline.data.samples import objects_mask, photo_like_image

    arr, objects = photo_like_image(size, size, seed)
    return arr, objects_mask(objects, size, size)


def _tiny_checkpoint(path: Path, seed: int) -> Path:
    from pipeline.codec.checkpoint import save_checkpoint
    from pipeline.codec.models import build_model

    torch.manual_seed(seed)
    model = build_model(VARIANT, N=32, M=48, n_rates=2).eval()
    model.update(force=True)
    return save_checkpoint(model, path)


def pytest_collection_modifyitems(session, config, items) -> None:  # noqa: ANN001 - pytest hook
    """Run the tests that use the Serve app last and back to back: the app (and its Ray)
    lives from the first of them to the end of the session, so no other test runs while
    it holds Ray and CPUs, and the modules that use it share one deployment. The first of
    them gets :data:`FIRST_TEST_TIMEOUT_S`: it pays for the app's setup."""
    uses = [item for item in items if "serve_app" in getattr(item, "fixturenames", ())]
    if uses:
        items[:] = [item for item in items if "serve_app" not in getattr(item, "fixturenames", ())] + uses
        uses[0].add_marker(pytest.mark.timeout(FIRST_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory, trained) -> ServeApp:
    import ray
    from ray import serve

    from pipeline.codec.checkpoint import save_checkpoint
    from pipeline.serve.app import deploy

    tmp = tmp_path_factory.mktemp("serve")
    checkpoint = save_checkpoint(trained(VARIANT), tmp / "model.pt")
    other = _tiny_checkpoint(tmp / "other.pt", seed=1)
    clip_config = tmp / "tiny_clip.json"
    clip_config.write_text(json.dumps(TINY_CLIP))
    args = {
        "checkpoint": str(checkpoint), "clip_model": "tiny", "clip_pretrained": "none",
        "clip_config": str(clip_config), "max_upload_mb": MAX_UPLOAD_MB, "max_pixels": MAX_PIXELS,
        "use_gpu": False, "codec_num_cpus": 0.5, "mask_num_cpus": 0.5, "ingress_num_cpus": 0.25,
        "codec_max_replicas": 1, "mask_max_replicas": 1, "ingress_max_replicas": 1,
        # the same intra-op thread count as this process, so library results match bit for bit
        "torch_threads": torch.get_num_threads(),
    }
    if ray.is_initialized():  # left over by an earlier test: these tests run last (see above)
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for _ in range(PORT_ATTEMPTS):  # a free port can be taken before the proxy binds it: retry
            try:
                url = deploy(args, host="127.0.0.1", port=free_port(), name=APP_NAME)
            except RuntimeError:
                url = None
            if url is not None and serving(url):
                break
            serve.shutdown()
        else:
            pytest.fail(f"the Serve app never answered /healthz on its own port ({PORT_ATTEMPTS} ports tried)")
        yield ServeApp(url, checkpoint, other, clip_config, args, tmp)
    finally:
        serve.shutdown()
        ray.shutdown()
