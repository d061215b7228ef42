"""One-line errors: :func:`pipeline.errors.run_cli`, and the job scripts whose bad input had no
fast test of its own (``jobs/demo.py``, ``jobs/deploy.py``, ``jobs/evaluate.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from pipeline.errors import first_line, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _raise(exc: BaseException):
    def body():
        raise exc
    return body


def test_run_cli_exit_codes_and_one_line(capsys):
    assert run_cli(lambda: 3, "p", (ValueError,)) == 3
    assert run_cli(lambda: None, "p", (ValueError,)) == 0
    assert capsys.readouterr().err == ""
    assert run_cli(_raise(ValueError("bad input\nmore detail")), "p", (ValueError,)) == 1
    assert capsys.readouterr().err == "p: error: bad input\n"
    assert run_cli(_raise(OSError()), None, (ValueError, OSError), exit_code=lambda e: 7) == 7
    assert capsys.readouterr().err == "error: OSError\n"
    assert run_cli(_raise(ValueError("x")), "p", (ValueError,), message=lambda e: "picked") == 1
    assert capsys.readouterr().err == "p: error: picked\n"
    assert run_cli(_raise(KeyboardInterrupt()), "p", (ValueError,), interrupt=True) == 130
    assert capsys.readouterr().err == "p: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        run_cli(_raise(KeyboardInterrupt()), "p", (ValueError,))
    with pytest.raises(TypeError):  # not an expected error: a bug, with its traceback
        run_cli(_raise(TypeError("bug")), "p", (ValueError,))
    assert first_line(ValueError("\n  first\nsecond")) == "first" and first_line(RuntimeError()) == "RuntimeError"


def _job(name: str):
    saved = list(sys.path)  # the scripts put the checkout first on sys.path
    try:
        spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
    finally:
        sys.path[:] = saved
    return job


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_demo_bad_output_folder_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert _job("demo").main(["--out", str(a_file / "out")]) == 1
    assert _one_line(capsys).startswith("demo: error: ")


def test_deploy_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert _job("deploy").main(["--checkpoint", str(tmp_path / "missing.pt"), "--no-block"]) == 1
    assert _one_line(capsys) == f"deploy.py: error: checkpoint not found: {tmp_path / 'missing.pt'}"


def test_evaluate_missing_images_is_one_line(tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path / "c.pt"), "--images", str(tmp_path / "none"), "--json", str(tmp_path / "e")]
    assert _job("evaluate").main(argv) == 1
    assert _one_line(capsys) == f"evaluate: error: images folder not found: {tmp_path / 'none'}"
