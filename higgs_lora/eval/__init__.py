"""Evaluation of cloned speech: speaker similarity, Arabic intelligibility (CER/WER), quality (DNSMOS) and speed.

`python -m higgs_lora.evaluate --pred out/` is the face (higgs_lora/eval/cli.py); the work lives here, one concern
per module, heavy libraries imported only inside the functions that need them (resemblyzer pulls in librosa and
numba, speechmos pulls in onnxruntime, the ASR pulls in transformers), so `import higgs_lora.eval` stays cheap:

    text.py         scoring normalisation and CER/WER counts (jiwer)
    speaker.py      resemblyzer speaker embeddings and cosine similarity
    quality.py      DNSMOS (speechmos, 16 kHz), silence ratio, clipping, speaking rate
    asr.py          a local Whisper or CTC checkpoint, loaded offline, for the transcripts CER/WER need
    predictions.py  reading an inference output folder (manifest.jsonl, errors.jsonl, run.json)
    scoring.py      per-sample metrics, summaries, --compare deltas, and score_generated() for training
    plots.py        inline SVG plots (no plotting library)
    report.py       metrics.json, samples.csv, report.html

Everything runs offline: resemblyzer's weights and speechmos's ONNX models ship inside their wheels, and the ASR
is a directory the user provides. See docs/evaluation.md.
"""
