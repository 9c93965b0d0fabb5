"""evaluate_classification / extract_features give the same answer on 2 gloo ranks as on 1."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.evaluate import features as evaluate
from pretrain.evaluate import metrics

NUM_CLASSES = 5
DIM = 6


class TinyProbeModel(torch.nn.Module):
    """Smallest module with the ViT's evaluation interface (forward_features / forward_head)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(3, DIM, generator=g))
        self.head = torch.nn.Parameter(torch.randn(DIM, NUM_CLASSES, generator=g))

    def forward_features(self, x):  # (B, 3, H, W) -> (B, 1, D)
        return (x.mean(dim=(2, 3)) @ self.embed).unsqueeze(1)

    def forward_head(self, tokens, pre_logits=False):
        rep = torch.tanh(tokens[:, 0])
        return rep if pre_logits else rep @ self.head


def _split(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _rank_loader(images, targets, rank, world, batch=4):
    """Round-robin share for `rank`, padded to the same number of batches on every rank."""
    idx = list(range(rank, len(targets), world))
    per_rank = -(-len(targets) // world)
    n_batches = -(-per_rank // batch)
    idx += [0] * (n_batches * batch - len(idx))  # padding rows, masked out below
    valid = torch.zeros(len(idx), dtype=torch.bool)
    valid[: len(range(rank, len(targets), world))] = True
    for b in range(n_batches):
        s = slice(b * batch, (b + 1) * batch)
        yield images[idx[s]], targets[idx[s]], valid[s]


def _expected():
    images, targets = _split()
    model = TinyProbeModel()
    with torch.no_grad():
        logits = model.forward_head(model.forward_features(images))
    return logits, targets


def test_single_process_top_k_matches_direct_computation():
    images, targets = _split()
    logits, _ = _expected()
    res = evaluate.evaluate_classification(TinyProbeModel(), _rank_loader(images, targets, 0, 1), ks=(1, 3))
    direct = metrics.topk_correct(logits, targets, (1, 3))
    assert res == {"samples": 37, "top1": direct[1] / 37, "top3": direct[3] / 37}


def test_multi_label_reports_map():
    images, _ = _split()
    g = torch.Generator().manual_seed(1)
    multi = (torch.rand(37, NUM_CLASSES, generator=g) < 0.4).float()
    logits, _ = _expected()
    res = evaluate.evaluate_classification(TinyProbeModel(), _rank_loader(images, multi, 0, 1), multi_label=True)
    assert res["mAP"] == pytest.approx(metrics.mean_average_precision(logits.numpy(), multi.numpy()))


def test_model_mode_restored():
    images, targets = _split()
    model = TinyProbeModel().train()
    evaluate.extract_features(model, _rank_loader(images, targets, 0, 1))
    assert model.training


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, targets = _split()
        model = TinyProbeModel()
        res = evaluate.evaluate_classification(model, _rank_loader(images, targets, rank, world), ks=(1, 3))
        feats = evaluate.extract_features(model, _rank_loader(images, targets, rank, world))
        res2, feats2 = evaluate.evaluate_and_extract(model, _rank_loader(images, targets, rank, world), ks=(1, 3))
        assert res2 == res and torch.equal(feats2.representation, feats.representation)
        out[rank] = (res, feats.logits, feats.targets)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_count_every_sample_once():
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        # fork: under pytest's importlib mode a spawned child could not re-import this file
        mp.start_processes(_worker, args=(world, _free_port(), out), nprocs=world, start_method="fork")
        results = dict(out)
    logits, targets = _expected()
    direct = metrics.topk_correct(logits, targets, (1, 3))
    for rank in range(world):
        res, glogits, gtargets = results[rank]
        assert res == {"samples": 37, "top1": direct[1] / 37, "top3": direct[3] / 37}
        # gathered in rank order: rank 0's rows (0, 2, 4, ...) then rank 1's (1, 3, ...)
        order = list(range(0, 37, 2)) + list(range(1, 37, 2))
        assert torch.equal(gtargets, targets[order])
        np.testing.assert_allclose(glogits.numpy(), logits[order].numpy(), rtol=1e-6, atol=1e-6)


def test_scores_from_gathered_features_equal_the_counting_path():
    images, _ = _split()
    g = torch.Generator().manual_seed(2)
    multi = (torch.rand(37, NUM_CLASSES, generator=g) < 0.4).float()
    model = TinyProbeModel()
    counted = evaluate.evaluate_classification(model, _rank_loader(images, multi, 0, 1), multi_label=True)
    feats = evaluate.extract_features(model, _rank_loader(images, multi, 0, 1))
    assert evaluate.classification_from_features(feats, multi_label=True) == pytest.approx(counted)


def test_evaluate_and_extract_is_one_pass_of_both():
    images, targets = _split()
    model = TinyProbeModel()
    results, feats = evaluate.evaluate_and_extract(model, _rank_loader(images, targets, 0, 1), ks=(1, 3))
    assert results == evaluate.evaluate_classification(model, _rank_loader(images, targets, 0, 1), ks=(1, 3))
    full = evaluate.extract_features(model, _rank_loader(images, targets, 0, 1))
    assert feats.logits is None and torch.equal(feats.targets, full.targets)
    assert torch.equal(feats.representation, full.representation)
