"""How many tokens to draft: the draft length that maximises the expected tokens per second.

`Speculator` (runtime/speculative.py) asks `DraftPolicy.choose` once per step. The policy knows
two things, both measured while serving:

* the cost of a step, by (decoding choices B, tokens T): the wall time of whole engine steps
  that only decode, drafting included, as a running average per (B, T). The plain step (T = B)
  is measured first (a B never seen decodes plainly once). A (B, T) not seen yet is
  interpolated between measured sizes; beyond the longest draft measured it is extrapolated
  (with one drafted size measured, optimistically: half its mean cost per drafted token, so
  that longer drafts get tried and measured); with no drafted size measured, a prior of +15%
  of a plain step per drafted token. The first step of each size is not counted (a shape's
  first call pays one-off costs), and a drafted size not measured for 256 steps is forgotten,
  so one bad measurement cannot rule it out for good;
* each choice's acceptance rate alpha: the chance that a drafted token is kept given the ones
  before it were, as a running average over its verified drafts (and, for a cheap proposer like
  n-gram lookup, over proposals it was not asked to verify: they are checked against the
  tokens that followed). A new choice starts from the mode's average.

With k tokens drafted a choice yields 1 + alpha + ... + alpha^k tokens in expectation (no more
than its proposal allows), so the policy picks the k in [0, max_length] with the best expected
tokens / cost(B, B + drafted). k = 0 is a plain step: drafting stops by itself where it does
not pay (narrow verification is slow on this model, the batch is large, the draft is poor). A
policy that has not drafted for `explore_every` steps drafts one token, so a stale
estimate cannot keep it from drafting forever (not for a cheap proposer, whose every proposal is
scored anyway).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs

_EMA = 0.25  # weight of a new measurement
_PRIOR_SLOPE = 0.15  # prior cost of one drafted token, as a fraction of a plain step
_FORGET_AFTER = 256  # decode-only steps after which an unrefreshed drafted size is forgotten


def expected_tokens(alpha: float, k: int) -> float:
    """1 + alpha + ... + alpha^k: the tokens a step yields with k drafted tokens."""
    return float(sum(alpha**i for i in range(k + 1)))


@attrs.define
class DraftPolicy:
    max_length: int = 8
    alpha_prior: float = 0.7
    explore_every: int = 32
    _cost: dict[tuple[int, int], float] = attrs.field(factory=dict)
    _alpha: dict[object, float] = attrs.field(factory=dict)
    _alpha_mode: float = attrs.field(init=False)
    _since_draft: int = 0
    _seen: set[tuple[int, int]] = attrs.field(factory=set)
    _stamp: dict[tuple[int, int], int] = attrs.field(factory=dict)  # last update, in steps
    _steps: int = 0

    def __attrs_post_init__(self) -> None:
        self._alpha_mode = self.alpha_prior

    # -- what was measured --------------------------------------------------------------------

    def observe_step(self, num_choices: int, num_tokens: int, seconds: float) -> None:
        key = (num_choices, num_tokens)
        self._steps += 1
        if key not in self._seen:  # a shape's first call pays one-off costs: not typical
            self._seen.add(key)
            return
        old = self._cost.get(key)
        self._cost[key] = seconds if old is None else old + _EMA * (seconds - old)
        self._stamp[key] = self._steps
        # A size not chosen for long is forgotten (never the plain one): a bad measurement of
        # it cannot rule it out forever, it gets estimated, and maybe tried, again.
        for stale in [k for k, t in self._stamp.items() if self._steps - t > _FORGET_AFTER]:
            if stale[0] != stale[1]:
                self._cost.pop(stale, None)
                self._stamp.pop(stale)

    def observe_draft(self, key: object, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens of which the first `accepted` held."""
        if drafted <= 0:
            return
        trials = accepted + (1 if accepted < drafted else 0)
        rate = accepted / trials
        old = self._alpha.get(key, self._alpha_mode)
        weight = min(1.0, _EMA * trials)
        self._alpha[key] = old + weight * (rate - old)
        self._alpha_mode += _EMA * 0.5 * (rate - self._alpha_mode)

    def forget(self, keep: set[object]) -> None:
        self._alpha = {k: v for k, v in self._alpha.items() if k in keep}

    def alpha(self, key: object) -> float:
        return self._alpha.get(key, self._alpha_mode)

    # -- the decision -------------------------------------------------------------------------

    def choose(
        self, keys: Sequence[object], room: Sequence[int], num_choices: int, explore: bool = True
    ) -> int:
        """The draft length for this step's drafting choices (`room`: the most each may take,
        proposal length included); 0: draft nothing. A batch size whose plain step was never
        measured gets a plain step first: every estimate is relative to it."""
        plain = self._cost.get((num_choices, num_choices))
        if plain is None:
            return 0
        best_k, best_rate = 0, num_choices / plain
        alphas = [min(self.alpha(key), 0.99) for key in keys]
        for k in range(1, min(self.max_length, max(room, default=0)) + 1):
            ks = [min(k, r) for r in room]
            gain = sum(expected_tokens(a, n) - 1 for a, n in zip(alphas, ks, strict=True))
            rate = (num_choices + gain) / self.cost(num_choices, num_choices + sum(ks))
            if rate > best_rate:
                best_k, best_rate = k, rate
        self._since_draft = 0 if best_k else self._since_draft + 1
        if best_k == 0 and explore and self._since_draft >= self.explore_every and any(room):
            self._since_draft = 0
            return 1
        return best_k

    def cost(self, num_choices: int, num_tokens: int) -> float:
        """Estimated seconds of a decode-only step of `num_choices` choices and `num_tokens`
        tokens (see the module rules); needs the plain step of that size measured."""
        b, t = num_choices, num_tokens
        plain = self._cost[(b, b)]
        if (known := self._cost.get((b, t))) is not None:
            return known
        spec = sorted((tt, c) for (bb, tt), c in self._cost.items() if bb == b and tt > b)
        if not spec:
            return plain * (1 + _PRIOR_SLOPE * (t - b))
        points = [(b, plain), *spec]
        for (t0, c0), (t1, c1) in itertools.pairwise(points):
            if t0 < t < t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        # beyond the longest draft measured: the slope of the last two drafted sizes, or (one
        # measured) half the mean cost per drafted token, an optimistic guess that gets tried
        (ta, ca), (tb, cb) = points[-2], points[-1]
        slope = (cb - ca) / (tb - ta) if len(spec) >= 2 else 0.5 * (cb - plain) / (tb - b)
        return cb + max(slope, plain * 0.01) * (t - tb)
