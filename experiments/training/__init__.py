"""Training: tokens to a validation-perplexity target, resumable and exact.

What is measured is *tokens to target*: the number of training tokens after which the
validation perplexity first falls to `train.target_ppl`, interpolated between evaluations
(evaluate.py). The learning-rate schedule depends only on tokens seen and `max_tokens`
(step.py).

Statuses: `reached`; `not_reached` (max_tokens spent); `diverged` (divergence.py: a
non-finite loss, gradient or validation loss, the smoothed train loss rising past
`diverge_loss_ratio` times its best, or the validation loss past `diverge_loss_ratio` times
the smaller of its best and the uniform guess's); `completed` (no target was set: a
calibration run). All are results, not errors.

Resume: a checkpoint (checkpoint.py) holds model, optimizer, step, data position, every RNG
state and the quantization state; on the CPU a resumed run's metrics equal an uninterrupted
run's exactly. It is written every `checkpoint_every_steps`; at the end of training only with
`train.keep_final_checkpoint` (the runner deletes it once the summary is written, unless so).

Parts: loop.py (`train`, `Trainer`: the wiring), setup.py, step.py, evaluate.py,
divergence.py, checkpoint.py, metrics.py, state.py.
"""
from .checkpoint import delete_checkpoint, load_checkpoint, save_checkpoint
from .divergence import DivergenceCheck
from .evaluate import evaluate, interpolate_crossing, perplexity, record_evaluation
from .loop import Trainer, train
from .setup import make_optimizer, setup_training
from .state import LoopState, Outcome
from .step import StepResult, TrainStep, advance_clock, lr_at

__all__ = [
    "DivergenceCheck", "LoopState", "Outcome", "StepResult", "TrainStep", "Trainer",
    "advance_clock", "delete_checkpoint", "evaluate", "interpolate_crossing", "load_checkpoint",
    "lr_at", "make_optimizer", "perplexity", "record_evaluation", "save_checkpoint",
    "setup_training", "train",
]
