"""Evaluation metrics against their definitions and independent references."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from pretrain.evaluate import metrics


def test_topk_counts_single_label():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.5],  # top1=1, top2={1,3}
            [0.8, 0.1, 0.05, 0.0],  # top1=0, top2={0,1}
            [0.2, 0.3, 0.4, 0.1],
        ]
    )  # top1=2, top2={2,1}
    targets = torch.tensor([1, 1, 0])
    assert metrics.topk_correct(logits, targets, ks=(1, 2, 4)) == {1: 1, 2: 2, 4: 3}


def test_topk_multi_hot_counts_any_positive():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.9, 0.1, 0.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert metrics.topk_correct(logits, targets, ks=(1, 2)) == {1: 1, 2: 1}


def test_topk_k_larger_than_classes_is_clipped():
    logits = torch.randn(5, 3)
    assert metrics.topk_correct(logits, torch.tensor([0, 1, 2, 0, 1]), ks=(5,)) == {5: 5}


def test_real_accuracy_hand_made():
    # image 0: no real labels -> left out even though the prediction "matches" nothing;
    # image 1: prediction in its label set; image 2: the original label was 3, real set {4, 5}.
    predictions = [7, 2, 3, 5]
    real = [[], [1, 2], [4, 5], [5]]
    assert metrics.real_correct(predictions, real) == (2, 3)


def test_real_accuracy_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metrics.real_correct([1, 2], [[1]])


def test_mean_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(200, 6)).astype(float)  # many ties
    targets = rng.random((200, 6)) < 0.3
    targets[:, 5] = False  # a class without positives is left out
    expected = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(5)])
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(expected, abs=1e-12)


def test_average_precision_hand_made():
    # ranks of positives 1 and 3 -> (1/1 + 2/3) / 2
    assert metrics.average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)


def _reference_lsr_scores(train_x, train_y, test_x, num_classes, l2):
    """The textbook closed form, float64, no eigendecomposition: w = (X^T X + l2 I)^-1 X^T Y."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    design = lambda x: np.hstack([(x - mean) / std, np.full((len(x), 1), metrics.BIAS_CONSTANT)])
    x = design(train_x)
    y = 2.0 * np.eye(num_classes)[train_y] - 1.0
    w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ y)
    return design(test_x) @ w


@pytest.mark.parametrize("n_train,dim", [(40, 16), (10, 64)])  # primal and dual branches
@pytest.mark.parametrize("l2", [2.0**-3, 2.0**10])
def test_fewshot_lsr_equals_closed_form_reference(n_train, dim, l2):
    rng = np.random.default_rng(n_train * dim)
    num_classes = 5
    train_x = rng.normal(size=(n_train, dim)).astype(np.float32) * 3 + 1
    train_y = rng.integers(0, num_classes, n_train)
    test_x = rng.normal(size=(30, dim)).astype(np.float32)
    clf = metrics.LeastSquaresClassifier(train_x, train_y, num_classes)
    ours = clf.scores(test_x, l2)
    ref = _reference_lsr_scores(train_x.astype(np.float64), train_y, test_x.astype(np.float64), num_classes, l2)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * max(1.0, np.abs(ref).max()))
    assert np.abs(ours - ref).max() < 1e-6


def test_select_shots_is_seeded_and_per_class():
    labels = np.repeat(np.arange(4), 30)
    a = metrics.select_shots(labels, 5, 4, seed=1)
    assert len(a) == 20 and all((labels[a] == c).sum() == 5 for c in range(4))
    assert np.array_equal(a, metrics.select_shots(labels, 5, 4, seed=1))
    assert not np.array_equal(a, metrics.select_shots(labels, 5, 4, seed=2))


def test_select_shots_small_class_gives_all_it_has():
    labels = np.array([0, 0, 0, 1])
    assert sorted(labels[metrics.select_shots(labels, 2, 3, seed=0)].tolist()) == [0, 0, 1]


def test_fewshot_accuracy_rises_with_shots_on_separable_features():
    rng = np.random.default_rng(3)
    num_classes, dim = 10, 32
    centres = rng.normal(size=(num_classes, dim)) * 2

    def sample(n):
        y = rng.integers(0, num_classes, n)
        return centres[y] + rng.normal(size=(n, dim)), y

    (tx, ty), (vx, vy) = sample(2000), sample(500)
    acc = metrics.fewshot_accuracy(tx, ty, vx, vy, num_classes, shots=(1, 25), l2_reg=1.0)
    assert set(acc) == {1, 25}
    assert acc[25] > 0.95 and acc[25] >= acc[1]


def test_linear_probe_matches_sklearn_logistic_regression():
    rng = np.random.default_rng(5)
    num_classes, dim = 4, 8
    x = rng.normal(size=(300, dim))
    y = (x[:, :num_classes] + 0.7 * rng.normal(size=(300, num_classes))).argmax(1)
    xt = torch.from_numpy(x)
    wd = 1e-2
    layer = metrics.linear_probe(xt, torch.from_numpy(y), num_classes, weight_decay=wd)
    # sklearn's objective: 0.5 ||W||^2 + C * sum(CE); ours: mean(CE) + 0.5 wd ||W||^2 -> C = 1 / (wd N)
    xs = (x - x.mean(0)) / (x.std(0) + 1e-5)
    ref = LogisticRegression(C=1.0 / (wd * len(x)), tol=1e-10, max_iter=5000).fit(xs, y)
    ours = layer(xt).numpy()
    theirs = ref.decision_function(xs)
    # multinomial logits are defined up to a per-sample constant: compare centred logits
    ours -= ours.mean(1, keepdims=True)
    theirs -= theirs.mean(1, keepdims=True)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    acc = metrics.linear_probe_accuracy(xt, torch.from_numpy(y), xt, torch.from_numpy(y), num_classes, wd)
    assert acc == pytest.approx(float((ref.predict(xs) == y).mean()), abs=0.01)
