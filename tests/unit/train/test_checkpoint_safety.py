"""Damaged and hostile checkpoints (issue 17.6-7): manifests, the fallback to the newest checkpoint that verifies,
explicit resumes of a damaged folder, and RNG files that can be read without unpickling code."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from higgs_lora.config import load_config
from higgs_lora.logs import setup_logging
from higgs_lora.train.checkpoint import (
    RNG_FORMAT,
    ResumeError,
    capture_rng,
    check_compatible,
    load_rng,
    newest_verified_checkpoint,
    resolve_resume,
)
from higgs_lora.train.checkpoint_manifest import MANIFEST, verify_checkpoint, write_manifest
from tests.conftest import REPO_ROOT

MODEL_STATES = "deepspeed/deepspeed/mp_rank_00_model_states.pt"


def fake_checkpoint(root, step: int, manifest: bool = True):
    """A checkpoint folder with the files save_checkpoint writes (contents made up), and its manifest."""
    path = root / "checkpoints" / f"step_{step:08d}"
    (path / "deepspeed" / "deepspeed").mkdir(parents=True)
    (path / MODEL_STATES).write_bytes(bytes(range(256)) * 40 + bytes([step % 256]))
    (path / "deepspeed/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x01" * 3000)
    (path / "rng").mkdir()
    torch.save(capture_rng(), path / "rng" / "rank_00000.pt")
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "sampler": {"world_size": 1}}))
    if manifest:
        write_manifest(path)
    (root / "checkpoints" / "latest").write_text(path.name + "\n")
    return path


def cfg_for(tmp_path, *overrides):
    return load_config(REPO_ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}", *overrides])


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    step = fake_checkpoint(tmp_path, 10)
    manifest = json.loads((step / MANIFEST).read_text())
    assert sorted(manifest["files"]) == [
        "adapter/adapter_config.json",
        MODEL_STATES,
        "deepspeed/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rng/rank_00000.pt",
        "trainer_state.json",
    ]
    assert manifest["files"]["trainer_state.json"]["size"] == (step / "trainer_state.json").stat().st_size
    assert verify_checkpoint(step).problem is None


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("truncate", "has 5000 bytes, manifest.json says 10241 (truncated?)"),
        ("flip", "does not match its SHA-256"),
        ("delete", "is missing (listed in manifest.json)"),
    ],
)
def test_auto_resume_skips_a_damaged_newest_checkpoint_and_says_why(tmp_path, capsys, damage, expected):
    setup_logging()
    older = fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    target = newest / MODEL_STATES
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:5000])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[100] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    assert resolve_resume(cfg_for(tmp_path)) == older
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}: {target}" in err and expected in err


def test_empty_trainer_state_is_caught_by_the_manifest_and_by_check_compatible(tmp_path, capsys):
    setup_logging()
    older = fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    (newest / "trainer_state.json").write_text("")
    assert newest_verified_checkpoint(tmp_path) == older
    assert "trainer_state.json has 0 bytes" in capsys.readouterr().err
    with pytest.raises(ResumeError, match="trainer_state.json is unreadable"):
        check_compatible(newest, cfg_for(tmp_path), world_size=1)


def test_explicit_resume_of_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path):
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    (newest / MODEL_STATES).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ResumeError) as caught:
        resolve_resume(cfg_for(tmp_path, f"train.resume={newest}"))
    assert str(newest / MODEL_STATES) in str(caught.value) and "train.resume=auto" in str(caught.value)
    assert caught.value.exit_code == 2


def test_no_checkpoint_verifies_means_starting_afresh_with_each_reason_logged(tmp_path, capsys):
    setup_logging()
    for step in (10, 20):
        (fake_checkpoint(tmp_path, step) / MANIFEST).write_text("{not json")
    assert resolve_resume(cfg_for(tmp_path)) is None
    err = capsys.readouterr().err
    assert err.count("skipping checkpoint") == 2 and "manifest.json is unreadable" in err


def test_a_checkpoint_without_manifest_is_accepted_with_a_warning_if_it_looks_whole(tmp_path, capsys):
    setup_logging()
    old = fake_checkpoint(tmp_path, 10, manifest=False)
    assert resolve_resume(cfg_for(tmp_path)) == old
    assert "has no manifest.json (written by an older version)" in capsys.readouterr().err
    (old / "trainer_state.json").write_text("")
    assert resolve_resume(cfg_for(tmp_path)) is None
    with pytest.raises(ResumeError, match="trainer_state.json is not a readable JSON file"):
        resolve_resume(cfg_for(tmp_path, f"train.resume={old}"))


# ------------------------------------------------------------------------------------------------- RNG


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian in Python's state
    state = capture_rng()
    torch.save(state, tmp_path / "rank_00000.pt")
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = torch.load(tmp_path / "rank_00000.pt", weights_only=True)
    assert loaded["format"] == RNG_FORMAT
    assert load_rng(tmp_path / "rank_00000.pt") is True
    assert draws() == expected


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_rng_file_is_refused_without_running_it(tmp_path, capsys):
    setup_logging()
    marker = tmp_path / "pwned"
    hostile = tmp_path / "rank_00000.pt"
    with hostile.open("wb") as handle:
        pickle.dump({"python": _RunsCode(marker)}, handle, protocol=2)
    torch.manual_seed(5)
    expected = float(torch.rand(1))
    torch.manual_seed(5)
    assert load_rng(hostile) is False
    assert not marker.exists()
    assert float(torch.rand(1)) == expected  # the generators were left as they were
    assert "not bit-identical" in capsys.readouterr().err


def test_an_old_format_rng_file_is_refused_with_a_warning(tmp_path, capsys):
    setup_logging()
    old = tmp_path / "rank_00000.pt"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, old)
    assert load_rng(old) is False
    assert "refused because unpickling can run code" in capsys.readouterr().err


def test_a_damaged_latest_pointer_falls_back_to_the_newest_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    for garbage in (b"\xff\xfe\x00", b"", b"../../etc\n"):
        (tmp_path / "checkpoints" / "latest").write_bytes(garbage)
        assert resolve_resume(cfg_for(tmp_path)) == newest
