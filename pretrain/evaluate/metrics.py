"""Evaluation metrics: top-k, mean average precision, ImageNet ReaL, few-shot and linear probes.

Counting metrics (`topk_correct`, `real_correct`) return exact integer counts rather than
fractions, so ranks can all-reduce them and divide once: an average of per-rank
accuracies would weight ranks with padding wrongly.

The few-shot evaluation is the paper's (section 4.1, big_vision's `fewshot_lsr`): frozen
features, standardised, a constant bias feature appended, then closed-form L2-regularised
least squares onto {-1, 1} one-hot targets, solved once per shot count in float64.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Few-shot: big_vision appends a constant feature this large so the bias is almost
# unregularised (its weight needs to be only 1/100 of the bias it represents).
BIAS_CONSTANT = 100.0
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REG = 2.0**10


# --------------------------------------------------------------------------- top-k / ReaL
def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Count samples whose target is among the k highest logits, for each k.

    `targets` is (B,) class indices, or (B, K) multi-hot: then a prediction is right when
    any of its top k classes is a positive (the ReaL rule applied to multi-label data).
    k larger than the number of classes is clipped (every sample is then correct).
    """
    num_classes = logits.shape[1]
    top = logits.topk(min(max(ks), num_classes), dim=1).indices  # (B, kmax)
    if targets.dim() == 1:
        hits = top == targets.view(-1, 1)  # (B, kmax)
    else:
        hits = targets.gather(1, top) > 0.5  # (B, kmax)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def real_correct(predictions: Sequence[int], real_labels: Sequence[Sequence[int]]) -> tuple[int, int]:
    """ImageNet ReaL (Beyer et al. 2020): (correct, counted) over images with real labels.

    An image whose real label list is empty has no reliable label and is left out; a
    prediction is right when it is any one of the image's real labels.
    """
    if len(predictions) != len(real_labels):
        raise ValueError(f"{len(predictions)} predictions but {len(real_labels)} label sets")
    correct = counted = 0
    for pred, labels in zip(predictions, real_labels):
        if len(labels) == 0:
            continue
        counted += 1
        correct += int(int(pred) in labels)
    return correct, counted


# --------------------------------------------------------------------------- mAP
def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision-recall step curve for one class (sklearn's definition).

    Samples with equal scores form one threshold, so the result does not depend on the
    order of ties. Returns nan for a class without positives.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives).astype(bool)
    if not positives.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order]
    # Last index of each run of equal scores: one point of the curve per distinct score.
    cut = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(positives)[cut]
    precision = tp / (cut + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes of average precision; classes without a positive are left out.

    `scores` (N, K); `targets` (N, K) multi-hot, or (N,) class indices.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if targets.ndim == 1:
        targets = np.eye(scores.shape[1], dtype=bool)[targets]
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    if not aps:
        raise ValueError("mean average precision: no class has a positive sample")
    return float(np.mean(aps))


# --------------------------------------------------------------------------- few-shot
def select_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Indices of `shots` examples per class, drawn without replacement by `seed`.

    A class with fewer examples contributes all it has (small demo splits); a class with
    none contributes nothing. Sorted, so the result does not depend on class order.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if members.size:
            chosen.append(rng.choice(members, size=min(shots, members.size), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


class LeastSquaresClassifier:
    """Regularised least squares onto {-1, 1} one-hot targets, for any number of l2 values.

    One eigendecomposition of the Gram matrix (features x features or samples x samples,
    whichever is smaller) serves every regularisation strength: for l2 > 0,
    (X^T X + l2 I)^-1 = Q diag(1 / (eigs + l2)) Q^T.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int):
        x = np.asarray(features, dtype=np.float64)
        self.mean = x.mean(axis=0, keepdims=True)
        self.std = x.std(axis=0, keepdims=True) + 1e-5
        x = self._design(x)
        y = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0  # (N, C) in {-1, 1}
        n, d = x.shape
        if n >= d:  # primal: w = Q (eigs + l2)^-1 Q^T X^T y
            self.eigs, q = np.linalg.eigh(x.T @ x)
            self.lhs, self.rhs = q, q.T @ (x.T @ y)
        else:  # dual: w = X^T Q (eigs + l2)^-1 Q^T y
            self.eigs, q = np.linalg.eigh(x @ x.T)
            self.lhs, self.rhs = x.T @ q, q.T @ y

    def _design(self, x: np.ndarray) -> np.ndarray:
        x = (np.asarray(x, dtype=np.float64) - self.mean) / self.std
        return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)

    def weights(self, l2_reg: float) -> np.ndarray:
        """(D + 1, C) weights; the last row multiplies the bias feature."""
        return (self.lhs / (self.eigs + l2_reg)[None, :]) @ self.rhs

    def scores(self, features: np.ndarray, l2_reg: float) -> np.ndarray:
        return self._design(features) @ self.weights(l2_reg)


def fewshot_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    shots: Sequence[int] = DEFAULT_SHOTS,
    l2_reg: float = DEFAULT_L2_REG,
    seed: int = 0,
) -> dict[int, float]:
    """Few-shot linear accuracy on the test set for each shot count (the paper's probe)."""
    test_labels = np.asarray(test_labels)
    results = {}
    for n in shots:
        idx = select_shots(train_labels, n, num_classes, seed=seed)
        clf = LeastSquaresClassifier(np.asarray(train_features)[idx], np.asarray(train_labels)[idx], num_classes)
        pred = clf.scores(test_features, l2_reg).argmax(axis=1)
        results[int(n)] = float(np.mean(pred == test_labels))
    return results


# --------------------------------------------------------------------------- linear probe
def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
) -> torch.nn.Linear:
    """Multinomial logistic regression on frozen, standardised features (full-batch L-BFGS).

    The problem is convex, so L-BFGS on the whole set reaches the optimum without the
    learning-rate search an SGD probe needs. The returned layer folds the standardisation
    in, so it applies to raw features.
    """
    x = train_features.double()
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-5
    x = (x - mean) / std
    y = train_labels.long()
    layer = torch.nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(
        layer.parameters(),
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold (x - mean) / std into the layer
        folded = torch.nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
        folded.weight.copy_(layer.weight / std)
        folded.bias.copy_(layer.bias - (layer.weight * (mean / std)).sum(1))
    return folded.requires_grad_(False)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
) -> float:
    layer = linear_probe(train_features, train_labels, num_classes, weight_decay=weight_decay)
    pred = layer(test_features.double()).argmax(1)
    return float((pred == test_labels.long()).double().mean())
