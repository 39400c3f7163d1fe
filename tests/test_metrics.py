"""engine/metrics.py: TensorBoard scalars read back with tensorboard's own EventAccumulator
(fresh, resumed, off, package missing), Weights & Biases offline runs read back from their
.wandb file, metrics.jsonl (fresh and resumed), console modes, loss-curve PNGs."""
import glob
import importlib.util
import json
import os
import struct
import sys
import time

import pytest

from engine.config.checks import validate
from engine.config.loader import load_config
from engine.config.schema import ConfigError
from engine.metrics import RunLogger, plot_loss_curves, read_metrics

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
SCALARS = {"loss", "grad_norm", "lr", "num_tokens", "tokens_per_s"}  # "note" and "ok" are not numbers


def _rows(n, start=0):
    return [{"step": s, "loss": 10.0 - 0.5 * s, "grad_norm": 1.0 + s, "lr": 1e-3,
             "num_tokens": 4096, "tokens_per_s": 1234.5, "note": "x", "ok": True}
            for s in range(start, n)]


def _log(out, rows, **kw):
    with RunLogger(out, enabled=True, total_steps=len(rows), plot=False, progress=False, **kw) as log:
        for row in rows:
            log.log(row)


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard itself reads ``logdir`` (purges included)."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------ TensorBoard

def test_tensorboard_scalars_read_back(tmp_path):
    _log(tmp_path, _rows(5))
    got = _scalars(tmp_path / "tensorboard")
    assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 1
    assert set(got) == SCALARS  # "step" is the event's step, strings and bools are not scalars
    for tag, points in got.items():
        assert [s for s, _ in points] == list(range(5))
        assert [v for _, v in points] == [pytest.approx(r[tag], rel=1e-6) for r in _rows(5)]


def test_tensorboard_resume_replaces_later_steps(tmp_path):
    _log(tmp_path, _rows(4))
    assert _scalars(tmp_path / "tensorboard")["loss"] == [(0, 10.0), (1, 9.5), (2, 9.0), (3, 8.5)]
    # a run resumed at step 2 replaces steps 2, 3 (TensorBoard purges on SessionLog.START). A real
    # resume is a later process: its event file's name (whole-second time, host, pid, then a
    # per-process counter compared as a string, so "10" < "9") sorts after; here, one second on
    time.sleep(1.05)
    _log(tmp_path, [dict(r, loss=-1.0) for r in _rows(4, start=2)], start_step=2)
    assert _scalars(tmp_path / "tensorboard")["loss"] == [(0, 10.0), (1, 9.5), (2, -1.0), (3, -1.0)]


def test_tensorboard_large_negative_nan_values(tmp_path):
    _log(tmp_path, [{"step": 2**40, "big": 1e300, "neg": -3.5, "nan": float("nan")}])
    got = _scalars(tmp_path / "tensorboard")
    assert got["big"] == [(2**40, float("inf"))] and got["neg"] == [(2**40, -3.5)]  # float32 values
    assert got["nan"][0][0] == 2**40 and got["nan"][0][1] != got["nan"][0][1]


def test_tensorboard_off(tmp_path):
    _log(tmp_path, _rows(2), tensorboard=False)
    assert not (tmp_path / "tensorboard").exists() and len(read_metrics(tmp_path / "metrics.jsonl")) == 2


def test_tensorboard_missing_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    _log(tmp_path / "auto", _rows(2))  # default: skipped with one line, the rest still logged
    assert not (tmp_path / "auto" / "tensorboard").exists()
    assert len(read_metrics(tmp_path / "auto" / "metrics.jsonl")) == 2
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "meshtron[tensorboard]" in skipped[0]
    with pytest.raises(ImportError, match=r"train\.tensorboard=true .*meshtron\[tensorboard\]"):
        RunLogger(tmp_path / "required", enabled=True, total_steps=1, tensorboard=True, progress=False)


# ------------------------------------------------------------------ Weights & Biases

def _wandb_records(path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    records (7-byte header: crc, uint16 length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) may
    span blocks; a block's tail shorter than a header is padding."""
    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B"
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            out.append(part)
            part = b""
    return out


def _wandb_history(run_dir):
    """(project, [{key: value}] of the logged steps) of the one offline run under ``run_dir``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = []
    for _ in range(100):  # wandb-core may still be writing after finish() returns: wait for the exit record
        records = [wandb_internal_pb2.Record.FromString(data) for data in _wandb_records(path)]
        if any(rec.WhichOneof("record_type") == "exit" for rec in records):
            break
        time.sleep(0.1)
    project, rows = None, []
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            project = rec.run.project
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            rows.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
    return project, rows


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var))  # nothing written outside tmp_path
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    _log(tmp_path / "run", _rows(3), wandb_project="meshtron-test", tensorboard=False,
         run_config={"train": {"steps": 3}})
    project, history = _wandb_history(tmp_path / "run")
    assert project == "meshtron-test"
    assert [h.pop("_step") for h in history] == [0, 1, 2]
    assert history == [{k: r[k] for k in SCALARS} for r in _rows(3)]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == _rows(3)  # the JSONL log is kept


def test_wandb_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    # other ranks hold a disabled logger: they never import wandb
    RunLogger(tmp_path / "rank1", enabled=False, total_steps=1, wandb_project="p").close()
    with pytest.raises(ImportError, match=r"train\.wandb_project='p' .*meshtron\[wandb\]"):
        RunLogger(tmp_path / "rank0", enabled=True, total_steps=1, wandb_project="p", progress=False)
    assert not (tmp_path / "rank0" / "metrics.jsonl").exists()


def test_config_logging_fields(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: not installed
    with pytest.raises(ConfigError, match=r"train\.wandb_project='p' needs wandb"):
        validate(load_config(None, ["train.wandb_project=p"]), 1)
    # files=False (meshtron-plan --simulate) checks no installed package
    cfg = validate(load_config(None, ["train.wandb_project=p", "train.tensorboard=false"]), 1, files=False)
    assert (cfg.train.wandb_project, cfg.train.wandb_mode, cfg.train.tensorboard) == ("p", "offline", False)
    with pytest.raises(ConfigError, match="train.wandb_mode='cloud' is not supported"):
        validate(load_config(None, ["train.wandb_mode=cloud"]), 1)


# ------------------------------------------------------------------ metrics.jsonl and the console

def test_metrics_jsonl_and_resume(tmp_path):
    with RunLogger(tmp_path, enabled=True, total_steps=6, plot=False, progress=False) as log:
        for row in _rows(6):
            log.log(row)
    assert read_metrics(tmp_path / "metrics.jsonl") == _rows(6)
    # resume at step 3: rows 0..2 kept, 3..5 dropped, then the resumed run appends its own
    with RunLogger(tmp_path, enabled=True, total_steps=6, start_step=3, plot=False,
                   progress=False) as log:
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]
        assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
        resumed = [dict(r, loss=-1.0) for r in _rows(6, start=3)]
        for row in resumed:
            log.log(row)
    assert read_metrics(tmp_path / "metrics.jsonl") == _rows(3) + resumed
    # a fresh run (start_step=0) starts the file over
    with RunLogger(tmp_path, enabled=True, total_steps=2, plot=False, progress=False) as log:
        log.log(_rows(1)[0])
    assert read_metrics(tmp_path / "metrics.jsonl") == _rows(1)


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    log = RunLogger(out, enabled=False, total_steps=3, progress=True)
    for row in _rows(3):
        log.log(row)
    log.close()
    assert not out.exists()
    assert capsys.readouterr() == ("", "")


def test_plain_lines_when_not_a_tty(tmp_path, capsys):
    # pytest captures stderr, so it is not a TTY: progress=None falls back to plain lines
    with RunLogger(tmp_path, enabled=True, total_steps=3, plot=False, tensorboard=False) as log:
        for row in _rows(3):
            log.log(row, echo=row["step"] != 1)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split("|")[0].split() for line in lines] == [["step", "0"], ["step", "2"]]
    assert "loss 10.0000" in lines[0] and "tok/s 1234" in lines[0] and "lr 1.000e-03" in lines[0]
    assert "grad_norm 1.000" in lines[0] and "GiB" in lines[0]
    assert err == ""


def test_progress_bar(tmp_path, capsys):
    with RunLogger(tmp_path, enabled=True, total_steps=4, plot=False, progress=True, tensorboard=False) as log:
        for row in _rows(4):
            log.log(row)
    out, err = capsys.readouterr()
    assert out == "" and "4/4" in err and "loss" in err and "tok/s" in err


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_loss_png_and_overlay(tmp_path):
    runs = {}
    for sp in (1, 2, 4):
        d = tmp_path / f"sp{sp}"
        with RunLogger(d, enabled=True, total_steps=5, progress=False) as log:
            for row in _rows(5):
                log.log(dict(row, loss=row["loss"] + 0.01 * sp))
        png = d / "loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        runs[f"SP={sp}"] = str(d / "metrics.jsonl")
    out = tmp_path / "overlay.png"
    assert plot_loss_curves(runs, str(out), "loss vs SP") is True
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_skipped_without_matplotlib(tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with RunLogger(tmp_path, enabled=True, total_steps=1, progress=False, tensorboard=False) as log:
        log.log(_rows(1)[0])
    assert not (tmp_path / "loss.png").exists()
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "matplotlib" in skipped[0]
