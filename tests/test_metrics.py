"""engine/metrics.py: crc32c, TensorBoard event files read back by an independent decoder,
metrics.jsonl (fresh and resumed), console modes, loss-curve PNGs."""
import glob
import importlib.util
import os
import socket
import struct
import zlib

import pytest

from engine import metrics
from engine.metrics import RunLogger, crc32c, masked_crc32c, plot_loss_curves, read_metrics

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _rows(n, start=0):
    return [{"step": s, "loss": 10.0 - 0.5 * s, "grad_norm": 1.0 + s, "lr": 1e-3,
             "num_tokens": 4096, "tokens_per_s": 1234.5, "note": "x", "ok": True}
            for s in range(start, n)]


# ------------------------------------------------------------------ an independent event reader

def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _mask(crc):
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path):
    data, pos, out = open(path, "rb").read(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _mask(_crc32c_bitwise(header))
        body = data[pos + 12:pos + 12 + n]
        assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == _mask(_crc32c_bitwise(body))
        out.append(body)
        pos += 16 + n
    return out


def _proto(buf):
    """{field number: [raw values]}: ints for varints, bytes for the rest."""
    fields, pos = {}, 0

    def varint():
        nonlocal pos
        v = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v

    while pos < len(buf):
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            val = varint()
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            assert wire == 2, wire
            n = varint()
            val, pos = buf[pos:pos + n], pos + n
        fields.setdefault(num, []).append(val)
    return fields


def _read_events(logdir):
    """[(step, {tag: value}, extras)] over every event file in ``logdir``, in file order."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for rec in _records(path):
            ev = _proto(rec)
            assert isinstance(struct.unpack("<d", ev[1][0])[0], float)
            step = ev.get(2, [0])[0]
            scalars = {}
            for summary in ev.get(5, []):
                for value in _proto(summary)[1]:
                    v = _proto(value)
                    scalars[v[1][0].decode()] = struct.unpack("<f", v[2][0])[0]
            events.append((step, scalars, ev))
    return events


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("data, want", [(b"", 0), (b"123456789", 0xE3069283), (b"a", 0xC1D04330),
                                         (bytes(32), 0x8A9136AA), (b"\xff" * 32, 0x62A8AB43)])
def test_crc32c_known_vectors(data, want):
    assert crc32c(data) == want
    assert _crc32c_bitwise(data) == want


def test_crc32c_matches_bitwise_on_random_bytes():
    rng = __import__("random").Random(0)
    for n in (1, 7, 64, 1000):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert crc32c(data) == _crc32c_bitwise(data) != zlib.crc32(data)
        assert masked_crc32c(data) == _mask(crc32c(data))


def test_event_file_reads_back(tmp_path):
    with RunLogger(tmp_path, enabled=True, total_steps=5, plot=False, progress=False) as log:
        for row in _rows(5):
            log.log(row)
    files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1 and files[0].endswith(socket.gethostname())
    events = _read_events(tmp_path / "tensorboard")
    assert events[0][2][3] == [b"brain.Event:2"]
    scalar_events = [(s, sc) for s, sc, _ in events if sc]
    assert [s for s, _ in scalar_events] == list(range(5))
    for (step, sc), row in zip(scalar_events, _rows(5)):
        # numeric fields only; "step" is the event's step, strings and bools are not scalars
        assert set(sc) == {"loss", "grad_norm", "lr", "num_tokens", "tokens_per_s"}
        for tag, v in sc.items():
            assert v == pytest.approx(row[tag], rel=1e-6)


def test_event_file_with_tensorboard(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with RunLogger(tmp_path, enabled=True, total_steps=4, plot=False, progress=False) as log:
        for row in _rows(4):
            log.log(row)
    acc = ea.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"]
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(r["step"], pytest.approx(r["loss"])) for r in _rows(4)]
    # a run resumed at step 2 replaces steps 2, 3 (TensorBoard purges on SessionLog.START)
    with RunLogger(tmp_path, enabled=True, total_steps=4, start_step=2, plot=False,
                   progress=False) as log:
        for row in _rows(4, start=2):
            log.log(dict(row, loss=-1.0))
    acc = ea.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(0, 10.0), (1, 9.5), (2, -1.0), (3, -1.0)]


def test_negative_and_large_values_encode(tmp_path):
    w = metrics.EventWriter(str(tmp_path))
    w.add_scalars(2**40, {"big": 1e300, "neg": -3.5, "nan": float("nan")})
    w.close()
    step, sc, _ = _read_events(tmp_path)[-1]
    assert step == 2**40 and sc["big"] == float("inf") and sc["neg"] == -3.5 and sc["nan"] != sc["nan"]


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
    # the resumed run's event file asks TensorBoard to purge the old run's steps >= 3
    tb = tmp_path / "tensorboard"
    starts = [s for s, _, ev in _read_events(tb) if 7 in ev]  # Event.session_log
    assert 3 in starts and all(_proto(ev[7][0])[1] == [1] for _, _, ev in _read_events(tb) if 7 in ev)
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
    with RunLogger(tmp_path, enabled=True, total_steps=3, plot=False) as log:
        for row in _rows(3):
            log.log(row, echo=row["step"] != 1)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split("|")[0].split() for line in lines] == [["step", "0"], ["step", "2"]]
    assert "loss 10.0000" in lines[0] and "tok/s 1234" in lines[0] and "lr 1.000e-03" in lines[0]
    assert "grad_norm 1.000" in lines[0] and "GiB" in lines[0]
    assert err == ""


def test_progress_bar(tmp_path, capsys):
    with RunLogger(tmp_path, enabled=True, total_steps=4, plot=False, progress=True) as log:
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
    with RunLogger(tmp_path, enabled=True, total_steps=1, progress=False) as log:
        log.log(_rows(1)[0])
    assert not (tmp_path / "loss.png").exists()
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "matplotlib" in skipped[0]
