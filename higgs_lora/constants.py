"""Facts of the released model and codec, and the names of files every stage shares (one home for each).

Imports nothing; every module may import it. The numbers are those of Higgs Audio v2 and its codec
(docs/architecture.md, "The model and the codec").
"""

SAMPLE_RATE = 24000
"""Sample rate of the codec's audio, in and out."""
HOP_SAMPLES = 960
"""Samples per codec frame."""
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_SAMPLES
"""Codec frames per second of audio (25)."""
NUM_CODEBOOKS = 8
"""Residual codebooks per frame."""
DELAY_POSITIONS = NUM_CODEBOOKS + 1
"""Extra model positions per audio segment: stream BOS + EOS, plus the 7-step delay pattern (T frames -> T+9)."""

DEFAULT_SCENE = "Audio is recorded from a quiet room."
"""The scene of Boson AI's cloning examples (`examples/scene_prompts/quiet_indoor.txt`), rendered in the system turn:
the prompt the released model is prompted with by default, and `data.scene`'s default."""
NO_SYSTEM_TURN = "none"
"""`data.scene` value for no system turn at all (what Boson AI's code renders for a cloning prompt without a scene)."""

RUN_CONFIG = "higgs_lora.yaml"
"""The resolved run config, written next to every adapter and merged model, read back by merge, infer and serve."""

STEP_NAME = "step_{:08d}"
"""Folder name of anything kept per optimizer step: checkpoints, evaluation samples."""
