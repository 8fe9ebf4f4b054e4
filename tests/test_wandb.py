"""W&B, offline (no network): one W&B run per training across a preemption (SIGTERM, or kill -9) and --resume,
its latest offline run file, read back record by record, holding every step once with metrics.jsonl's values
(`wandb sync` of a later offline directory of a run replaces the earlier one's history, so the latest must hold
it all), step-aligned images also given again after a resume, the summary, and a W&B failure costing one line."""
import functools
import glob
import json
import os
import struct
import sys
import types

import pytest
import torch

import common
import helpers
from helpers import one_thread  # noqa: F401 (an autouse fixture)
import no_diffusion
import test_no_diffusion

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

run_cli = functools.partial(helpers.run_cli, no_diffusion.main)


@pytest.fixture(autouse=True)
def quiet_offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    monkeypatch.setattr(common, "_wandb_failed", False)


def wandb_records(path):
    """The records of a W&B offline run file (run-<id>.wandb): a 7-byte header (':W&B', 0xBEE1, version), then
    LevelDB-log blocks of 32 KiB whose chunks carry (crc32, length, type: 1 full, 2 first, 3 middle, 4 last);
    each whole payload is a wandb_internal_pb2.Record. Yields the records."""
    with open(path, "rb") as file:
        data = file.read()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    position, pending = 7, b""
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:      # a block's tail too short for a chunk header is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += left_in_block
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def offline_runs(outdir):
    """{run id: [records of each offline run directory with that id, oldest first]} under outdir/wandb. A
    process killed before W&B wrote its buffer leaves a file with the header alone (no records)."""
    runs = {}
    for directory in sorted(glob.glob(os.path.join(outdir, "wandb", "offline-run-*"))):
        (path,) = glob.glob(os.path.join(directory, "run-*.wandb"))
        records = list(wandb_records(path))
        run_id = os.path.basename(path)[len("run-"):-len(".wandb")]
        assert all(record.run.run_id == run_id for record in records if record.WhichOneof("record_type") == "run")
        runs.setdefault(run_id, []).append(records)
    return runs


def history_rows(records):
    """[(step, {key: value})] of the history records."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append((record.history.step.num, items))
    return rows


def tiny_args(outdir, data_dir, *extra):
    """test_no_diffusion's tiny run, every step logged, offline W&B (later flags override earlier ones)."""
    return test_no_diffusion.tiny_args(outdir, data_dir, "--Ntest", "16", "--record-interval", "2", "--log-every", "1",
                                       "--wandb", "offline", *extra)


def test_a_resumed_run_continues_the_same_wandb_run_with_every_step_once(tmp_path, monkeypatch):
    data_dir, outdir = tmp_path / "data", tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(common, "StopSignal", helpers.StopAfter)       # SIGTERM after 5 steps (mid-epoch)
        assert run_cli(tiny_args(outdir, data_dir)) == 0
    assert not (outdir / "results.json").exists()
    assert run_cli(tiny_args(outdir, data_dir, "--resume")) == 0

    (id_file,) = glob.glob(str(outdir / ".wandb-*.id"))
    run_id = open(id_file).read().strip()
    runs = offline_runs(outdir)
    assert list(runs) == [run_id] and len(runs[run_id]) == 2           # one W&B run, written by two processes
    first, latest = runs[run_id]
    expected = logged_losses(outdir)
    assert len(expected) == 18                                       # 2 epochs x 9 steps (288 functions), each logged
    assert_every_step_once(latest, expected)
    assert sorted(step for step, items in history_rows(first) if "train/loss" in items) == list(range(1, 7))
    assert any(key.endswith("w_total") for _, items in history_rows(latest) for key in items)
    summaries = [item.key or "/".join(item.nested_key) for record in runs[run_id][-1]
                 if record.WhichOneof("record_type") == "summary" for item in record.summary.update]
    assert "final/w_total" in summaries

    # a fresh run (no --resume) is a new W&B run, even in a directory with an id file
    fresh = tmp_path / "fresh"
    assert run_cli(tiny_args(fresh, data_dir, "--epochs", "1")) == 0
    (fresh_id,) = offline_runs(fresh)
    assert fresh_id != run_id


def logged_losses(outdir):
    """{step: train/loss} of outdir/metrics.jsonl (the last record of a step wins)."""
    losses = {}
    if os.path.exists(outdir / "metrics.jsonl"):
        with open(outdir / "metrics.jsonl") as file:
            for line in file:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:   # the line a kill cut short
                    continue
                if "train/loss" in record:
                    losses[record["step"]] = record["train/loss"]
    return losses


def assert_every_step_once(records, expected):
    """The history of an offline run file holds each step of `expected` ({step: train/loss}) exactly once, with
    that value."""
    rows = [(step, items["train/loss"]) for step, items in history_rows(records) if "train/loss" in items]
    assert sorted(step for step, _ in rows) == sorted(expected)
    for step, loss in rows:
        assert loss == pytest.approx(expected[step], rel=1e-6), step


def test_after_a_kill_9_the_wandb_history_holds_every_step_once(tmp_path, monkeypatch):
    """kill -9 (no handler, no checkpoint at the kill) mid-epoch, after the process has logged steps past its
    last checkpoint; then --resume, which trains those steps again. One W&B run; every step once in its
    latest offline run file (metrics.jsonl's records up to the checkpoint given again, W&B having lost what the
    killed process had not yet written), each equal to metrics.jsonl's value."""
    data_dir, outdir = tmp_path / "data", tmp_path / "run"
    argv = [str(arg) for arg in tiny_args(outdir, data_dir, "--epochs", "4", "--threads", "1")]
    monkeypatch.delenv("WANDB_SERVICE", raising=False)   # the child starts its own W&B service, as a real job does
    helpers.kill_9_when("no_diffusion.py", argv, lambda: max(logged_losses(outdir), default=0) >= 13)
    checkpoint_step = torch.load(outdir / "model.pt", weights_only=False)["step"]
    logged_by_the_killed = max(logged_losses(outdir))
    assert logged_by_the_killed > checkpoint_step                     # steps the resumed run trains again
    assert run_cli([*argv, "--resume"]) == 0

    ((run_id, (_killed, latest)),) = offline_runs(outdir).items()       # one W&B run, written by two processes
    expected = logged_losses(outdir)
    assert len(expected) == 36                                        # 4 epochs x 9 steps, each logged
    assert_every_step_once(latest, expected)


def test_images_are_logged_at_their_training_step(tmp_path):
    image = common.save_image_grid(str(tmp_path / "grid.png"), torch.zeros(4, 1, 8, 8), nrow=2)
    logger = common.RunLogger(str(tmp_path), {"x": 1}, "offline", name="images")
    logger.log({"train/loss": 1.0}, step=3)
    logger.log_image("samples", image, caption="at step 5", step=5)   # a step with no scalars
    logger.log({"train/loss": 0.5}, step=7)
    logger.finish({"final": 0.5})
    ((run_id, (records,)),) = offline_runs(tmp_path).items()
    rows = dict(history_rows(records))
    assert sorted(rows) == [3, 5, 7]                                  # without step= it would join step 3
    assert rows[5]["samples/_type"] == "image-file" and rows[3]["train/loss"] == 1.0   # the image's fields, nested
    assert not any(key.startswith("samples") for key in {**rows[3], **rows[7]})
    assert open(tmp_path / ".wandb-images.id").read().strip() == run_id

    # resumed from a checkpoint at step 5: the image is given to the resumed run again, step 7 is logged anew
    resumed = common.RunLogger(str(tmp_path), {"x": 1}, "offline", name="images", resume=True)
    assert resumed.truncate_after(5) == 1
    resumed.log({"train/loss": 0.25}, step=7)
    resumed.finish()
    _, latest = offline_runs(tmp_path)[run_id]
    rows = dict(history_rows(latest))
    assert sorted(rows) == [3, 5, 7] and rows[5]["samples/_type"] == "image-file" and rows[7]["train/loss"] == 0.25


def test_a_wandb_failure_costs_one_line_and_nothing_else(tmp_path, monkeypatch, capsys):
    broken = types.ModuleType("wandb")

    def init(**kwargs):
        raise RuntimeError("no network\nsecond line")
    broken.init = init
    monkeypatch.setitem(sys.modules, "wandb", broken)
    logger = common.RunLogger(str(tmp_path), {}, "online", name="broken")
    logger.log({"train/loss": 2.0}, step=1)
    logger.log_image("samples", str(tmp_path / "missing.png"), step=1)
    logger.finish({"final": 2.0})
    common.RunLogger(str(tmp_path), {}, "online", name="again")      # later loggers do not retry or print
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines == ["W&B did not start (RuntimeError: no network); continuing with metrics.jsonl only"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["train/loss"] == 2.0 and records[1]["image"] == "samples" and len(records) == 2
