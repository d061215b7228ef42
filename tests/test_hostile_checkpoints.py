"""Checkpoints are input too: a crafted or damaged checkpoint file is one ``CheckpointError``
line (library, ``roicodec``, the service's settings, the jobs), quickly and without a large
allocation, and never loads as another model. Old checkpoints (no recorded fingerprint) still load.

The cases run in a child process (a crafted coding table used to crash the coder's process
with SIGFPE, and a child's peak memory is its own), like tests/test_hostile_files.py does for
``.roic`` files."""

from __future__ import annotations

import inspect
import io
import json
import lzma
import os
import pickle
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.codec.checkpoint import (CONFIG_OPTIONS, CheckpointError, check_config, fingerprint, load_checkpoint,
                                       save_checkpoint, unpack_state_dict)
from pipeline.codec.entropy import FAMILIES
from pipeline.codec.latent import STRUCTURES
from pipeline.codec.models import MODELS, build_model
from pipeline.codec.transforms import TRANSFORMS

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / "fixtures" / "legacy"
SMALL = {"N": 16, "M": 32, "n_rates": 2}
CASE_SECONDS = 10.0
CASE_MEMORY_MB = 200.0  # peak memory a case may add (a tiny model and its tables take ~30 MB)
CONTROL = "control: 300 MB allocation"  # the harness must flag this one


# -- the checkpoints and their mutations ---------------------------------------------------------

def good_checkpoint(path: Path, variant: str = "tma", **config: Any) -> Path:
    torch.manual_seed(0)
    model = build_model(variant, **SMALL, **config).eval()
    model.update(force=True)
    return save_checkpoint(model, path)


def saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rezip(data: bytes, mutate: Callable[[str, bytes], bytes]) -> bytes:
    """The zip archive ``data`` with each member's bytes passed through ``mutate``, checksums
    recomputed: damage that the archive's CRCs do not see (what the fingerprint is for)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for info in src.infolist():
            archive.writestr(info.filename, mutate(info.filename, src.read(info)))
    return out.getvalue()


class RunsCode:
    """A pickle that runs a command when loaded without ``weights_only``: it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def crafted(good: Path, tmp: Path) -> list[tuple[str, bytes, str]]:
    """``(case, file bytes, fragment of the expected error)``: each kind of crafted checkpoint."""
    data = good.read_bytes()
    blob = torch.load(good, weights_only=True)

    def changed(**changes: Any) -> bytes:
        return saved({**blob, **changes})

    def config(**changes: Any) -> bytes:
        return changed(config={**blob["config"], **changes})

    def state(name: str, value: Any) -> bytes:
        return changed(state_dict={**blob["state_dict"], name: value})

    def without(*keys: str) -> bytes:
        return saved({k: v for k, v in blob.items() if k not in keys})

    weights = {k: v.clone() for k, v in blob["state_dict"].items()}
    weights["g_a.net.0.weight"].view(-1)[0] += 0.5
    cdf = "latent_codec.family.conditional._quantized_cdf"
    bad_cdf = blob["state_dict"][cdf].clone()
    bad_cdf.fill_(12345)  # no symbol has a frequency: the rANS coder divides by zero
    padded = unpack_state_dict(blob["state_dict"], blob["layout"])  # format 2 stored tables whole
    one_long_row = torch.zeros(10 ** 6, dtype=torch.int32)
    one_long_row[0] = 2 ** 20
    return [
        ("empty file", b"", "not a readable checkpoint"),
        ("text file", b"not a checkpoint\n", "not a readable checkpoint"),
        ("truncated to half", data[:len(data) // 2], "not a readable checkpoint"),
        ("truncated by 100 bytes", data[:-100], "not a readable checkpoint"),
        ("a plain pickle, not a zip", pickle.dumps({"format": blob["format"]}), "not a readable checkpoint"),
        ("a pickle that runs code", saved(RunsCode(tmp / "ran")), "not a readable checkpoint"),
        ("a list", saved([1, 2, 3]), "not a roicodec checkpoint"),
        ("a tensor", saved(torch.zeros(3)), "not a roicodec checkpoint"),
        ("unknown format", changed(format="roicodec-checkpoint/9"), "not a roicodec checkpoint"),
        ("no state_dict", without("state_dict"), "no state_dict"),
        ("no config", without("config"), "no config"),
        ("no variant", without("variant"), "no variant"),
        ("state_dict a list", changed(state_dict=list(blob["state_dict"].values())), "state_dict is a list"),
        ("state_dict a string", changed(state_dict="weights"), "state_dict is a str"),
        ("a state_dict entry not a tensor", state("g_a.net.0.weight", [0.0]), "not a named tensor"),
        ("a missing weight", changed(state_dict={k: v for k, v in blob["state_dict"].items()
                                                 if k != "g_s.net.0.weight"}), "g_s.net.0.weight"),
        ("an unexpected weight", state("g_a.extra.weight", torch.zeros(2)), "g_a.extra.weight"),
        ("a weight of another shape", state("g_a.net.0.weight", torch.zeros(3, 3)), "size mismatch"),
        ("config a list", changed(config=[16, 32]), "config is a list"),
        ("a string where N belongs", config(N="16"), "'N' must be an integer in [1, 512], got '16'"),
        ("a float where N belongs", config(N=16.0), "'N' must be an integer"),
        ("a bool where N belongs", config(N=True), "'N' must be an integer"),
        ("N of a million", config(N=1_000_000), "'N' must be an integer in [1, 512]"),
        ("M of a billion", config(M=10 ** 9), "'M' must be an integer in [1, 512]"),
        ("negative M", config(M=-32), "'M' must be an integer in [1, 512]"),
        ("ten million rate points", config(n_rates=10 ** 7), "'n_rates' must be an integer in [1, 64]"),
        ("an unknown config key", config(layers=3), "unknown config option 'layers'"),
        ("an option another variant takes", config(cond_channels=32), "does not build a tma model"),
        ("a NaN attention prior", config(attention_prior=float("nan")), "'attention_prior' must be a finite number"),
        ("a string where the family belongs", config(family=3), "'family' must be one of"),
        ("a thousand context groups", config(entropy="context", groups=[1] * 1000), "'groups' must be a list"),
        ("context groups not summing to M", config(entropy="context", groups=[8, 8]), "sum to M=32"),
        ("unknown variant", changed(variant="jpeg"), "unknown codec variant 'jpeg'"),
        ("variant not a string", changed(variant=["tma"]), "unknown codec variant"),
        # an expanded view declares 10^10 elements in 4 bytes: loading would allocate 40 GB
        ("a coding table of 40 GB", state(cdf, torch.zeros(1, dtype=torch.int32).expand(100_000, 100_000)),
         "declares 10000000000 elements"),
        # crafted tables (no fingerprint, as in checkpoints written before it was recorded)
        ("a CDF the coder divides by zero with", changed(state_dict={**blob["state_dict"], cdf: bad_cdf},
                                                         fingerprint=None), "coding tables are invalid"),
        ("CDF lengths past the table (format 2)", changed(format="roicodec-checkpoint/2", layout=None, state_dict={
            **padded, "latent_codec.entropy_bottleneck._cdf_length": torch.full((16,), 10 ** 6, dtype=torch.int32)},
            fingerprint=None), "coding tables are invalid"),
        ("packed CDF rows that are not its lengths", state(
            "latent_codec.entropy_bottleneck._cdf_length", torch.full((16,), 10 ** 6, dtype=torch.int32)),
         "packed tensors do not unpack (a packed CDF table does not match its lengths)"),
        # 10^6 rows of which one holds all 2^20 entries: 4 MB that pad to 4 TB
        ("a packed CDF padding to terabytes", changed(
            state_dict={**blob["state_dict"], cdf: torch.zeros(2 ** 20, dtype=torch.int32),
                        cdf.replace("_quantized_cdf", "_cdf_length"): one_long_row},
            layout={**blob["layout"], cdf: ["cdf", 2 ** 20]}), "would grow over 64x when padded"),
        ("an unknown packing", changed(layout={**blob["layout"], cdf: ["zip", 3]}), "unknown packing"),
        ("a layout naming no tensor", changed(layout={**blob["layout"], "g_a.nothing": ["bool", "float32"]}),
         "layout names g_a.nothing"),
        ("a fingerprint of the wrong type", changed(fingerprint=12345), "recorded fingerprint is not 16 hex"),
        ("extra not a dict", changed(extra=[1]), "extra is a list"),
        ("weights changed, fingerprint kept", changed(state_dict=weights),
         "checkpoint weights do not match its recorded fingerprint: damaged file?"),
        ("config changed, fingerprint kept", config(attention_prior=0.2),
         "checkpoint weights do not match its recorded fingerprint"),
    ]


def fuzzed(good: Path, seed: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` seeded damages of a real checkpoint: bytes flipped anywhere (the archive's
    checksums see them), cuts, and bytes flipped inside one member with the checksums
    recomputed (the pickle, a tensor's data: the loader and the fingerprint must see them)."""
    data = good.read_bytes()
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    pickle_name = next(n for n in names if n.endswith("data.pkl"))
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        kind = ("flipped", "cut", "member", "member", "pickle")[i % 5]
        if kind == "flipped":
            b = bytearray(data)
            n = rng.choice([1, 5, 50])
            for _ in range(n):
                b[rng.randrange(len(b))] = rng.randrange(256)
            cases.append((f"{n} bytes flipped", bytes(b)))
        elif kind == "cut":
            cut = rng.randrange(len(data))
            cases.append((f"cut at {cut}", data[:cut]))
        else:
            target = pickle_name if kind == "pickle" else rng.choice(names)
            n = rng.choice([1, 1, 3])

            def mutate(name: str, member: bytes, target: str = target, n: int = n) -> bytes:
                if name != target or not member:
                    return member
                b = bytearray(member)
                for _ in range(n):
                    b[rng.randrange(len(b))] = rng.randrange(256)
                return bytes(b)
            cases.append((f"{n} bytes of {target.split('/', 1)[1]} changed, CRC recomputed", rezip(data, mutate)))
    return cases


# -- the harness: a child process loads each file --------------------------------------------------

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _reset_peak() -> float:
    """Reset this process's peak resident memory (Linux: ``clear_refs`` 5); its current size in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def classify(fn: Callable[[], Any]) -> dict[str, Any]:
    """The outcome of one load: ``ok`` (with the model's fingerprint), ``CheckpointError`` (with
    its message) or ``other: <type>: <message>``; its seconds and the peak memory it added."""
    before, t0 = _reset_peak(), time.perf_counter()
    row: dict[str, Any] = {}
    try:
        model = fn()
        row.update(outcome="ok", fingerprint=fingerprint(model).hex() if model is not None else None)
    except CheckpointError as exc:
        row.update(outcome="CheckpointError", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - any other type is what the test looks for
        row.update(outcome=f"other: {type(exc).__name__}: {str(exc)[:200]}")
    row.update(seconds=time.perf_counter() - t0, added_mb=_status_mb("VmHWM") - before)
    return row


def _allocate_300mb() -> None:
    torch.ones(75_000_000).sum()  # 300 MB touched


def run_cases(folder: str, out: str) -> None:
    """Child-process body: load every ``*.pt`` of ``folder`` (listed in ``cases.json``)."""
    torch.set_num_threads(1)
    cases = json.loads((Path(folder) / "cases.json").read_text())
    rows = []
    for case in [{"case": CONTROL, "file": None}, *cases]:
        if case["file"] is None:
            row = classify(_allocate_300mb)
        else:
            row = classify(lambda: load_checkpoint(Path(folder) / case["file"]))
        rows.append({**case, **row})
    Path(out).write_text(json.dumps(rows))


def load_in_child(tmp: Path, cases: list[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    folder = tmp / "cases"
    folder.mkdir()
    listed = []
    for i, (name, data) in enumerate(cases):
        (folder / f"{i}.pt").write_bytes(data)
        listed.append({"case": name, "file": f"{i}.pt"})
    (folder / "cases.json").write_text(json.dumps(listed))
    out = tmp / "outcomes.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_hostile_checkpoints import run_cases; "
            "run_cases(sys.argv[2], sys.argv[3])")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(folder), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the loading process died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    rows = json.loads(out.read_text())
    control = rows[0]
    assert control["case"] == CONTROL and control["added_mb"] > CASE_MEMORY_MB, control  # the harness sees memory
    return {f"{r['file']}: {r['case']}": r for r in rows[1:]}


def test_the_harness_reports_other_errors_slow_loads_and_code_that_runs(tmp_path):
    assert classify(lambda: (_ for _ in ()).throw(RuntimeError("boom")))["outcome"].startswith("other: RuntimeError")
    assert classify(lambda: (_ for _ in ()).throw(CheckpointError("bad")))["outcome"] == "CheckpointError"
    assert classify(lambda: time.sleep(0.2))["seconds"] >= 0.2
    # the code-running pickle does run without weights_only (what loading must never do)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(saved(RunsCode(tmp_path / "ran")))
    torch.load(evil, weights_only=False)
    assert (tmp_path / "ran").exists()


def test_crafted_and_damaged_checkpoints_are_checkpoint_errors(tmp_path):
    good = good_checkpoint(tmp_path / "good.pt")
    original = fingerprint(load_checkpoint(good)).hex()
    cases = crafted(good, tmp_path)
    expected = {f"{i}.pt: {name}": fragment for i, (name, _, fragment) in enumerate(cases)}
    fuzz = fuzzed(good, seed=31, count=60)
    rows = load_in_child(tmp_path, [(name, data) for name, data, _ in cases] + fuzz)
    assert len(rows) == len(cases) + len(fuzz)
    other = [r for r in rows.values() if r["outcome"].startswith("other")]
    assert not other, other[:5]
    slow = [(k, r["seconds"]) for k, r in rows.items() if r["seconds"] > CASE_SECONDS]
    assert not slow, slow
    big = [(k, r["added_mb"]) for k, r in rows.items() if r["added_mb"] > CASE_MEMORY_MB]
    assert not big, big
    for key, fragment in expected.items():
        row = rows[key]
        assert row["outcome"] == "CheckpointError", (key, row)
        assert fragment in row["message"], (key, row["message"])
        assert len(row["message"].splitlines()) == 1, row["message"]
    assert not (tmp_path / "ran").exists()  # the code-running pickle never ran
    # damage: refused, or (bytes nothing reads, like a zip comment or the extra metadata) the same model
    fuzz_rows = [r for k, r in rows.items() if k not in expected]
    another = [r for r in fuzz_rows if r["outcome"] == "ok" and r["fingerprint"] != original]
    assert not another, another[:5]
    refused = [r for r in fuzz_rows if r["outcome"] == "CheckpointError"]
    assert len(refused) >= 0.8 * len(fuzz_rows)
    assert any("recorded fingerprint" in r["message"] for r in refused)  # damage only the fingerprint sees
    assert any("damaged" in r["message"] for r in refused)  # damage the archive's checksums see


def test_every_option_of_every_part_is_checked():
    """A part's new option must get a check (else its checkpoints would be refused as unknown)."""
    options = set()
    for part, skip in [(cls, 2) for cls in TRANSFORMS.values()] + [(cls, 3) for cls in STRUCTURES.values()] \
            + [(cls, 1) for cls in FAMILIES.values()]:
        options |= set(list(inspect.signature(part.__init__).parameters)[1 + skip:])
    assert options | {"N", "M", "n_rates", "entropy", "family"} == set(CONFIG_OPTIONS)
    for variant, preset in MODELS.items():
        for extra in ({}, {"entropy": "context"}):
            check_config(variant, build_model(variant, **SMALL, **preset.SMALL, **extra).config)
    with pytest.raises(CheckpointError, match="unknown config option 'depth'"):
        check_config("swin", {"depth": [1, 1, 1, 1]})


def test_legacy_fixtures_load_with_their_fingerprints(tmp_path):
    """Checkpoints written before the codec was composed from parts (no recorded fingerprint)."""
    index = json.loads((LEGACY / "index.json").read_text())
    for name, entry in index.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(lzma.decompress((LEGACY / entry["checkpoint"]).read_bytes()))
        assert "fingerprint" not in torch.load(path, weights_only=True)
        model = load_checkpoint(path)
        assert (model.variant, model.config) == (entry["variant"], entry["config"])
        assert fingerprint(model).hex() == entry["fingerprint"], name


# -- every entry point: one line ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_checkpoints")
    good = good_checkpoint(root / "good.pt")
    blob = torch.load(good, weights_only=True)
    files = {"good": good}
    data = bytearray(good.read_bytes())
    rng = random.Random(50)
    start = len(data) // 4  # in the tensors' data: before the checks, `compress` used this with exit 0
    for _ in range(50):
        data[rng.randrange(start, len(data) - 4096)] ^= 0xFF
    files["flipped"] = root / "flipped.pt"
    files["flipped"].write_bytes(bytes(data))
    weights = {k: v.clone() for k, v in blob["state_dict"].items()}
    weights["g_s.net.0.weight"].view(-1)[:10] = 0.0
    files["weights"] = root / "weights.pt"
    torch.save({**blob, "state_dict": weights}, files["weights"])
    files["huge"] = root / "huge.pt"
    torch.save({**blob, "config": {**blob["config"], "N": 1_000_000}}, files["huge"])
    from conftest import image_and_mask  # here: the child process that loads the cases needs none of it

    x, _ = image_and_mask(40, 56, seed=4)
    files["image"] = root / "in.png"
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(files["image"])
    files["roic"] = root / "in.roic"
    return files


def _in_process(capsys, main: Callable[[list[str]], int], *args: Any) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


FRAGMENTS = {"flipped": "damaged", "weights": "do not match its recorded fingerprint: damaged file?",
             "huge": "'N' must be an integer in [1, 512]"}


def test_the_command_line_says_one_line(bad_files, capsys):
    from pipeline.cli import main

    image, roic = bad_files["image"], bad_files["roic"]
    assert main(["compress", str(image), "--checkpoint", str(bad_files["good"]), "-o", str(roic)]) == 0
    capsys.readouterr()
    for name, fragment in FRAGMENTS.items():
        for args in (["compress", image, "-o", bad_files["good"].parent / "out.roic"],
                     ["decompress", roic, "-o", bad_files["good"].parent / "out.png"]):
            code, lines = _in_process(capsys, main, *args, "--checkpoint", bad_files[name])
            assert code == 1 and len(lines) == 1 and lines[0].startswith("roicodec: error: "), (name, lines)
            assert fragment in lines[0], lines[0]
    assert not (bad_files["good"].parent / "out.roic").exists()  # nothing written


def _job(name: str):
    import importlib.util

    saved_path = list(sys.path)  # the scripts put the checkout first on sys.path
    try:
        spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
    finally:
        sys.path[:] = saved_path
    return job


def test_the_service_and_the_jobs_say_one_line(bad_files, capsys, tmp_path):
    from pipeline.serve.settings import ServeSettings

    deploy, evaluate = _job("deploy"), _job("evaluate")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(bad_files["image"].read_bytes())
    for name, fragment in FRAGMENTS.items():
        with pytest.raises(CheckpointError, match=fragment.replace("?", r"\?").replace("[", r"\[")):
            ServeSettings.from_args({"checkpoint": str(bad_files[name])})  # build_app's check, at start
        code, lines = _in_process(capsys, deploy.main, "--checkpoint", bad_files[name], "--no-block")
        assert code == 1 and len(lines) == 1 and lines[0].startswith("deploy.py: error: ") and fragment in lines[0]
        code, lines = _in_process(capsys, evaluate.main, "--checkpoint", bad_files[name], "--images", images,
                                  "--json", tmp_path / "e.json")
        assert code == 1 and len(lines) == 1 and lines[0].startswith("evaluate: error: ") and fragment in lines[0]
    ServeSettings.from_args({"checkpoint": str(bad_files["good"])})


def test_resuming_a_training_run_refuses_damaged_weights(bad_files, tmp_path):
    from pipeline.train.loop import MODEL_FILE, STATE_FILE, load_training_checkpoint

    for name in ("good", "weights"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / MODEL_FILE).write_bytes(bad_files[name].read_bytes())
        torch.save({"step": 5, "config": {"variant": "tma"}}, folder / STATE_FILE)
        torch.manual_seed(1)
        model = build_model("tma", **SMALL)
        if name == "good":
            assert load_training_checkpoint(folder, model)["step"] == 5
        else:
            with pytest.raises(CheckpointError, match="recorded fingerprint"):
                load_training_checkpoint(folder, model)
