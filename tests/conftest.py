"""Test-wide rules: no network, no model hub, tiny models built once per session, markers that skip honestly."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO_ROOT / "examples" / "demo_corpus"
FULL_SIZE_CONFIG = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 28,
}
"""The released model's layer sizes (config.json keys) for pure planning and FLOP tests."""

# Offline before anything imports transformers / huggingface_hub / datasets, and an empty HF home, so a test can
# never pass because something happened to be in a local hub cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="higgs-lora-test-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------ network guard


class NetworkAccessError(OSError):
    """Raised when a test tries to connect to anything but the loopback interface."""


_blocked_attempts: list[str] = []


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)) and not isinstance(address, tuple):
        return True  # AF_UNIX path
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost: resolving it would already be network access


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        _blocked_attempts.append(f"connect to {address!r}")
        raise NetworkAccessError(f"tests may only connect to loopback addresses, not {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        _blocked_attempts.append(f"connect_ex to {address!r}")
        raise NetworkAccessError(f"tests may only connect to loopback addresses, not {address!r}")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _fail_on_network_access():
    """Fail the test if it tried to reach a non-loopback address, even if the code under test caught the error."""
    _blocked_attempts.clear()
    yield
    if _blocked_attempts:
        attempts = "; ".join(_blocked_attempts)
        _blocked_attempts.clear()
        pytest.fail(f"network access outside loopback attempted: {attempts}")


@pytest.fixture
def network_attempts():
    """The list of blocked connection attempts (for the guard's own test, which clears it)."""
    return _blocked_attempts


# ------------------------------------------------------------------------------------------------ markers


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    has_cuda = _cuda_available()
    # With sbatch present, tests/slurm/conftest.py decides (a cluster may still not be running); where .ci/run
    # started one (HIGGS_LORA_REQUIRE_SLURM=1) nothing is skipped, so a missing cluster fails instead.
    has_slurm = os.environ.get("HIGGS_LORA_REQUIRE_SLURM") == "1" or any(
        (Path(p) / "sbatch").exists() for p in os.environ.get("PATH", "").split(os.pathsep)
    )
    skip_gpu = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    skip_slurm = pytest.mark.skip(
        reason="needs SLURM: no sbatch on PATH (.ci/run installs and starts one: tests/slurm/local_slurm.sh start)"
    )
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slurm" in item.keywords and not has_slurm:
            item.add_marker(skip_slurm)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Higgs checkpoint (model/ + codec/) in the released layout, built once per test session."""
    import torch

    from higgs_lora.tiny import DEFAULT_TRANSCRIPTS, write_tiny

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return write_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, transcripts=DEFAULT_TRANSCRIPTS)


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory):
    """A tiny random multilingual Whisper (transformers layout, <|ar|> and <|en|>), built once per test session."""
    from higgs_lora.tiny import write_tiny_whisper

    return write_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper") / "whisper", seed=0)


@pytest.fixture(scope="session")
def demo_rows():
    """The demo corpus utterances as dicts (absolute audio paths), read by the real manifest reader."""
    import dataclasses

    from higgs_lora.data.sources import read_corpus

    corpus = read_corpus(DEMO_CORPUS / "manifest.jsonl", "manifest")
    assert not corpus.problems
    return [dataclasses.asdict(u) for u in corpus.utterances]


def pytest_report_header(config):
    python = sys.version.split()[0]
    return f"higgs-lora tests: offline (HF_HOME={os.environ['HF_HOME']}), loopback-only sockets, python {python}"


@pytest.fixture(scope="session")
def demo_cache(tiny_checkpoint, tmp_path_factory):
    """The demo corpus prepared into a codec-token cache with the tiny codec, once per session.

    Returns the overrides a run config needs to train on it (tiny model, codec, corpus, cache).
    """
    from higgs_lora.config import load_config
    from higgs_lora.data.prepare import join, run_prepare

    cache = tmp_path_factory.mktemp("demo-cache") / "cache"
    overrides = [
        f"model.path={tiny_checkpoint.model_dir}",
        f"model.codec_path={tiny_checkpoint.codec_dir}",
        f"data.corpus={DEMO_CORPUS / 'manifest.jsonl'}",
        f"data.cache_dir={cache}",
    ]
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [*overrides, f"output_dir={cache.parent}"])
    run_prepare(cfg, quiet=True)
    join(cfg)
    return overrides


@pytest.fixture(scope="session")
def replay_cache(demo_cache, tmp_path_factory):
    """The demo cache copied, with an English espeak-ng corpus (tests/replay_corpus.py) prepared into its replay/
    by `prepare` itself. Returns (the overrides of a run with data.replay_fraction=0.25, the cache directory)."""
    import shutil

    from higgs_lora.data.prepare import main as prepare_main
    from tests.replay_corpus import make_english_corpus

    root = tmp_path_factory.mktemp("replay")
    manifest = make_english_corpus(root / "english")
    demo_dir = next(o.split("=", 1)[1] for o in demo_cache if o.startswith("data.cache_dir="))
    cache = root / "cache"
    shutil.copytree(demo_dir, cache)
    overrides = [o for o in demo_cache if not o.startswith("data.cache_dir=")]
    overrides += [f"data.cache_dir={cache}", f"data.replay={manifest}", "data.replay_fraction=0.25"]
    argv = ["--config", str(REPO_ROOT / "configs" / "demo.yaml"), *overrides, f"output_dir={root}", "--quiet"]
    assert prepare_main(argv) == 0
    return overrides, cache
