"""pytorch-metric-learning losses (Multi-Similarity with its miner, Proxy-Anchor, Circle, SupCon, NT-Xent) and the
cross-batch memory: values equal PML's own classes called directly, the Multi-Similarity mining rule by hand, the
memory's contents, warm-up and cap, a hand-computed batch-vs-memory loss, proxies trained / checkpointed / kept
equal under DDP (2 gloo processes), and each new criterion config training one epoch end to end."""
from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.core.paths import CONFIGS_DIR
from metriclab.models.losses import (
    CircleLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    ProxyAnchorLoss,
    SupConLoss,
    criterion_needs_balanced_batches,
)
from metriclab.models.xbm import CrossBatchMemoryLoss, PairLoss

NEW_CRITERIA = ["multi_similarity", "proxy_anchor", "circle", "supcon", "ntxent", "xbm"]


def _criterion(name, overrides=(), num_classes=4, embedding_size=6):
    cfg = OmegaConf.load(CONFIGS_DIR / "criterion" / f"{name}.yaml")
    cfg.merge_with_dotlist(list(overrides))
    return build(cfg, "criterion", num_classes=num_classes, embedding_size=embedding_size,
                 in_features=embedding_size, label2category=None)


def _batch(seed=0, n_labels=4, per_label=3, dim=6):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_labels).repeat_interleave(per_label)
    centres = torch.randn(n_labels, dim, generator=gen)
    return centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=gen), labels


def _cos(x, y=None):
    x = np.asarray(x, dtype=np.float64)
    y = x if y is None else np.asarray(y, dtype=np.float64)
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    return x @ y.T


# ------------------------------------------------------------------------------------- values equal PML's own
@pytest.mark.parametrize("name, overrides, theirs", [
    ("multi_similarity", ["miner=null"], pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)),
    ("multi_similarity", ["miner=null", "alpha=3", "beta=20", "base=0.3"],
     pml_losses.MultiSimilarityLoss(alpha=3.0, beta=20.0, base=0.3)),
    ("circle", [], pml_losses.CircleLoss(m=0.4, gamma=80.0)),
    ("circle", ["m=0.25", "gamma=32"], pml_losses.CircleLoss(m=0.25, gamma=32.0)),
    ("supcon", [], pml_losses.SupConLoss(temperature=0.1)),
    ("supcon", ["temperature=0.5"], pml_losses.SupConLoss(temperature=0.5)),
    ("ntxent", [], pml_losses.NTXentLoss(temperature=0.07)),
    ("ntxent", ["temperature=0.2"], pml_losses.NTXentLoss(temperature=0.2)),
])
def test_pair_losses_equal_pml_called_directly(name, overrides, theirs):
    ours = _criterion(name, overrides)
    assert isinstance(ours, PairLoss) and ours.miner is None and list(ours.parameters()) == []
    for seed in range(3):
        emb, labels = _batch(seed)
        value = ours(emb, labels).item()
        assert value == pytest.approx(theirs(emb, labels).item(), rel=1e-6, abs=1e-7)
        assert value > 0
        assert ours.last_logs == {"pos_pairs": 4.0 * 3 * 2, "neg_pairs": 12.0 * 9}  # every ordered pair counts


def test_config_keys_reach_pml():
    ms, circle = _criterion("multi_similarity", ["alpha=3", "miner.epsilon=0.05"]), _criterion("circle", ["m=0.3"])
    assert isinstance(ms, MultiSimilarityLoss) and (ms.loss.alpha, ms.loss.beta, ms.loss.base) == (3, 50, 0.5)
    assert isinstance(ms.miner, pml_miners.MultiSimilarityMiner) and ms.miner.epsilon == 0.05
    assert isinstance(circle, CircleLoss) and circle.loss.m == 0.3 and circle.loss.gamma == 80
    assert isinstance(_criterion("supcon"), SupConLoss) and isinstance(_criterion("ntxent"), NTXentLoss)
    for name in NEW_CRITERIA:  # pair and proxy losses work on any batch: no n x k requirement from mining
        assert not criterion_needs_balanced_batches(_criterion(name))
    with pytest.raises(ConfigError, match="unexpected keyword argument 'temprature'"):
        _criterion("supcon", ["temprature=0.2"])


def test_multi_similarity_miner_pairs_follow_the_papers_rule():
    """Positive (a, p) kept iff S_ap - eps < max negative S_an; negative (a, n) kept iff S_an + eps > min positive
    S_ap (cosine similarities, by hand); the loss is PML's on exactly those pairs."""
    criterion = _criterion("multi_similarity")
    emb, labels = _batch(seed=1)
    eps = criterion.miner.epsilon
    assert eps == 0.1
    sim, lab = _cos(emb.numpy()), labels.numpy()
    same, expected_pos, expected_neg = lab[:, None] == lab[None, :], set(), set()
    for a in range(len(lab)):
        pos = [p for p in range(len(lab)) if same[a, p] and p != a]
        neg = [n for n in range(len(lab)) if not same[a, n]]
        expected_pos |= {(a, p) for p in pos if sim[a, p] - eps < sim[a, neg].max()}
        expected_neg |= {(a, n) for n in neg if sim[a, n] + eps > sim[a, pos].min()}
    a1, p, a2, n = criterion.miner(emb, labels)
    assert set(zip(a1.tolist(), p.tolist())) == expected_pos
    assert set(zip(a2.tolist(), n.tolist())) == expected_neg
    assert 0 < len(expected_pos) < 24 and 0 < len(expected_neg) < 108  # the miner really drops pairs here

    value = criterion(emb, labels).item()
    assert criterion.last_logs == {"pos_pairs": float(len(expected_pos)), "neg_pairs": float(len(expected_neg))}
    pml = pml_losses.MultiSimilarityLoss()
    assert value == pytest.approx(pml(emb, labels, pml_miners.MultiSimilarityMiner(0.1)(emb, labels)).item(), rel=1e-6)
    assert value != pytest.approx(pml(emb, labels).item(), rel=1e-3)  # mining changes the loss


def test_pair_loss_computes_in_fp32_under_autocast():
    criterion = _criterion("multi_similarity")
    emb, labels = _batch(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = criterion(emb.bfloat16(), labels)
    assert value.dtype == torch.float32 and value.item() == criterion(emb.bfloat16().float(), labels).item()


# ------------------------------------------------------------------------------------------------- Proxy-Anchor
def test_proxy_anchor_equals_pml_on_the_same_proxies():
    ours = _criterion("proxy_anchor", ["margin=0.2", "alpha=16"], num_classes=5, embedding_size=6)
    assert isinstance(ours, ProxyAnchorLoss)
    theirs = pml_losses.ProxyAnchorLoss(num_classes=5, embedding_size=6, margin=0.2, alpha=16)
    assert tuple(ours.loss.proxies.shape) == (5, 6) and isinstance(ours.loss.proxies, torch.nn.Parameter)
    theirs.proxies.data.copy_(ours.loss.proxies.data)
    emb, labels = _batch(seed=3, n_labels=4)  # class 4 has no image in the batch: only its negative term counts
    assert ours(emb, labels).item() == pytest.approx(theirs(emb, labels).item(), rel=1e-6)
    nearest = _cos(emb.numpy(), ours.loss.proxies.detach().numpy()).argmax(axis=1)
    assert ours.last_logs["accuracy"] == pytest.approx(float((nearest == labels.numpy()).mean()))
    with pytest.raises(ValueError, match="labels must be in 0..4"):
        ours(emb, labels + 3)


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 6)
        self.feat_dim = 6

    def forward(self, x):
        return self.fc(x)


def test_proxies_are_module_parameters_trained_and_checkpointed(tmp_path):
    import pytorch_lightning as pl

    from metriclab.training.module import MetricLearningModule

    torch.manual_seed(0)
    criterion = ProxyAnchorLoss(num_classes=3, embedding_size=6)
    module = MetricLearningModule(_Embed(), criterion, functools.partial(torch.optim.SGD, lr=0.01),
                                  group_lrs={"criterion": 1.0})
    proxies = criterion.loss.proxies
    assert any(p is proxies for p in module.parameters()) and "criterion.loss.proxies" in module.state_dict()
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert groups["criterion"]["lr"] == 1.0 and groups["criterion"]["params"] == [proxies]
    before = proxies.detach().clone()
    data = [{"input_tensors": torch.randn(8), "labels": torch.tensor(i % 3)} for i in range(12)]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=6))
    assert not torch.allclose(proxies.detach(), before)  # the optimizer moved them
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    saved = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(saved["criterion.loss.proxies"], proxies.detach())
    fresh = MetricLearningModule(_Embed(), ProxyAnchorLoss(num_classes=3, embedding_size=6), torch.optim.SGD)
    assert not torch.equal(fresh.criterion.loss.proxies, proxies.detach())
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.criterion.loss.proxies, proxies.detach())


# --------------------------------------------------------------------------------------------- cross-batch memory
def _xbm(memory_size=10, warmup_iterations=0, miner=False, embedding_size=6):
    inner = MultiSimilarityLoss(miner=pml_miners.MultiSimilarityMiner(0.1) if miner else None)
    return CrossBatchMemoryLoss(inner, embedding_size=embedding_size, memory_size=memory_size,
                                warmup_iterations=warmup_iterations)


def test_memory_fills_first_in_first_out_up_to_its_size():
    xbm = _xbm(memory_size=10)
    batches = [_batch(seed, n_labels=2, per_label=2) for seed in range(3)]  # 4 rows each
    for i, (emb, labels) in enumerate(batches[:2]):
        xbm(emb, labels)
        assert xbm.n_filled == 4 * (i + 1) and xbm.last_logs["memory_rows"] == 4.0 * (i + 1)
    assert torch.equal(xbm.memory[:8], torch.cat([batches[0][0], batches[1][0]]))
    assert torch.equal(xbm.memory_labels[:8], torch.cat([batches[0][1], batches[1][1]]))
    xbm(*batches[2])  # 4 more rows into a memory of 10: rows 8, 9, then the oldest rows 0, 1
    assert xbm.n_filled == 10 and tuple(xbm.memory.shape) == (10, 6) and xbm.next_row == 2
    assert torch.equal(xbm.memory[[8, 9, 0, 1]], batches[2][0])
    assert torch.equal(xbm.memory[2:4], batches[0][0][2:]) and torch.equal(xbm.memory[4:8], batches[1][0])
    assert not xbm.memory.requires_grad
    with pytest.raises(ValueError, match="does not fit criterion.memory_size=10"):
        xbm(*_batch(0, n_labels=4, per_label=3))


def _ms_by_hand(emb, labels, ref, ref_labels, self_rows, alpha=2.0, beta=50.0, base=0.5):
    """Multi-Similarity of each batch row against every reference row except itself, mean over the batch."""
    sim, total = _cos(emb, ref), 0.0
    for i in range(len(emb)):
        others = np.arange(len(ref)) != self_rows[i]
        pos = (ref_labels == labels[i]) & others
        neg = ref_labels != labels[i]
        total += np.log1p(np.exp(-alpha * (sim[i, pos] - base)).sum()) / alpha
        total += np.log1p(np.exp(beta * (sim[i, neg] - base)).sum()) / beta
    return total / len(emb)


def _angles(*degrees):
    """Unit 2-D embeddings at these angles (cosine similarity = cos of the angle between them)."""
    rad = np.radians(degrees)
    return torch.tensor(np.stack([np.cos(rad), np.sin(rad)], axis=1), dtype=torch.float32)


def test_loss_with_memory_is_the_pair_loss_of_the_batch_against_batch_and_memory_by_hand():
    """Memory of 6 rows; batch 1 (3 rows) fills rows 0-2, batch 2 rows 3-5: batch 2's loss is its pairs with the 6
    rows (batch 1 and itself), its own self-pairs left out."""
    xbm = _xbm(memory_size=6, embedding_size=2)
    e1, l1 = _angles(0, 70, 140), torch.tensor([0, 1, 2])
    e2, l2 = _angles(20, 45, 100), torch.tensor([0, 0, 2])  # two positives in the batch, one with the memory only
    first = xbm(e1, l1).item()  # 3 labels once each: negatives only, all far apart (a loss ~1e-5, float32's)
    assert first == pytest.approx(_ms_by_hand(e1.numpy(), l1.numpy(), e1.numpy(), l1.numpy(), [0, 1, 2]), abs=1e-8)
    assert xbm.last_logs["pos_pairs"] == 0.0 and xbm.last_logs["neg_pairs"] == 6.0
    value = xbm(e2, l2).item()
    ref, ref_labels = torch.cat([e1, e2]).numpy(), torch.cat([l1, l2]).numpy()
    expected = _ms_by_hand(e2.numpy(), l2.numpy(), ref, ref_labels, self_rows=[3, 4, 5])
    assert value == pytest.approx(expected, rel=1e-5)
    assert value != pytest.approx(_ms_by_hand(e2.numpy(), l2.numpy(), e2.numpy(), l2.numpy(), [0, 1, 2]), rel=1e-3)
    assert xbm.last_logs["pos_pairs"] == 2 + 2 + 1  # (0,1), (1,0) in the batch; rows 0,1 and 2 with the memory


@pytest.mark.parametrize("miner", [False, True])
def test_xbm_equals_pml_cross_batch_memory_call_after_call(miner):
    ours = _xbm(memory_size=16, miner=miner)
    theirs = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), embedding_size=6, memory_size=16,
                                         miner=pml_miners.MultiSimilarityMiner(0.1) if miner else None)
    for seed in range(7):  # 6-row batches into 16 rows: the memory wraps around twice
        emb, labels = _batch(seed, n_labels=3, per_label=2)
        assert ours(emb, labels).item() == pytest.approx(theirs(emb, labels).item(), rel=1e-5, abs=1e-7), seed
    assert torch.equal(ours.memory, theirs.embedding_memory)


def test_warmup_iterations_use_no_memory_and_survive_a_checkpoint():
    xbm = _xbm(memory_size=32, warmup_iterations=2)
    plain = MultiSimilarityLoss()
    batches = [_batch(seed) for seed in range(4)]
    for emb, labels in batches[:2]:  # warm-up: the plain batch loss, nothing stored
        assert xbm(emb, labels).item() == plain(emb, labels).item()
        assert xbm.n_filled == 0 and xbm.last_logs["memory_rows"] == 0.0 and not xbm.memory.any()
    value = xbm(*batches[2])  # the memory starts with this batch alone: the same pairs as the plain loss
    assert xbm.n_filled == 12 and value.item() == pytest.approx(plain(*batches[2]).item(), rel=1e-6)
    assert xbm(*batches[3]).item() != pytest.approx(plain(*batches[3]).item(), rel=1e-3)
    assert xbm.n_filled == 24 and int(xbm.iteration) == 4
    # the counter is checkpointed, the memory is not (nor a buffer DDP would broadcast from rank 0)
    state = xbm.state_dict()
    assert list(state) == ["iteration"] and [n for n, _ in xbm.named_buffers()] == ["iteration"]
    resumed = _xbm(memory_size=32, warmup_iterations=2)
    resumed.load_state_dict(state)
    resumed(*batches[0])
    assert resumed.n_filled == 12  # past its warm-up already: the memory starts at once


def test_xbm_config_and_its_errors():
    xbm = _criterion("xbm", ["memory_size=64", "warmup_iterations=5"], embedding_size=6)
    assert isinstance(xbm, CrossBatchMemoryLoss) and (xbm.memory_size, xbm.warmup_iterations) == (64, 5)
    assert isinstance(xbm.loss, MultiSimilarityLoss) and isinstance(xbm.loss.miner, pml_miners.MultiSimilarityMiner)
    assert tuple(xbm.memory.shape) == (64, 6)  # embedding_size reached it at build time
    cfg = OmegaConf.load(CONFIGS_DIR / "criterion" / "xbm.yaml")
    cfg.loss = {"_target_": "metriclab.models.losses.CircleLoss", "m": 0.25}  # any pair loss inside
    around_circle = build(cfg, "criterion", embedding_size=6)
    assert isinstance(around_circle.loss, CircleLoss) and around_circle.loss.loss.m == 0.25
    with pytest.raises(TypeError, match="must be a pair loss"):
        CrossBatchMemoryLoss(ProxyAnchorLoss(num_classes=3, embedding_size=6), embedding_size=6)
    with pytest.raises(ValueError, match="memory_size must be >= 1"):
        _xbm(memory_size=0)


# ------------------------------------------------------------------------------------------- DDP (2 gloo ranks)
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.extractor = torch.nn.Linear(8, 6)
        self.proxy = ProxyAnchorLoss(num_classes=4, embedding_size=6)
        self.xbm = _xbm(memory_size=32)

    def forward(self, x, labels):
        emb = self.extractor(x)
        return self.proxy(emb, labels) + self.xbm(emb, labels), emb


def _ddp_worker(rank, world_size, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    torch.manual_seed(rank)  # different initial weights per rank: DDP must make them equal
    net = torch.nn.parallel.DistributedDataParallel(_Net())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    embedded = []
    for _ in range(2):
        x, labels = torch.randn(8, 8, generator=gen), torch.arange(4).repeat(2)
        loss, emb = net(x, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        embedded.append(emb.detach())
    inner = net.module
    torch.save({"proxies": inner.proxy.loss.proxies.detach(), "memory": inner.xbm.memory[: inner.xbm.n_filled],
                "own": torch.cat(embedded), "iteration": int(inner.xbm.iteration)}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_keeps_proxies_equal_and_each_process_its_own_memory(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules (spawn would re-import this file: seconds per process);
    # a child that hangs fails the test instead of the suite
    context = mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2 DDP processes did not finish within 60 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["proxies"], r1["proxies"])  # broadcast at wrap, then the same averaged gradients
    torch.manual_seed(0)
    assert not torch.allclose(r0["proxies"], _Net().proxy.loss.proxies.detach())  # and trained
    for r in (r0, r1):  # per-process memory: exactly this process's two batches, in order
        assert r["iteration"] == 2 and torch.equal(r["memory"], r["own"])
    assert not torch.allclose(r0["memory"], r1["memory"])


# ---------------------------------------------------------------------------------------- one epoch end to end
@pytest.mark.parametrize("name", NEW_CRITERIA)
def test_new_criterion_config_trains_one_epoch(tmp_path, tiny_dataset, name):
    from metriclab.jobs.train import train
    from tests.helpers import compose_cfg, fast_overrides

    overrides = fast_overrides(tmp_path, tiny_dataset) + [f"criterion={name}", "trainer=cpu", "sampler.n_labels=2",
                                                          "sampler.n_instances=3", "num_workers=0"]
    if name == "xbm":
        overrides += ["criterion.warmup_iterations=1", "criterion.memory_size=12"]  # 2 batches: one with memory
    result = train(compose_cfg("train", overrides))
    assert 0.0 < result["metrics"]["mAP"] <= 1.0 and result["metrics"]["n_queries"] == 18
    state = torch.load(result["last_ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    criterion_keys = sorted(k for k in state if k.startswith("criterion."))
    if name == "proxy_anchor":  # 4 train labels, resnet18's 512-d embeddings
        assert criterion_keys == ["criterion.loss.proxies"] and tuple(state[criterion_keys[0]].shape) == (4, 512)
    elif name == "xbm":  # 4 train labels, 2 per batch: 2 batches in the epoch, both counted
        assert criterion_keys == ["criterion.iteration"] and int(state["criterion.iteration"]) == 2
    else:
        assert criterion_keys == []
