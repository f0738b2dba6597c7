"""output.report_to: TensorBoard and Weights & Biases (offline) get metrics.jsonl's scalars and the
accuracy matrix, named as HF Trainer names its scalars (train/loss, eval/<task>; cl/AA); read back from the
files the trackers write."""

import json
import re
from pathlib import Path

import pytest

from ds_cl.training.outputs import MetricsLog


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from TensorBoard's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_history(folder: Path) -> list[dict]:
    """The logged rows of the offline W&B run(s) under `folder` (<dir>/wandb), in order: its .wandb file is
    a LevelDB-style log (7-byte W&B header; 32 KiB blocks of records with a 7-byte header: crc, length,
    type 1 full / 2 first / 3 middle / 4 last) of wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(folder.glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        pos, block, buf = 7, 32768, b""
        while pos + 7 <= len(data):
            room = block - pos % block
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            if room < 7 or (length == 0 and kind == 0):  # the block's zero padding
                pos += room
                continue
            buf += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                rec = pb.Record()
                rec.ParseFromString(buf)
                buf = b""
                if rec.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "ds-cl-test")


def test_both_trackers_get_the_scalars_and_the_matrix(tmp_path, offline_wandb):
    log = MetricsLog(tmp_path, rank=0, report_to=["tensorboard", "wandb"], config={"method": {"name": "osft"}})
    for step in (1, 2, 3):
        log.write({"step": step, "task": "a", "loss": 1.0 / step, "lr": 1e-4, "leak": 1e-7, "flag": True})
    log.write_matrix_row(["a", "b"], [[0.75]], 3)
    log.write({"step": 4, "task": "b", "loss": 0.5})
    log.write_matrix_row(["a", "b"], [[0.75], [0.5, 0.25]], 4)
    log.close()
    tb = tensorboard_scalars(tmp_path / "tensorboard")
    assert tb["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.5)]
    assert tb["train/lr"][0] == (1, pytest.approx(1e-4)) and tb["train/leak"][0] == (1, pytest.approx(1e-7))
    assert tb["eval/a"] == [(3, 0.75), (4, 0.5)] and tb["eval/b"] == [(4, 0.25)]
    assert tb["cl/AA"] == [(3, 0.75), (4, pytest.approx(0.375))]
    assert tb["cl/BWT"] == [(3, 0.0), (4, pytest.approx(-0.25))]  # as summary.json: 0 after one task
    assert {k.split("/")[0] for k in tb} == {"train", "eval", "cl"}  # no bare names
    assert not {"train/task", "train/step", "train/flag"} & set(tb)  # labels and booleans are not scalars
    rows = wandb_history(tmp_path / "wandb")
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.5)]
    assert [(r["_step"], r["eval/a"]) for r in rows if "eval/a" in r] == [(3, 0.75), (4, 0.5)]
    assert [(r["_step"], r["cl/AA"]) for r in rows if "cl/AA" in r] == [(3, 0.75), (4, pytest.approx(0.375))]
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / "wandb_run_id").read_text().strip() in run_dir.name
    # metrics.jsonl is written as before, whatever the trackers
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, offline_wandb):
    first = MetricsLog(tmp_path, rank=0, report_to=["wandb"])
    first.write({"step": 1, "loss": 1.0})
    first.close()
    again = MetricsLog(tmp_path, rank=0, report_to=["wandb"])
    again.write({"step": 2, "loss": 0.5})
    again.close()
    # offline-run-<time>-<run id>[-<n>]: one folder per session, the same run id (`wandb sync` joins them)
    runs = {re.fullmatch(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)(-\d+)?", p.name).group(1)
            for p in (tmp_path / "wandb").glob("offline-run-*")}
    assert runs == {(tmp_path / "wandb_run_id").read_text().strip()}
    assert [r["train/loss"] for r in wandb_history(tmp_path / "wandb")] == [1.0, 0.5]


def test_other_ranks_report_nothing(tmp_path, offline_wandb):
    log = MetricsLog(tmp_path, rank=1, report_to=["tensorboard", "wandb"])
    log.write({"step": 1, "loss": 1.0})
    log.write_matrix_row(["a"], [[1.0]], 1)
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_tracker_is_a_config_error(tmp_path):
    from ds_cl.training.config import ConfigError, load_config
    from tests.fixtures import tiny_run_config

    (tmp_path / "tok.model").write_bytes(b"x")  # the config check needs the file to exist, not to be read
    cfg = tiny_run_config(tmp_path, tmp_path / "out", {"output": {"report_to": ["tensorbord"]}})
    with pytest.raises(ConfigError, match=r"output.report_to: 'tensorbord' is not a tracker ds-cl reports to "
                                          r"\(tensorboard, wandb\)"):
        load_config(None, data=cfg)


@pytest.mark.parametrize("value,expect", [("tensorboard", ["tensorboard"]), ("none", []), (["none"], []),
                                          (None, []), (["tensorboard"], ["tensorboard"])])
def test_report_to_takes_a_string_as_hf_does(tmp_path, value, expect):
    """HF's TrainingArguments.report_to: one name for a list of one, "none" for none."""
    from ds_cl.training.config import load_config, save_config
    from tests.fixtures import tiny_run_config

    (tmp_path / "tok.model").write_bytes(b"x")
    cfg = load_config(None, data=tiny_run_config(tmp_path, tmp_path / "out", {"output": {"report_to": value}}))
    assert cfg.output.report_to == expect
    save_config(cfg, tmp_path / "resolved.yaml")  # the run's config.yaml holds the list, as --resume compares it
    assert load_config(tmp_path / "resolved.yaml").output.report_to == expect


def test_wandb_online_without_a_login_is_a_config_error(tmp_path, monkeypatch):
    """Checked before the model loads: online W&B without a key would fail (or prompt) in wandb.init."""
    from ds_cl.training.config import ConfigError, load_config
    from tests.fixtures import tiny_run_config

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    (tmp_path / "tok.model").write_bytes(b"x")
    cfg = tiny_run_config(tmp_path, tmp_path / "out", {"output": {"report_to": ["wandb"]}})
    with pytest.raises(ConfigError, match=r"output.report_to: wandb needs a login .* WANDB_MODE=offline"):
        load_config(None, data=cfg)
    monkeypatch.setenv("WANDB_MODE", "offline")
    load_config(None, data=cfg)
