"""When a run has diverged: a result (`status: diverged`), not an error.

After each optimizer step (`after_step`):
  - a non-finite loss or gradient norm;
  - the smoothed train loss (EMA with weight `diverge_ema` on the past) above
    `diverge_loss_ratio` times its best value, once past `warmup_tokens` (the best is only
    tracked from then on: the first steps' loss falls too fast to be a reference).

After each evaluation (`after_eval`):
  - a non-finite validation loss;
  - a validation loss above `diverge_loss_ratio` times the smaller of the best validation
    loss so far and log(vocab size), the loss of a uniform guess. With the default ratio 2
    and a 2048-token vocabulary that is a perplexity above both the square of the run's best
    and 2048^2 ~ 4.2e6: a model that is confidently wrong, far worse than guessing, which a
    healthy run never is (its validation loss starts at about log V and falls: every
    evaluation of the demo, also at lr=0.3, and of the tests' tiny runs is below log V).
    Measured on the validation set it also catches what the smoothed train loss misses: a
    blow-up the EMA still averages away (`train.lr=0.3` on the tests' tiny model: validation
    perplexity 4.1e6 at its first evaluation, step 4, while the train-loss EMA is 1.05x its
    best). The rule needs no warmup: its reference is never above the uniform-guess loss,
    which an initialized model matches.
"""
from __future__ import annotations

import math
from typing import Optional

from .state import LoopState, Outcome


class DivergenceCheck:
    def __init__(self, *, ratio: float, ema: float, warmup_tokens: int, vocab_size: int):
        self.ratio, self.ema, self.warmup_tokens = ratio, ema, warmup_tokens
        self.uniform_loss = math.log(vocab_size)

    @classmethod
    def from_config(cls, train_cfg, vocab_size: int) -> "DivergenceCheck":
        return cls(ratio=train_cfg.diverge_loss_ratio, ema=train_cfg.diverge_ema,
                   warmup_tokens=train_cfg.warmup_tokens, vocab_size=vocab_size)

    def _diverged(self, loop: LoopState, reason: str) -> Outcome:
        return Outcome("diverged", diverged_at_tokens=loop.tokens, diverged_reason=reason)

    def after_step(self, loop: LoopState, loss: float, grad_norm: float) -> Optional[Outcome]:
        """Update the loss EMA in `loop` (it is checkpointed) and apply the train-loss rules."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            return self._diverged(loop, f"non-finite {what} at step {loop.step}")
        a = self.ema
        loop.loss_ema = loss if loop.loss_ema is None else a * loop.loss_ema + (1 - a) * loss
        if loop.tokens > self.warmup_tokens:
            loop.best_loss_ema = min(loop.best_loss_ema, loop.loss_ema)
            if loop.loss_ema > self.ratio * loop.best_loss_ema:
                return self._diverged(loop, f"smoothed train loss {loop.loss_ema:.3f} > "
                                      f"{self.ratio} x best {loop.best_loss_ema:.3f}")
        return None

    def after_eval(self, loop: LoopState, val_loss: float) -> Optional[Outcome]:
        """The validation rules; call before the evaluation is entered in `loop` (best_ppl)."""
        if not math.isfinite(val_loss):
            return self._diverged(loop, "non-finite validation loss")
        best = math.log(loop.best_ppl)  # inf before the first evaluation
        reference = min(best, self.uniform_loss)
        if val_loss > self.ratio * reference:
            which = "best" if best < self.uniform_loss else "uniform-guess"
            return self._diverged(loop, f"validation loss {val_loss:.3f} (ppl "
                                  f"{math.exp(min(val_loss, 700.0)):.3g}) > {self.ratio} x "
                                  f"{which} loss {reference:.3f} at step {loop.step}")
        return None
