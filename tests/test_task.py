"""Banks, the DR-Tune objective and its reference equivalence, gradients, the frozen encoder, baselines."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from drtune.bank import FeatureBank
from drtune.calibration import procrustes_rotation_matrix, semantic_calibrate
from drtune.config import Config, DRTuneConfig, load_config
from drtune.objectives import bss_penalty, concatenated_cross_entropy, dr_tune_loss
from drtune.task import FineTuneTask
from drtune.train import build_optimizer


def test_bank_fifo_order_and_wrap_around() -> None:
    bank = FeatureBank(size=5, dim=2)
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    bank.enqueue(rows, rows, torch.tensor([0, 1, 2]))
    assert not bank.full and int(bank.ptr) == 3
    more = torch.tensor([[0.0, 4.0], [5.0, 0.0], [0.0, 6.0]])
    bank.enqueue(more, more, torch.tensor([3, 4, 5]))  # 3 rows into 2 free slots: wraps to slot 0
    assert bank.full and int(bank.ptr) == 1
    assert bank.labels.tolist() == [5, 1, 2, 3, 4]
    assert torch.allclose(bank.pre[0], torch.tensor([0.0, 1.0]))  # stored normalised
    assert torch.allclose(bank.down.norm(dim=1), torch.ones(5))
    big = torch.randn(12, 2)
    bank.enqueue(big, big, torch.arange(12))  # larger than the bank: its last 5 rows survive
    assert sorted(bank.labels.tolist()) == [7, 8, 9, 10, 11]


def _config(method: str = "drtune", **kw) -> Config:
    """A resolved config; keyword arguments go to the ``drtune`` or ``baselines`` section by name."""
    drtune = {"queue_size": 24, **{k: v for k, v in kw.items() if k in DRTuneConfig.model_fields}}
    baselines = {k: v for k, v in kw.items() if k not in DRTuneConfig.model_fields}
    return Config(train={"method": method}, drtune=drtune, baselines=baselines).resolved()


def _task(encoder, method: str = "drtune", **kw) -> FineTuneTask:
    return FineTuneTask(encoder, num_classes=3, config=_config(method, **kw))


def _frozen_sgd(task: FineTuneTask) -> torch.optim.Optimizer:
    """An optimiser that changes nothing: a step's loss can then be compared with the next one's."""
    return torch.optim.SGD(task.parameters(), lr=0.0)


def _loader(n: int = 10, batch: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.arange(n) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True, generator=gen)


def test_warm_up_fills_bank_when_dataset_is_smaller_than_k(tiny_encoder) -> None:
    task = _task(tiny_encoder, queue_size=24)
    batches = task.warm_up(_loader(n=10, batch=4), torch.device("cpu"))  # 2 batches (8 rows) per pass, K = 24
    assert task.bank.full and batches == 6  # three passes; the reference would stop after one
    assert torch.allclose(task.bank.pre, task.bank.down)  # both banks start from pretrained features
    assert torch.allclose(task.bank.pre.norm(dim=1), torch.ones(24))


def test_dr_loss_equals_concatenated_cross_entropy_scaled() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, bank_logits = torch.randn(8, 5, generator=gen), torch.randn(40, 5, generator=gen)
    y, yb = torch.randint(0, 5, (8,), generator=gen), torch.randint(0, 5, (40,), generator=gen)
    lam = 40 / 8
    ours, _, _ = dr_tune_loss(logits, y, bank_logits, yb, lam)
    assert torch.allclose(ours / (1 + lam), concatenated_cross_entropy(logits, y, bank_logits, yb), atol=1e-6)


def test_reference_preset_takes_the_authors_step(tiny_encoder) -> None:
    """Two SGD-Nesterov steps of our Eq. 14 with the reference preset equal the authors' concatenated-CE steps."""
    k, b = 24, 4
    config = load_config(
        None,
        [
            "drtune.preset=reference",
            f"drtune.queue_size={k}",
            f"train.batch_size={b}",
            "train.lr_backbone=0.05",
            "train.weight_decay=0.001",
        ],
    )
    resolved = config.resolved()
    assert resolved.drtune.lam == pytest.approx(k / b)
    assert resolved.resolved() == resolved  # resolving is idempotent: the preset is applied once
    task = FineTuneTask(tiny_encoder, 3, resolved)
    task.warm_up(_loader(), torch.device("cpu"))
    ref_task = copy.deepcopy(task)
    opt, _ = build_optimizer(task, resolved)
    # The authors: backbone lr r, head lr r (1 + K/B), weight decay wd, loss = concatenated CE.
    r, wd = 0.05, 0.001
    ref_opt = torch.optim.SGD(
        [
            {"params": ref_task.model.encoder.parameters(), "lr": r},
            {"params": ref_task.model.head.parameters(), "lr": r * (1 + k / b)},
        ],
        lr=r,
        momentum=0.9,
        nesterov=True,
        weight_decay=wd,
    )
    x, y = next(iter(_loader()))
    for _ in range(2):
        task.train()
        task.train_step(opt, x, y)
        ref_task.train()
        features, logits = ref_task.model(x, return_features=True)
        calibrated = ref_task.calibrated_bank(features)
        loss = concatenated_cross_entropy(logits, y, ref_task.model.head(calibrated), ref_task.bank.labels)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        with torch.no_grad():  # the authors enqueue after the update too
            ref_task.bank.enqueue(ref_task.frozen(x), features, y)
        ref_task.steps += 1
    for (name, p), q in zip(task.model.named_parameters(), ref_task.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name
    moved = sum(
        (p - q).abs().sum() for p, q in zip(task.model.encoder.parameters(), task.frozen.parameters(), strict=True)
    )
    assert moved > 1e-3  # the step did something


def test_dr_gradient_reaches_only_the_head(tiny_encoder) -> None:
    task = _task(tiny_encoder)
    task.warm_up(_loader(), torch.device("cpu"))
    task.train()
    x, y = next(iter(_loader()))
    features, logits = task.model(x, return_features=True)
    calibrated = task.calibrated_bank(features)
    reg = F.cross_entropy(task.model.head(calibrated), task.bank.labels)
    reg.backward()
    assert task.model.head.weight.grad is not None and task.model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.model.encoder.parameters())


def test_frozen_encoder_never_changes(tiny_encoder) -> None:
    task = _task(tiny_encoder)
    task.warm_up(_loader(), torch.device("cpu"))
    before = copy.deepcopy(task.frozen.state_dict())  # includes BN running stats
    opt = torch.optim.SGD(task.model.parameters(), lr=0.5)
    task.train()
    assert not task.frozen.training
    for x, y in _loader():
        task.train_step(opt, x, y)
    after = task.frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in task.frozen.parameters())
    assert not torch.equal(task.model.encoder.conv.weight, task.frozen.conv.weight)


def test_step_enqueues_after_the_update(tiny_encoder) -> None:
    task = _task(tiny_encoder, queue_size=8)
    task.warm_up(_loader(), torch.device("cpu"))
    ptr = int(task.bank.ptr)
    x, y = next(iter(_loader()))
    task.train()
    before = copy.deepcopy(task)  # the bank as it was before this batch
    features, logits = before.model(x, return_features=True)
    expected = before.spec.loss(before, features, logits, y)[0].item()
    assert task.train_step(_frozen_sgd(task), x, y)["loss"] == pytest.approx(expected, rel=1e-6)
    assert int(task.bank.ptr) == (ptr + 4) % 8
    assert task.bank.labels[ptr : ptr + 4].tolist() == y.tolist()


def test_linear_probe_trains_only_the_head(tiny_encoder) -> None:
    task = _task(tiny_encoder, method="linear_probe")
    backbone, head = task.param_groups()
    assert backbone == [] and len(head) == 2
    task.train()
    assert not task.model.encoder.training  # BN statistics stay the pretrained ones


def test_l2sp_is_zero_at_start_and_grows(tiny_encoder) -> None:
    task = _task(tiny_encoder, method="l2sp", l2sp_alpha=1.0, l2sp_beta=0.0)
    x, y = next(iter(_loader()))
    task.train()
    opt = _frozen_sgd(task)
    assert task.train_step(opt, x, y)["reg"] == pytest.approx(0.0)
    with torch.no_grad():
        task.model.encoder.conv.weight.add_(0.1)
    expected = 0.5 * (0.1**2) * task.model.encoder.conv.weight.numel()
    assert task.train_step(opt, x, y)["reg"] == pytest.approx(expected, rel=1e-4)


def test_bss_penalises_the_smallest_singular_value() -> None:
    f = torch.diag(torch.tensor([3.0, 2.0, 0.5]))
    assert bss_penalty(f, eta=2.0, k=1).item() == pytest.approx(2.0 * 0.25)
    assert bss_penalty(f, eta=1.0, k=2).item() == pytest.approx(4.0 + 0.25)


def test_reused_rotation_is_recomputed_on_schedule(tiny_encoder) -> None:
    task = _task(tiny_encoder, queue_size=8, rotation_every=3, rotation_between="reuse")
    task.warm_up(_loader(), torch.device("cpu"))
    task.train()
    seen, opt = [], _frozen_sgd(task)
    for i, (x, y) in enumerate([next(iter(_loader()))] * 4):
        with torch.no_grad():
            task.model.encoder.proj.weight.add_(0.2 * (i + 1))  # the downstream encoder drifts
        task.train_step(opt, x, y)
        seen.append(task.rotation.clone())
    assert bool(task.has_rotation)
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])  # reused between recomputations
    assert not torch.equal(seen[2], seen[3])  # step 3: recomputed from the drifted bank
    assert torch.allclose(seen[3] @ seen[3].T, torch.eye(16), atol=1e-5)
    assert "rotation" in task.state_dict()


OVERLAPPED = dict(rotation_between="reuse", rotation_timing="overlapped")
_SKEW = 0.3 * torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
TURN = torch.linalg.matrix_exp(_SKEW - _SKEW.T)  # a rotation of the tiny encoder's 16 features


def _turn_features(*tasks: FineTuneTask) -> None:
    """Turn each task's downstream features by ``TURN``: from step to step the banks drift apart by a rotation,
    so a step that applies a stale rotation, or none, shows it in its loss."""
    for task in tasks:
        proj = task.model.encoder.proj
        with torch.no_grad():
            proj.weight.copy_(TURN @ proj.weight)
            proj.bias.copy_(TURN @ proj.bias)


@pytest.mark.parametrize("every", [1, 2])
def test_overlapped_rotation_is_the_synchronous_one_a_step_late(tiny_encoder, every: int) -> None:
    """``rotation_timing: overlapped`` as it runs on the CPU: a step applies the Procrustes rotation of the banks SC
    saw at the last earlier step that recomputed it (none before the first: translation only). The reference
    below writes that out with the public functions. K = 24 > D = 16, so each rotation is unique."""
    task = _task(tiny_encoder, rotation_every=every, **OVERLAPPED)
    task.warm_up(_loader(), torch.device("cpu"))
    ref, now = copy.deepcopy(task), _task(copy.deepcopy(tiny_encoder), rotation_every=every, rotation_between="reuse")
    now.load_state_dict(task.state_dict())
    opts = [torch.optim.SGD(t.model.parameters(), lr=0.2) for t in (task, ref, now)]
    for t in (task, ref, now):
        t.train()
    batches = [batch for _ in range(2) for batch in _loader(n=12)]  # 6 steps
    rotation, losses, now_losses = None, [], []
    for step, (x, y) in enumerate(batches):
        _turn_features(task, ref, now)
        losses.append(task.train_step(opts[0], x, y)["loss"])
        now_losses.append(now.train_step(opts[2], x, y)["loss"])
        features, logits = ref.model(x, return_features=True)
        bank, head = ref.bank, ref.model.head
        scale = features.detach().norm(dim=1).mean()
        calibrated = semantic_calibrate(
            bank.pre,
            bank.down,
            bank.labels,
            head.weight.detach(),
            scale,
            rotate=rotation is not None,
            rotation=rotation,
            normalized=True,
        )
        computed = procrustes_rotation_matrix(bank.pre, bank.down) if step % every == 0 else rotation
        loss, _, _ = dr_tune_loss(logits, y, head(calibrated), bank.labels, ref.config.drtune.lam)
        opts[1].zero_grad()
        loss.backward()
        opts[1].step()
        with torch.no_grad():
            bank.enqueue(ref.frozen(x), features, y)
        rotation = computed
        assert losses[-1] == pytest.approx(loss.item(), rel=1e-6), step
    for (name, p), q in zip(task.model.named_parameters(), ref.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name
    assert torch.allclose(task.rotation, rotation, atol=1e-6)
    # The delay is seen: the synchronous schedule (each rotation applied at the step that computes it) differs by
    # more than ten times the tolerance above.
    assert now_losses != pytest.approx(losses, rel=1e-5)


def test_a_resumed_overlapped_run_applies_the_rotation_its_checkpoint_holds(tiny_encoder) -> None:
    """The rotation computed at the last step before a checkpoint, which only the next step applies, is in the
    state_dict: a task restored from it takes the uninterrupted run's steps (without it, the next step differs)."""
    full = _task(tiny_encoder, rotation_every=1, **OVERLAPPED)
    full.warm_up(_loader(), torch.device("cpu"))
    cut = copy.deepcopy(full)
    batches = list(_loader(n=16))  # 4 steps; SGD without momentum: the optimiser has no state to restore

    def steps(task: FineTuneTask, batches: list) -> list[float]:
        task.train()
        opt = torch.optim.SGD(task.model.parameters(), lr=0.2)
        losses = []
        for x, y in batches:
            _turn_features(task)
            losses.append(task.train_step(opt, x, y)["loss"])
        return losses

    expected = steps(full, batches)
    steps(cut, batches[:2])
    state = cut.state_dict()
    assert bool(state["has_rotation"])
    losses = {}
    for name, stored in (("stored", state), ("dropped", {**state, "has_rotation": torch.tensor(False)})):
        resumed = _task(copy.deepcopy(tiny_encoder), rotation_every=1, **OVERLAPPED)
        resumed.load_state_dict(stored)
        losses[name] = steps(resumed, batches[2:])
    assert losses["stored"] == pytest.approx(expected[2:], rel=1e-6)
    assert losses["dropped"] != pytest.approx(expected[2:], rel=1e-5)


def test_cached_features_replace_the_frozen_forward_pass(tiny_encoder) -> None:
    task = _task(tiny_encoder, queue_size=8, pretrained_features="cached")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, 8, 8, generator=gen), torch.arange(10) % 3
    plain = DataLoader(TensorDataset(x, y, torch.arange(10)), batch_size=4)
    assert task.cache_pretrained_features(plain, torch.device("cpu")) == 10
    with torch.no_grad():
        assert torch.allclose(task.feature_cache, task.frozen(x), atol=1e-6)
    calls = []
    task.frozen.register_forward_hook(lambda *_: calls.append(1))
    shuffled = DataLoader(
        TensorDataset(x, y, torch.arange(10)), batch_size=4, shuffle=True, drop_last=True, generator=gen
    )
    task.warm_up(shuffled, torch.device("cpu"))
    index = torch.tensor([7, 2, 5, 0])
    augmented = x[index] + 0.1 * torch.randn(4, 3, 8, 8, generator=gen)
    ptr = int(task.bank.ptr)
    task.train_step(_frozen_sgd(task), augmented, y[index], index)
    assert calls == []  # neither warm-up nor the step ran the frozen encoder
    written = (ptr + torch.arange(4)) % 8
    assert torch.allclose(task.bank.pre[written], F.normalize(task.feature_cache[index], dim=1))  # un-augmented z_p
    with pytest.raises(RuntimeError, match="index"):
        task.train_step(_frozen_sgd(task), augmented, y[index])


SCHEDULES = [
    dict(rotation_every=1),
    dict(rotation_every=10),
    dict(rotation_every=3, rotation_between="reuse"),
    dict(rotation_every=1, rotation_between="reuse", rotation_timing="overlapped"),
    dict(rotation_every=0),
    dict(sc=False),
    dict(pretrained_features="cached"),
]


@pytest.mark.parametrize(
    "method,kw", [("drtune", s) for s in SCHEDULES] + [(m, {}) for m in ("ce", "linear_probe", "l2sp", "bss")]
)
@pytest.mark.parametrize("autocast_by", ["task", "caller"])
def test_bf16_step_is_finite_and_close_to_float32(tiny_encoder, method, kw, autocast_by) -> None:
    """A bf16 step (autocast on the CPU has the CUDA dtype rules: no bf16 SVD, det or QR) runs for every
    method and rotation schedule, whether the task or its caller turns autocast on, and its losses
    stay within 3 % of the float32 step's: bf16 keeps 8 significant bits (relative rounding 2⁻⁸ ≈ 0.4 %
    per operation), and only the encoders' forward passes run in it; the calibration and the DR term are float32."""
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.arange(6) % 3
    index = torch.arange(6)
    losses = {}
    for amp in (False, True):
        task = _task(copy.deepcopy(tiny_encoder), method, queue_size=12, **kw)
        loader = DataLoader(TensorDataset(x, y, index), batch_size=6)
        if task.cached_features:
            task.cache_pretrained_features(loader, torch.device("cpu"))
        task.warm_up(loader, torch.device("cpu"))
        task.train()
        opt = _frozen_sgd(task)
        steps = []
        for _ in range(3):  # covers a rotation step and the steps between
            if autocast_by == "caller":
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    steps.append(task.train_step(opt, x, y, index))
            else:
                steps.append(task.train_step(opt, x, y, index, amp=amp))
        if task.bank is not None:
            assert task.bank.pre.dtype == task.bank.down.dtype == torch.float32
        losses[amp] = steps
    for full, half in zip(losses[False], losses[True], strict=True):
        for key in ("loss", "ce", "reg"):
            assert torch.isfinite(torch.tensor(half[key]))
            assert half[key] == pytest.approx(full[key], rel=3e-2, abs=1e-4), key


@pytest.mark.parametrize(
    "schedule,rotated",
    [("global", [0, 2, 4, 6, 8]), ("epoch", [0, 2, 3, 5, 6, 8])],  # epoch: batches 0 and 2 of each epoch
)
def test_rotation_schedule_counts_global_steps_or_batches_within_the_epoch(
    tiny_encoder, monkeypatch, schedule: str, rotated: list[int]
) -> None:
    """3 steps per epoch, ``rotation_every`` 2: the reference code rotates at batch indices 0 and 2 of every
    epoch; the global schedule every other step of the run."""
    import drtune.task

    calls = []
    real = drtune.task.semantic_calibrate
    monkeypatch.setattr(
        drtune.task, "semantic_calibrate", lambda *a, **kw: calls.append(kw["rotate"]) or real(*a, **kw)
    )
    task = _task(tiny_encoder, rotation_every=2, rotation_schedule=schedule)
    loader = _loader(n=12, batch=4)  # 3 batches per epoch
    task.warm_up(loader, torch.device("cpu"))
    task.train()
    opt = _frozen_sgd(task)
    for _ in range(3):
        task.start_epoch()
        for x, y in loader:
            task.train_step(opt, x, y)
    assert [step for step, rotate in enumerate(calls) if rotate] == rotated


def test_the_reference_preset_takes_the_authors_rotation_schedule() -> None:
    config = Config(drtune={"preset": "reference"})
    assert config.drtune.rotation_schedule == "global"  # the default: ours
    assert config.resolved().drtune.rotation_schedule == "epoch"
    assert config.preset_changes()["drtune.rotation_schedule"] == ("global", "epoch")
    assert Config().preset_changes() == {}  # no preset: nothing changes
