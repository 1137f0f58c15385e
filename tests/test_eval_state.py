"""Resumable evaluation's state (iat.eval.state): what is reused, and what is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_eval_outputs import COMMON

import nets
from iat.app.watch import evaluation_key
from iat.config import Config
from iat.eval.state import BatchRecord, EvalState, EvalStateError, fingerprint, state_dir
from main import main

SPLIT = {"num_images": 12, "batch": 2}  # six batches of two images


def _config(**changes) -> Config:
    return dataclasses.replace(Config(fake=True, attack_iter=2), **changes)


def test_fingerprint_follows_what_changes_numbers_only(tmp_path: Path):
    base = fingerprint(_config(), 40)
    neutral = _config(workers=7, threads=1, eval_output="x.json", skip_unreadable=True)
    assert fingerprint(neutral, 40) == base  # a crash's advice (--skip-unreadable) resumes
    assert fingerprint(_config(quantize=True), 40) != base  # what is scored
    for changed in (_config(attack_epsilon=8.0), _config(attack_iter=3), _config(seed=1)):
        assert fingerprint(changed, 40) != base
    assert fingerprint(_config(), 41) != base
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"one")
    with_ckpt = fingerprint(_config(load=str(ckpt)), 40)
    ckpt.write_bytes(b"other weights")  # same path, new contents
    assert fingerprint(_config(load=str(ckpt)), 40) != with_ckpt


def test_state_dir_defaults_beside_the_result_file():
    assert state_dir(_config(eval_output="out/r.json")) == Path("out/r.json.state")
    assert state_dir(_config(eval_output="r.json", eval_state="elsewhere")) == Path("elsewhere")
    assert state_dir(_config(eval_output="r.json", eval_state="none")) is None
    assert state_dir(_config()) is None


def test_records_round_trip_and_a_line_cut_by_a_kill_is_ignored(tmp_path: Path):
    state = EvalState(tmp_path, "key", rank=1, **SPLIT)
    record = BatchRecord(3, [2.0, 1.0, 0.0, 1.0], 0.0, {"broken": [1.0, 0.0]})
    state.append(record)
    state.close()
    path = tmp_path / "key.rank1.jsonl"
    with path.open("a") as f:
        f.write('{"batch": 5, "counts": [2.0, 1')  # SIGKILL mid-write
    assert EvalState(tmp_path, "key", rank=0, **SPLIT).done == {3: record}
    assert EvalState(tmp_path, "other", rank=0, **SPLIT).done == {}
    # The relaunched rank appends after the cut line, not onto it; a second resume reads all.
    again = EvalState(tmp_path, "key", rank=1, **SPLIT)
    later = BatchRecord(5, [2.0, 0.0, 0.0, 0.0], 0.0, {"broken": [0.0, 0.0]})
    again.append(later)
    again.close()
    assert EvalState(tmp_path, "key", rank=0, **SPLIT).done == {3: record, 5: later}


@pytest.mark.parametrize(
    "line",
    [
        '{"batch": -1, "counts": [1, 1, 0, 0], "skipped": 0, "stats": {}}',
        '{"batch": 0, "counts": [1, 1e999, 0, 0], "skipped": 0, "stats": {}}',
        '{"batch": 0, "counts": [1, 1, 0], "skipped": 0, "stats": {}}',
        '{"batch": 0, "counts": [1, 1, 0, 0], "skipped": 0, "stats": {}, "extra": 1}',
        # Counts no batch of two images can give (issue 32): negative, beyond the batch, not
        # whole, not adding up with the skipped images, or booleans taken for numbers.
        '{"batch": 0, "counts": [-400, -350, 0, 0], "skipped": 402, "stats": {}}',
        '{"batch": 0, "counts": [1000000, 0, 0, 0], "skipped": 0, "stats": {}}',
        '{"batch": 0, "counts": [2, 3, 0, 0], "skipped": 0, "stats": {}}',
        '{"batch": 0, "counts": [2, 1, 2, 0], "skipped": 0, "stats": {}}',
        '{"batch": 0, "counts": [2, 0, 0, 3], "skipped": 0, "stats": {}}',
        '{"batch": 0, "counts": [1.5, 0, 0, 0], "skipped": 0.5, "stats": {}}',
        '{"batch": 0, "counts": [1, 0, 0, 0], "skipped": 0, "stats": {}}',
        '{"batch": true, "counts": [2, 0, 0, 0], "skipped": 0, "stats": {}}',
        '{"batch": 0, "counts": [true, true, false, false], "skipped": 1, "stats": {}}',
        '{"batch": 6, "counts": [2, 0, 0, 0], "skipped": 0, "stats": {}}',
        '{"batch": 0, "counts": [2, 0, 0, 1%s], "skipped": 0, "stats": {}}' % ("0" * 400),
        '["not", "a", "record"]',
    ],
)
def test_a_hostile_line_is_one_error_naming_the_file_and_line(tmp_path: Path, line: str):
    good = BatchRecord(0, [2.0, 1.0, 0.0, 0.0], 0.0, {}).line()
    (tmp_path / "key.rank0.jsonl").write_text(line + "\n" + good)
    with pytest.raises(EvalStateError, match=r"key\.rank0\.jsonl line 1: not an evaluation"):
        EvalState(tmp_path, "key", rank=0, **SPLIT)


def test_a_relaunch_resumes_and_a_corrupt_state_stops_with_one_line(
    tiny_imagenet: Path, tmp_path: Path, capsys
):
    torch.manual_seed(0)
    ckpt = tmp_path / "w.pt"
    nets.save_weights(nets.build_model("ResNet", num_blocks=[1] * 4, width=8, num_classes=3), ckpt)
    out = tmp_path / "r.json"
    args = ["--eval", "--load", str(ckpt), "--data", str(tiny_imagenet), *COMMON,
            "--attack-iter", "2", "--eval-output", str(out)]  # fmt: skip
    assert main(args) == 0
    whole = json.loads(out.read_text())
    # What a run killed after its first batch leaves: that batch's record, with made-up counts
    # (3 images, all wrong) that the resumed result must contain as they are.
    cfg_key = next(iter(_keys_of_a_killed_run(args, tmp_path)))
    folder = Path(f"{out}.state")
    folder.mkdir()
    (folder / f"{cfg_key}.rank0.jsonl").write_text(
        BatchRecord(0, [3.0, 3.0, 3.0, 3.0], 0.0, {}).line()
    )
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming the evaluation from" in capsys.readouterr().out
    resumed = json.loads(out.read_text())
    assert resumed["images"] == whole["images"] == 7
    assert resumed["top1_error"] >= whole["top1_error"]
    assert not folder.exists()
    folder.mkdir()
    (folder / f"{cfg_key}.rank0.jsonl").write_text(
        "garbage\n" + BatchRecord(0, [3.0] * 4, 0.0, {}).line()
    )
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1: not an evaluation state record" in err[0], err


def _keys_of_a_killed_run(args: list[str], tmp_path: Path) -> set[str]:
    """The state file key that `args` use: run with a state folder of its own and keep what
    the run would have left had it been killed (the files are removed at the end, so look at
    the name while it runs through EvalState.append)."""
    keys: set[str] = set()
    original = EvalState.append

    def spy(self: EvalState, record: BatchRecord) -> None:
        keys.add(self.key)
        original(self, record)

    EvalState.append = spy
    try:
        assert main([*args, "--eval-state", str(tmp_path / "spy")]) == 0
    finally:
        EvalState.append = original
    return keys


@pytest.mark.parametrize(
    "changes",
    [{"seed": 1}, {"attack_epsilon": 8.0}, {"batch": 7}, {"quantize": True}, {"eot_samples": 3}],
)
def test_a_setting_that_changes_a_result_changes_the_fingerprint_and_the_watch_key(changes):
    """One list of what changes the numbers (result_settings): a resumed evaluation and
    --eval --watch both start afresh when it changes, and neither when only a neutral one does."""
    base, changed = _config(), _config(**changes)
    assert fingerprint(changed, 40) != fingerprint(base, 40)
    assert evaluation_key(changed) != evaluation_key(base)
    neutral = _config(**changes, workers=7, watch_interval=1.0, eval_output="x.json")
    assert fingerprint(neutral, 40) == fingerprint(changed, 40)
    assert evaluation_key(neutral) == evaluation_key(changed)
