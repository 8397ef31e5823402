"""alpha-TIM: transductive information maximization for class-imbalanced batches."""

from __future__ import annotations

from medmeta.transductive.tim import TIMGD


class AlphaTIM(TIMGD):
    """Veilleux, Boudiaf, Piantanida & Ben Ayed, "Realistic Evaluation of Transductive Few-Shot
    Learning", NeurIPS 2021 (alpha-TIM).

    TIM-GD (Boudiaf et al. 2020) with the Shannon entropies of the query terms replaced by Tsallis
    alpha-entropies ``H_a(p) = (1 - sum_c p_c^a) / (a - 1)``; the support term stays the cross-entropy.
    Classifier weights ``W (n_way, d)``, initialised at the support class means, give the logits
    ``-temperature / 2 * ||x - w_c||^2`` and are fitted with ``n_iter`` Adam steps on::

        ce_weight * CE(support) - marginal_weight * H_a(mean_j p_j) + conditional_weight * mean_j H_a(p_j)

    Batch assumption: much weaker than TIM's. For ``alpha > 1`` the alpha-entropy of the batch's
    class proportions is flat around the uniform distribution and grows only slowly as they
    become imbalanced, so it still discourages a collapse onto one class but no longer forces equal
    class counts; the paper designs it for query batches whose proportions are drawn from a
    Dirichlet distribution. It still assumes every query case belongs to one of the ``n_way`` classes.
    Measured (``docs/transductive.md``): with 5 shots (alpha 7) it holds up on 80/10/10 batches,
    but with 1 shot (alpha 2) the marginal term still leans towards balance and relabels majority
    cases (about -10 points against the inductive baseline on an 80/10/10 batch, far less than
    TIM-GD's -18).

    Defaults follow the paper (loss weights 1, 1, 1; temperature 15; alpha tuned per shot: 2 for
    1-shot, 7 for 5-shot, and the paper's untuned 5 in between), except the optimiser budget: 50
    Adam steps at learning rate 2e-3 instead of 1000 at 1e-4 (about the same distance travelled by
    Adam, twenty times cheaper, and the same accuracy within 1 point on the synthetic benchmark).
    Gradients are computed in closed form, as in :class:`TIMGD`.

    Args:
        n_iter: Adam steps.
        lr: Adam learning rate.
        temperature: scale of the logits (15 in the paper, for L2-normalised features).
        alpha: the entropies' order (> 0); ``None`` picks it from the smallest class's shot count.
        ce_weight, marginal_weight, conditional_weight: weights of the three terms.
    """

    name = "alpha_tim"

    def __init__(
        self,
        n_iter: int = 50,
        lr: float = 2e-3,
        temperature: float = 15.0,
        alpha: float | None = None,
        ce_weight: float = 1.0,
        marginal_weight: float = 1.0,
        conditional_weight: float = 1.0,
    ):
        super().__init__(
            n_iter=n_iter,
            lr=lr,
            temperature=temperature,
            ce_weight=ce_weight,
            marginal_weight=marginal_weight,
            conditional_weight=conditional_weight,
        )
        self.alpha = alpha

    def entropy_order(self, shot: int) -> float:
        """The alpha used for a support whose smallest class has ``shot`` cases."""
        if self.alpha is not None:
            if self.alpha <= 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")
            return float(self.alpha)
        if shot <= 1:
            return 2.0
        if shot >= 5:
            return 7.0
        return 5.0
