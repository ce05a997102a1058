"""From codec codes and texts to model inputs and zero-shot training labels.

Pure functions of their inputs (no codec, no model): the delay pattern, its inverse, the target-audio labels, and
the zero-shot example (system, reference transcript, reference audio, target text, target audio). See
docs/architecture.md for the layout of a sample; the rules are those of the released model:

- T frames of codes (K codebooks) become K x (T + K + 1) delayed codes: BOS, the codes, EOS, shifted right by k
  for codebook k (upper-left padded with BOS, lower-right with EOS). T frames take T + 9 positions for K = 8.
- Only the target audio is trained. Its real codes are labelled, and for each codebook exactly one EOS, right after
  its last code: generation stops when all codebooks have emitted EOS, so the model must be shown it. The reference
  audio, all prompt text and padding are ignored (-100).
- The optional text loss labels only the text tokens of the target assistant turn that follow its audio
  (`<|audio_eos|>`, `<|eot_id|>`): prompt text, `<|audio_out_bos|>`, audio and delay placeholders and padding are
  ignored. (The processor's `output_labels` labels delay tokens; we do not.)

Besides the model inputs, `collate` returns the loss targets already shifted by one position (position i predicts
position i + 1), with a mask of the positions that predict anything. Training asks the model for logits at those
positions only (`logits_to_keep=loss_mask`): the audio head has 8 x 1026 outputs, and most positions of a zero-shot
sample (prompt text, reference audio) have nothing to predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from higgs_lora.constants import DEFAULT_SCENE, NO_SYSTEM_TURN

IGNORE_INDEX = -100
SYSTEM_PROMPT = "Generate audio following instruction."
_SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"


def has_system_turn(scene: str) -> bool:
    """Whether a prompt with this `data.scene` opens with a system turn ('none': it does not)."""
    return scene.strip().lower() != NO_SYSTEM_TURN


def build_delay_pattern(codes: torch.Tensor, bos_id: int, eos_id: int) -> torch.Tensor:
    """Delay-pattern (K, T) codes into (K, T + K + 1): row k is [BOS]*(k+1), codes, [EOS]*(K-k)."""
    num_codebooks, num_frames = codes.shape
    delayed = torch.full((num_codebooks, num_frames + num_codebooks + 1), eos_id, dtype=torch.long)
    for k in range(num_codebooks):
        delayed[k, : k + 1] = bos_id
        delayed[k, k + 1 : k + 1 + num_frames] = codes[k]
    return delayed


def revert_delay_pattern(delayed: torch.Tensor) -> torch.Tensor:
    """Inverse of `build_delay_pattern`: (K, L) delayed codes -> the (K, L - K - 1) codes (BOS/EOS removed)."""
    num_codebooks, length = delayed.shape
    num_frames = length - num_codebooks - 1
    if num_frames < 0:
        raise ValueError(f"{length} positions are fewer than the {num_codebooks + 1} a delay pattern adds")
    return torch.stack([delayed[k, k + 1 : k + 1 + num_frames] for k in range(num_codebooks)])


def target_audio_labels(delayed: torch.Tensor, eos_id: int, bos_id: int) -> torch.Tensor:
    """Labels for a delayed target segment (K, L): its codes, one EOS per codebook after its last code, else -100."""
    labels = torch.full_like(delayed, IGNORE_INDEX)
    is_code = delayed < min(bos_id, eos_id)
    labels[is_code] = delayed[is_code]
    num_codebooks = delayed.shape[0]
    for k in range(num_codebooks):
        eos_positions = (delayed[k] == eos_id).nonzero()
        if len(eos_positions) == 0:
            raise ValueError(f"codebook {k} of the target has no EOS: the segment is not delay-patterned")
        labels[k, eos_positions[0, 0]] = eos_id
    return labels


@dataclass
class Example:
    """One zero-shot training sample, unpadded."""

    input_ids: torch.Tensor
    """(L,) text token ids with audio placeholders (`<|AUDIO_OUT|>` and delay tokens) for every audio position."""
    audio_input_ids: torch.Tensor
    """(A, K) delayed codes of the reference then the target segment, one row per audio position."""
    audio_labels: torch.Tensor
    """(A, K) labels aligned with `audio_input_ids`: -100 except on the target's codes and first EOS."""
    loss_labels: torch.Tensor
    """(L, K) audio labels shifted by one: row i holds what position i must predict for the next position."""
    text_loss_labels: torch.Tensor
    """(L,) text labels shifted by one: the target turn's closing text tokens, -100 elsewhere."""

    @property
    def num_positions(self) -> int:
        return int(self.input_ids.shape[0])


def render_zero_shot_prompt(processor, reference_text: str, target_text: str, scene: str = DEFAULT_SCENE) -> str:
    """The chat-template text of a cloning conversation with an assistant audio turn for reference and target.

    `scene` ('' none, else folded into the system turn as `<|scene_desc_start|>...`); `NO_SYSTEM_TURN` renders no
    system turn at all. The chat template (ours and the transformers port's) requires a system message, so that
    form is rendered with one and the system turn is cut out, leaving what Boson AI's code renders without a scene.
    """
    system = has_system_turn(scene)
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
    if scene and system:
        conversation.append({"role": "scene", "content": [{"type": "text", "text": scene}]})
    conversation += [
        {"role": "user", "content": [{"type": "text", "text": reference_text}]},
        {"role": "assistant", "content": [{"type": "audio", "audio": "reference"}]},
        {"role": "user", "content": [{"type": "text", "text": target_text}]},
        {"role": "assistant", "content": [{"type": "audio", "audio": "target"}]},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False)
    if system:
        return text
    start = text.find(_SYSTEM_HEADER)
    end = text.find("<|eot_id|>", start)
    if start < 0 or end < 0 or text.find(_SYSTEM_HEADER, end) >= 0:
        raise ValueError("the chat template rendered no single system turn to cut out for data.scene=none")
    return text[:start] + text[end + len("<|eot_id|>") :]


def build_example(
    processor,
    reference_text: str,
    reference_codes: torch.Tensor,
    target_text: str,
    target_codes: torch.Tensor,
    scene: str = DEFAULT_SCENE,
) -> Example:
    """A zero-shot training example from texts and (K, T) codec codes of the reference and target audio."""
    bos_id, eos_id = processor.audio_stream_bos_id, processor.audio_stream_eos_id
    segments = [build_delay_pattern(c.long(), bos_id, eos_id) for c in (reference_codes, target_codes)]
    text = render_zero_shot_prompt(processor, reference_text, target_text, scene)
    pieces = text.split(processor.audio_token)
    if len(pieces) != len(segments) + 1:
        raise ValueError(f"the chat template rendered {len(pieces) - 1} audio placeholders, expected {len(segments)}")
    expanded = pieces[0]
    for segment, piece in zip(segments, pieces[1:]):
        expanded += processor.get_audio_tokens(segment.shape[1]) + piece
    input_ids = processor.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    labels = [torch.full_like(segments[0], IGNORE_INDEX), target_audio_labels(segments[1], eos_id, bos_id)]
    audio_labels = torch.cat(labels, dim=1).T.contiguous()
    audio_token_ids = processor.tokenizer.convert_tokens_to_ids([processor.audio_token, processor.audio_delay_token])
    is_audio = torch.isin(input_ids, torch.tensor(audio_token_ids))
    if int(is_audio.sum()) != audio_labels.shape[0]:
        raise ValueError(f"{int(is_audio.sum())} audio placeholders for {audio_labels.shape[0]} audio positions")
    position_labels = torch.full((len(input_ids), audio_labels.shape[1]), IGNORE_INDEX, dtype=torch.long)
    position_labels[is_audio] = audio_labels
    # Text supervision: what follows the target audio inside its assistant turn (<|audio_eos|>, <|eot_id|>).
    text_labels = torch.full_like(input_ids, IGNORE_INDEX)
    last_audio = int(is_audio.nonzero()[-1, 0])
    eot_id = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    turn_end = last_audio + 1
    while turn_end < len(input_ids) and int(input_ids[turn_end]) != eot_id:
        turn_end += 1
    text_labels[last_audio + 1 : turn_end + 1] = input_ids[last_audio + 1 : turn_end + 1]
    return Example(
        input_ids=input_ids,
        audio_input_ids=torch.cat(segments, dim=1).T.contiguous(),
        audio_labels=audio_labels,
        loss_labels=shift_left(position_labels),
        text_loss_labels=shift_left(text_labels),
    )


def shift_left(labels: torch.Tensor) -> torch.Tensor:
    """Labels of position i + 1 moved to position i (the last position predicts nothing)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:-1] = labels[1:]
    return shifted


def prompt_overhead_tokens(processor, scene: str = DEFAULT_SCENE) -> int:
    """Tokens of a zero-shot prompt besides the two transcripts and the audio positions.

    A sample's length in model positions is this + tokens(reference text) + tokens(target text) + (T_ref + 9) +
    (T_target + 9): the transcripts sit between special tokens, so their tokenisation does not interact with the
    template (a test checks the sum against built examples).
    """
    text = render_zero_shot_prompt(processor, "", "", scene).replace(processor.audio_token, "")
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


MODEL_INPUTS = ("input_ids", "attention_mask", "audio_input_ids", "audio_input_ids_mask")
"""The keys of a collated batch that the model's forward takes; the rest are loss targets."""


def collate(examples: list[Example], pad_token_id: int, audio_pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch for HiggsAudioV2ForConditionalGeneration.

    Model inputs (`MODEL_INPUTS`), `audio_labels` (B, A, K) in the model's own label format, and the shifted loss
    targets: `loss_mask` (B, L) marks positions that predict audio, `loss_labels` (N, K) their labels in row-major
    order of the mask; `text_loss_mask` / `text_loss_labels` likewise for the optional text loss.
    """
    max_len = max(e.num_positions for e in examples)
    max_audio = max(e.audio_input_ids.shape[0] for e in examples)
    num_codebooks = examples[0].audio_input_ids.shape[1]
    batch = len(examples)
    input_ids = torch.full((batch, max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, max_len), dtype=torch.long)
    audio_input_ids = torch.full((batch, max_audio, num_codebooks), audio_pad_id, dtype=torch.long)
    audio_labels = torch.full((batch, max_audio, num_codebooks), IGNORE_INDEX, dtype=torch.long)
    audio_mask = torch.zeros((batch, max_audio), dtype=torch.bool)
    loss_labels = torch.full((batch, max_len, num_codebooks), IGNORE_INDEX, dtype=torch.long)
    text_loss_labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n, a = e.num_positions, e.audio_input_ids.shape[0]
        input_ids[i, :n] = e.input_ids
        attention_mask[i, :n] = 1
        audio_input_ids[i, :a] = e.audio_input_ids
        audio_labels[i, :a] = e.audio_labels
        audio_mask[i, :a] = True
        loss_labels[i, :n] = e.loss_labels
        text_loss_labels[i, :n] = e.text_loss_labels
    loss_mask = (loss_labels != IGNORE_INDEX).any(-1)
    text_loss_mask = text_loss_labels != IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "audio_input_ids": audio_input_ids,
        "audio_input_ids_mask": audio_mask,
        "audio_labels": audio_labels,
        "loss_mask": loss_mask,
        "loss_labels": loss_labels[loss_mask],
        "text_loss_mask": text_loss_mask,
        "text_loss_labels": text_loss_labels[text_loss_mask],
    }


@dataclass
class Prompt:
    """A zero-shot cloning prompt for generation: everything up to and including the target's `<|audio_out_bos|>`."""

    input_ids: torch.Tensor
    """(L,) token ids, audio positions as placeholders; ends with `<|audio_out_bos|>` of the target turn."""
    audio_input_ids: torch.Tensor
    """(A, K) delayed reference codes, one row per audio position of the prompt."""


def build_prompt(
    processor, reference_text: str, reference_codes: torch.Tensor, target_text: str, scene: str = DEFAULT_SCENE
) -> Prompt:
    """The generation prompt of a cloning request: the training sample's layout cut where the target audio begins.

    Built from `build_example` with an empty target segment, so training and generation can never disagree on the
    prompt: the prompt's tokens are exactly the first tokens of a training sample with the same texts.
    """
    empty_target = torch.zeros((reference_codes.shape[0], 0), dtype=torch.long)
    example = build_example(processor, reference_text, reference_codes, target_text, empty_target, scene)
    audio_out_bos = processor.tokenizer.convert_tokens_to_ids(processor.audio_bos_token)
    cut = int((example.input_ids == audio_out_bos).nonzero()[-1, 0]) + 1
    num_reference_positions = reference_codes.shape[1] + reference_codes.shape[0] + 1
    return Prompt(input_ids=example.input_ids[:cut], audio_input_ids=example.audio_input_ids[:num_reference_positions])


# ------------------------------------------------------------------------------------------ long texts


@dataclass
class SpokenPiece:
    """An earlier piece of a long text, as context of the pieces after it: its user turn (the text) and its
    assistant turn (the audio), in the layout of a training sample's target turns."""

    input_ids: torch.Tensor
    """(L,) tokens from the user turn's header to the `<|eot_id|>` that closes the assistant audio turn."""
    audio_input_ids: torch.Tensor
    """(T + K + 1, K) the piece's delayed codes, one row per audio position of the turn."""

    @property
    def num_positions(self) -> int:
        return int(self.input_ids.shape[0])


def _end_of_reference_turns(processor, input_ids: torch.Tensor) -> int:
    """The index just after the `<|eot_id|>` that closes the reference's assistant (audio) turn."""
    audio_out_bos = processor.tokenizer.convert_tokens_to_ids(processor.audio_bos_token)
    eot_id = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    first_audio = int((input_ids == audio_out_bos).nonzero()[0, 0])
    return first_audio + int((input_ids[first_audio:] == eot_id).nonzero()[0, 0]) + 1


def spoken_piece(processor, text: str, codes: torch.Tensor) -> SpokenPiece:
    """`text` spoken as the (K, T) codes `codes`, as turns to put before the next piece of the same long text.

    The turns are cut out of a training example whose target is this text and audio (`build_example`), so a piece
    is fed back exactly as training lays out a target: its text as a user turn, its codes in the delay pattern as
    the assistant turn. The turns after the reference do not depend on what comes before them (every text sits
    between special tokens), so the example is built around an empty reference.

    `codes` are the frames the codec decoded (`columns_to_codes`: what the listener heard), so each code sits at
    the column and codebook where the model generated it, after the BOS triangle it generated. What the model
    generated past the end of codebook 0 (codebooks still running while the EOS countdown reaches them, or a
    stream cut at `max_seconds`) is no audio and is not fed back: the EOS triangle closes the turn as in training.
    Boson AI's long-form generation likewise re-delays the codes it keeps.
    """
    empty_reference = torch.zeros((codes.shape[0], 0), dtype=torch.long)
    example = build_example(processor, "", empty_reference, text, codes, scene="")
    start = _end_of_reference_turns(processor, example.input_ids)
    return SpokenPiece(example.input_ids[start:], example.audio_input_ids[codes.shape[0] + 1 :])


def context_that_fits(prompt_positions: int, piece_positions: list[int], max_pieces: int, max_positions: int) -> int:
    """How many of the most recent earlier pieces a prompt takes as context: at most `max_pieces`, and the oldest
    dropped first until the prompt (`prompt_positions` without context, plus each piece kept) fits in
    `max_positions`. The reference is never dropped: a prompt over the budget on its own gets no context."""
    kept = min(max_pieces, len(piece_positions))
    while kept and prompt_positions + sum(piece_positions[len(piece_positions) - kept :]) > max_positions:
        kept -= 1
    return kept


def build_long_form_prompt(prompt: Prompt, processor, context: list[SpokenPiece]) -> Prompt:
    """`prompt` (a piece's `build_prompt`) with the earlier pieces `context`, oldest first, between the reference
    turns and the piece's own text: the reference stays first, as in Boson AI's long-form generation, and the
    pieces follow in the order they were spoken. No context gives `prompt` itself."""
    if not context:
        return prompt
    cut = _end_of_reference_turns(processor, prompt.input_ids)
    input_ids = torch.cat([prompt.input_ids[:cut], *(p.input_ids for p in context), prompt.input_ids[cut:]])
    audio_input_ids = torch.cat([prompt.audio_input_ids, *(p.audio_input_ids for p in context)])
    return Prompt(input_ids=input_ids, audio_input_ids=audio_input_ids)
