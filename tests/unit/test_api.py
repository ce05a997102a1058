"""The Python API's names (higgs_lora.api, docs/python_api.md): importable from the package, loaded lazily."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def test_import_is_cheap_and_names_the_api():
    code = (
        "import sys, higgs_lora\n"
        "assert 'torch' not in sys.modules\n"
        "names = ['load_config', 'RunConfig', 'prepare_corpus', 'train_adapter', 'VoiceCloner', 'SamplingParams']\n"
        "assert set(names) <= set(dir(higgs_lora)) and set(names) <= set(higgs_lora.__all__)\n"
        "higgs_lora.load_config; higgs_lora.prepare_corpus; higgs_lora.train_adapter\n"
        "assert 'torch' not in sys.modules, 'the API functions import torch only when called'\n"
        "from higgs_lora.infer.cloner import VoiceCloner\n"
        "assert higgs_lora.VoiceCloner is VoiceCloner\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_prepare_without_a_corpus_is_a_user_error():
    import higgs_lora
    from higgs_lora.errors import UserError

    cfg = higgs_lora.load_config(REPO_ROOT / "configs" / "demo.yaml", ["data.corpus="])
    with pytest.raises(UserError, match="data.corpus is not set"):
        higgs_lora.prepare_corpus(cfg)
