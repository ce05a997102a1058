"""Merge on damaged inputs and after a killed run (issue 17.9): exit 2 naming the file, stale staging copies removed
(never a live run's), a moved base named with --base, and the codec found beside a new --base."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from higgs_lora.config import ModelConfig, RunConfig, save_config
from higgs_lora.deploy.lora_weights import AdapterError
from higgs_lora.deploy.merge import main
from higgs_lora.deploy.merge_plan import MergeError, plan_merge
from higgs_lora.files import _owner, stale_staging
from tests.unit.deploy.test_merge import random_peft_adapter


@pytest.fixture(scope="module")
def trained_adapter(tiny_checkpoint, tmp_path_factory):
    """A higgs-lora style adapter folder (PEFT files + higgs_lora.yaml) on the tiny model, made once."""
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    random_peft_adapter(tiny_checkpoint, adapter)
    cfg = RunConfig(
        name="ar", model=ModelConfig(path=str(tiny_checkpoint.model_dir), codec_path=str(tiny_checkpoint.codec_dir))
    )
    save_config(cfg, adapter / "higgs_lora.yaml")
    return adapter


def copy_adapter(adapter, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    return copy


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_a_damaged_adapter_weights_file_is_exit_2_naming_it(trained_adapter, tmp_path, capsys, damage):
    adapter = copy_adapter(trained_adapter, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(len(data)), "empty": b""}[damage])
    with pytest.raises(AdapterError, match="is not a readable safetensors file"):
        plan_merge(str(adapter), out=str(tmp_path / "out"), device="cpu")
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: {weights} is not a readable safetensors file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content,expected",
    [(b"{not json", "is not valid JSON"), (b"[1, 2]", "holds a JSON list"), (b"\xff\xfe{}", "is not valid JSON")],
    ids=["not-json", "a-list", "not-utf8"],
)
def test_an_invalid_adapter_config_is_exit_2_naming_it(trained_adapter, tmp_path, capsys, content, expected):
    adapter = copy_adapter(trained_adapter, tmp_path)
    (adapter / "adapter_config.json").write_bytes(content)
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: {adapter / 'adapter_config.json'} {expected}" in err and "Traceback" not in err


def moved_setup(tiny_checkpoint, trained_adapter, tmp_path, with_codec_beside=True):
    """An adapter whose recorded base and codec paths no longer exist, and the model moved to new/."""
    adapter = copy_adapter(trained_adapter, tmp_path)
    gone = tmp_path / "old"
    cfg = RunConfig(name="ar", model=ModelConfig(path=str(gone / "model"), codec_path=str(gone / "codec")))
    save_config(cfg, adapter / "higgs_lora.yaml")
    new = tmp_path / "new"
    shutil.copytree(tiny_checkpoint.model_dir, new / "model")
    # The moved model's processor config still names the codec where it was (absolute, as older versions wrote
    # it): gone as well.
    processor = new / "model" / "processor_config.json"
    settings = json.loads(processor.read_text())
    settings["audio_tokenizer"] = {"audio_tokenizer_name_or_path": str(gone / "codec")}
    processor.write_text(json.dumps(settings))
    if with_codec_beside:
        shutil.copytree(tiny_checkpoint.codec_dir, new / "codec")
    return adapter, gone, new


def test_a_moved_base_names_the_base_flag(tiny_checkpoint, trained_adapter, tmp_path):
    adapter, gone, _ = moved_setup(tiny_checkpoint, trained_adapter, tmp_path)
    with pytest.raises(MergeError) as caught:
        plan_merge(str(adapter), out=str(tmp_path / "out"), device="cpu")
    message = str(caught.value)
    assert str(gone / "model") in message and "pass --base NEW_BASE_DIR" in message


def test_base_alone_finds_the_codec_beside_the_new_base(tiny_checkpoint, trained_adapter, tmp_path):
    adapter, _, new = moved_setup(tiny_checkpoint, trained_adapter, tmp_path)
    plan = plan_merge(str(adapter), out=str(tmp_path / "out"), base=str(new / "model"), device="cpu")
    assert (plan.base, plan.codec) == (new / "model", new / "codec")


def test_no_codec_anywhere_names_the_codec_flag(tiny_checkpoint, trained_adapter, tmp_path):
    adapter, gone, new = moved_setup(tiny_checkpoint, trained_adapter, tmp_path, with_codec_beside=False)
    with pytest.raises(MergeError) as caught:
        plan_merge(str(adapter), out=str(tmp_path / "out"), base=str(new / "model"), device="cpu")
    assert f"the recorded codec {gone / 'codec'} is not there either; pass --codec CODEC_DIR" in str(caught.value)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_is_told_from_a_live_one(tmp_path):
    out = tmp_path / "Higgs-Audio-2-ar"
    host = _owner().rsplit("-", 1)[0]
    dead = tmp_path / f".{out.name}.{host}-{dead_pid()}-abcd1234.partial"
    live = tmp_path / f".{out.name}.{host}-{os.getpid()}-efgh5678.partial"
    elsewhere = tmp_path / f".{out.name}.other-host-{dead_pid()}-ijkl9012.partial"
    old_unowned = tmp_path / f".{out.name}.mnop3456.partial"
    new_unowned = tmp_path / f".{out.name}.qrst7890.partial"
    other_target = tmp_path / f".Higgs-Audio-2-other.{host}-{dead_pid()}-uvwx1234.partial"
    for path in (dead, live, elsewhere, old_unowned, new_unowned, other_target):
        path.mkdir()
    started = time.time()
    os.utime(old_unowned, (started - 3600, started - 3600))
    os.utime(new_unowned, (started + 5, started + 5))
    stale, running = stale_staging(out, started)
    assert sorted(stale) == sorted([dead, old_unowned])
    assert sorted(running) == sorted([live, elsewhere, new_unowned])


def test_a_later_merge_removes_a_killed_merges_staging_but_not_a_live_one(trained_adapter, tmp_path, capsys):
    out = tmp_path / "Higgs-Audio-2-ar"
    host = _owner().rsplit("-", 1)[0]
    killed = tmp_path / f".{out.name}.{host}-{dead_pid()}-abcd1234.partial"
    (killed / "model-00001-of-00002.safetensors").parent.mkdir()
    (killed / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".{out.name}.{host}-{os.getpid()}-efgh5678.partial"
    live.mkdir()
    rc = main(["--adapter", str(trained_adapter), "--out", str(out), "--device", "cpu", "--no-verify"])
    assert rc == 0, capsys.readouterr().err
    assert not killed.exists() and live.is_dir()
    assert json.loads((out / "higgs_lora_merge.json").read_text())["base"]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial"))
    assert leftovers == [live.name]  # the successful merge's own staging became `out`
