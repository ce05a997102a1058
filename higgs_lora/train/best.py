"""Which evaluation's adapter is the best of a run: the rule, pure, and `<output_dir>/best/` that holds it.

The rule (docs/training.md, "The best adapter"): the lowest CER when `train.eval_asr` is set; a tie, or a run
without ASR, goes to the higher speaker similarity relative to the ground truth (similarity of the clips divided by
that of the real held-out recordings); a tie there (or no similarity: `train.eval_samples=0`, no `eval` extras)
goes to the lower held-out loss; a full tie keeps the earlier step. A score is compared only when both evaluations
have it. Step 0, the untrained base, is never a candidate. With a replay corpus the rule reads the Arabic (main)
held-out speakers' scores, not the replay speakers'.

Imports nothing heavy; the trainer (`higgs_lora.train.loop`) exports the adapter when `is_better` says so.
"""

from __future__ import annotations

from higgs_lora.run_folder import BEST, BEST_JSON

__all__ = ["BEST", "BEST_JSON", "RULE", "best_record", "is_better", "scores_of"]

RULE = (
    "lowest CER (train.eval_asr); ties and runs without ASR: highest speaker similarity relative to the ground "
    "truth; then lowest held-out loss; then the earlier step"
)
TIE = 1e-6
"""Scores closer than this are a tie (CER over a few clips moves in steps of ~1e-2)."""


def scores_of(metrics: dict) -> dict:
    """The scores the rule compares, from one evaluation's metrics (main held-out speakers): `cer` (when ASR ran),
    `similarity_relative` (when similarity was scored), `loss`."""
    scores: dict = {}
    if metrics.get("cer") is not None:
        scores["cer"] = float(metrics["cer"])
    similarity = metrics.get("similarity")
    if similarity is not None:
        truth = metrics.get("similarity_ground_truth")
        scores["similarity_relative"] = float(similarity) / truth if truth else float(similarity)
    if metrics.get("loss") is not None:
        scores["loss"] = float(metrics["loss"])
    return scores


def is_better(candidate: dict, incumbent: dict | None) -> bool:
    """Whether scores `candidate` beat `incumbent` by the rule (anything beats None; a full tie does not)."""
    if incumbent is None:
        return True
    for key, lower_is_better in (("cer", True), ("similarity_relative", False), ("loss", True)):
        if key in candidate and key in incumbent:
            difference = candidate[key] - incumbent[key]
            if abs(difference) > TIE:
                return difference < 0 if lower_is_better else difference > 0
    return False


def best_record(step: int, metrics: dict) -> dict:
    """What best.json holds: the step, the scores the rule compared, the rule, and the ground-truth references."""
    reference = {k: metrics[k] for k in ("similarity_ground_truth", "cer_ground_truth") if k in metrics}
    return {
        "step": step,
        "scores": scores_of(metrics),
        "rule": RULE,
        **({"ground_truth": reference} if reference else {}),
    }
