"""Long texts in one continuous voice on the tiny model: each piece's prompt holds the reference, then the pieces
spoken before it (text + the codes the model generated, in the delay layout), within the context settings."""

import numpy as np
import pytest
import torch

from higgs_lora.data.audio import read_audio
from higgs_lora.data.collate import SYSTEM_PROMPT, build_delay_pattern, build_prompt, context_that_fits
from higgs_lora.infer.cloner import VoiceCloner
from higgs_lora.infer.decode import columns_to_codes
from higgs_lora.infer.sampling import SamplingParams
from higgs_lora.tiny import REPO_ROOT

REFERENCE = str(REPO_ROOT / "examples" / "demo_corpus" / "spk_f1" / "spk_f1_01.flac")
REFERENCE_TEXT = "تَشْرَبُ الجَدَّةُ الشَّايَ فِي الحَدِيقَةِ"
TWO_PIECES = "جملة قصيرة للاختبار، " * 14  # 14 clauses, ~300 characters: pieces of at most 200
THREE_PIECES = (
    "في صباح يوم الجمعة خرج أهل القرية إلى السوق القديم، يحملون سلالهم المليئة بالخضار والفواكه الطازجة التي "
    "قطفوها من حقولهم عند الفجر. وكان الباعة ينادون على بضائعهم بأصوات عالية، والأطفال يركضون بين الدكاكين "
    "الصغيرة، بينما يجلس الشيوخ في المقهى يشربون الشاي ويتحدثون عن المطر. وعند الظهر عاد الجميع إلى بيوتهم، "
    "وقد امتلأت السلال بما اشتروه، وبقيت رائحة الخبز الساخن تملأ الطرقات حتى المساء."
)
ENDS_BY_EOS = SamplingParams(temperature=0.7, seed=1, max_seconds=4)
"""With these settings the tiny model ends both pieces of TWO_PIECES itself (EOS), after a few frames: quick."""


@pytest.fixture(scope="module")
def cloner(tiny_checkpoint):
    cloner = VoiceCloner.load(tiny_checkpoint.model_dir, device="cpu", dtype="fp32")
    # ENDS_BY_EOS was picked for the prompt with a bare system turn; the layout checked here is the same for any
    # scene (tests/unit/data/test_prompt.py checks the scene forms), the random tiny model's output is not.
    cloner.use_scene("")
    return cloner


def recorded(cloner, text: str, params: SamplingParams):
    """(result, the prompt of each piece, the columns generated for each piece up to its end) of one request: the
    decode loop is wrapped for the call, so what the model was given and what it produced are seen as they were."""
    calls = []
    real_run = cloner.decoder.run

    def run(prompts, params, generators, all_done=None):
        rows, done = [[] for _ in prompts], [False] * len(prompts)
        calls.append((prompts, rows))
        for column in real_run(prompts, params, generators, all_done):
            for row in range(len(prompts)):
                if not done[row]:
                    rows[row].append(column.codes[row])
                    done[row] = bool(column.finished[row])
            yield column

    cloner.decoder.run = run
    try:
        result = cloner.clone(REFERENCE, REFERENCE_TEXT, text, params)
    finally:
        del cloner.decoder.run
    assert [len(prompts) for prompts, _ in calls] == [1] * len(result.pieces)
    return result, [prompts[0] for prompts, _ in calls], [torch.stack(rows[0]) for _, rows in calls]


@pytest.fixture(scope="module")
def two_pieces(cloner):
    return recorded(cloner, TWO_PIECES, ENDS_BY_EOS)


def rendered(cloner, texts: list[str], audio_positions: list[int]) -> torch.Tensor:
    """The tokens of a whole cloning conversation rendered by the chat template in one go: reference, earlier
    pieces, then the new piece's text, cut after the `<|audio_out_bos|>` its audio would follow."""
    processor, scene = cloner.processor, cloner.run_config.data.scene
    conversation = [] if scene is None else [{"role": "system", "content": SYSTEM_PROMPT}]
    conversation += [{"role": "scene", "content": scene}] if scene else []
    for text in texts:
        conversation += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": [{"type": "audio", "audio": "x"}]},
        ]
    pieces = processor.apply_chat_template(conversation, tokenize=False).split(processor.audio_token)
    text = pieces[0] + "".join(processor.get_audio_tokens(n) + rest for n, rest in zip(audio_positions, pieces[1:]))
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    audio_out_bos = processor.tokenizer.convert_tokens_to_ids(processor.audio_bos_token)
    return ids[: int((ids == audio_out_bos).nonzero()[-1, 0]) + 1]


def bos_eos(cloner) -> tuple[int, int]:
    return cloner.decoder.spec.bos_id, cloner.decoder.spec.eos_id


def decoded_codes(cloner, columns: torch.Tensor) -> torch.Tensor:
    """The (K, T) codes decoded from a piece's generated columns (what the listener hears of it)."""
    return columns_to_codes(columns, *bos_eos(cloner))[0]


def code_region(rows: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(K, T) the values of (L, K) delay-layout rows where the delay pattern holds codes (codebook k: rows k + 1 to
    k + T)."""
    return torch.stack([rows[k + 1 : k + 1 + num_frames, k] for k in range(rows.shape[1])])


def test_piece_two_holds_piece_one_text_and_exactly_its_generated_codes(cloner, two_pieces):
    result, (first, second), columns = two_pieces
    assert len(result.pieces) == 2 and result.context_pieces == [0, 1] and result.stops[0] == "eos"
    reference = cloner.reference(*read_audio(REFERENCE), REFERENCE_TEXT)
    scene = cloner.run_config.data.scene
    today = build_prompt(cloner.processor, reference.text, reference.codes, result.pieces[0], scene)
    assert torch.equal(first.input_ids, today.input_ids)  # the first piece has nothing before it
    num_reference = first.audio_input_ids.shape[0]
    assert torch.equal(second.audio_input_ids[:num_reference], first.audio_input_ids)  # the reference stays first
    segment, generated = second.audio_input_ids[num_reference:], columns[0]
    num_frames = int((generated[:, 0] == cloner.decoder.spec.eos_id).nonzero()[0, 0]) - 1  # codebook 0's codes
    assert len(segment) == num_frames + 9
    # Every code of the layout is the code the model generated at that very row and codebook, and around them is
    # the delay pattern's BOS triangle and EOS triangle (what the model generated past codebook 0's end is no audio).
    assert torch.equal(code_region(segment, num_frames), code_region(generated, num_frames))
    assert torch.equal(segment, build_delay_pattern(code_region(generated, num_frames), *bos_eos(cloner)).T)
    expected = rendered(cloner, [reference.text, *result.pieces], [num_reference, len(segment)])
    assert torch.equal(second.input_ids, expected)  # piece 1's text and audio turns between reference and piece 2
    assert result.prompt_positions == [len(first.input_ids), len(second.input_ids)]


@pytest.mark.parametrize(
    ("prompt", "pieces", "max_pieces", "max_positions", "kept"),
    [
        (100, [50, 60, 70], 2, 1000, 2),  # the last two
        (100, [50, 60, 70], 5, 1000, 3),  # all there are
        (100, [50, 60, 70], 2, 230, 2),  # exactly at the budget
        (100, [50, 60, 70], 2, 229, 1),  # one over: the oldest of the two (60) goes, the newest (70) stays
        (100, [50, 60, 70], 0, 1000, 0),  # K = 0: the reference alone
        (100, [], 2, 1000, 0),  # the first piece
        (300, [10], 2, 200, 0),  # over the budget without context: no context, the reference stays
    ],
)
def test_the_budget_keeps_the_newest_pieces_that_fit(prompt, pieces, max_pieces, max_positions, kept):
    assert context_that_fits(prompt, pieces, max_pieces, max_positions) == kept


def test_the_budget_drops_the_oldest_piece_first(cloner):
    reference = cloner.reference(*read_audio(REFERENCE), REFERENCE_TEXT)
    full, prompts, columns = recorded(cloner, THREE_PIECES, SamplingParams(temperature=0, max_seconds=0.4))
    assert len(full.pieces) == 3 and full.context_pieces == [0, 1, 2]
    num_reference = prompts[0].audio_input_ids.shape[0]
    spoken = [build_delay_pattern(decoded_codes(cloner, c), *bos_eos(cloner)).T for c in columns[:2]]
    texts = [reference.text, *full.pieces]
    assert torch.equal(prompts[2].input_ids, rendered(cloner, texts, [num_reference, *(len(s) for s in spoken)]))
    assert torch.equal(prompts[2].audio_input_ids, torch.cat([prompts[0].audio_input_ids, *spoken]))
    # A budget one position short of piece 3's prompt: piece 1 (the oldest) is dropped, piece 2 kept.
    short = SamplingParams(temperature=0, max_seconds=0.4, context_positions=full.prompt_positions[2] - 1)
    cut, cut_prompts, _ = recorded(cloner, THREE_PIECES, short)
    assert cut.context_pieces == [0, 1, 1] and cut.prompt_positions[:2] == full.prompt_positions[:2]
    expected = rendered(cloner, [reference.text, *full.pieces[1:]], [num_reference, len(spoken[1])])
    assert torch.equal(cut_prompts[2].input_ids, expected)
    assert torch.equal(cut_prompts[2].audio_input_ids, torch.cat([prompts[0].audio_input_ids, spoken[1]]))


def test_no_context_pieces_is_todays_prompt(cloner):
    """K = 0: every piece is prompted with the reference alone, token for token as `build_prompt` (today's)."""
    reference = cloner.reference(*read_audio(REFERENCE), REFERENCE_TEXT)
    params = SamplingParams(temperature=0, max_seconds=0.4, context_pieces=0)
    alone, alone_prompts, _ = recorded(cloner, TWO_PIECES, params)
    assert alone.context_pieces == [0, 0]
    for piece, prompt in zip(alone.pieces, alone_prompts):
        today = build_prompt(cloner.processor, reference.text, reference.codes, piece, cloner.run_config.data.scene)
        assert torch.equal(prompt.input_ids, today.input_ids)
        assert torch.equal(prompt.audio_input_ids, today.audio_input_ids)


def test_streamed_and_whole_long_form_audio_are_equal_for_a_seed(cloner, two_pieces):
    whole = two_pieces[0]
    request = cloner.request(REFERENCE, REFERENCE_TEXT, TWO_PIECES, ENDS_BY_EOS)
    chunks = list(cloner.events([request], stream=True))
    streamed = chunks[-1].result
    assert whole.context_pieces == streamed.context_pieces == [0, 1]
    assert streamed.stops == whole.stops and streamed.frames == whole.frames  # same codes, piece by piece
    joined = np.concatenate([c.samples for c in chunks if c.result is None])
    assert len(joined) == len(whole.waveform)
    assert np.abs(joined - whole.waveform).max() < 1e-3 * max(np.abs(whole.waveform).max(), 1e-6)
