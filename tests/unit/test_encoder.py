"""The encoder's forward paths, its config checks, and the training loop on a tiny log."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.data import EncodedLog, Features, Interactions, ItemVocab, leave_one_out
from serving.encoder import EncoderConfig, Past, SequenceEncoder, collate
from serving.train import (
    TrainConfig,
    fit,
    iterate_batches,
    resolve_device,
    softmax_loss,
    train_encoder,
    training_sequences,
)

torch.set_num_threads(1)


def feats(items: list[int]) -> Features:
    n = len(items)
    return Features(
        np.array(items, dtype=np.int64),
        np.full(n, 2, dtype=np.int64),
        np.arange(1, n + 1, dtype=np.int64),
    )


def small_model(**kw: object) -> SequenceEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(num_items=20, dim=16, heads=2, max_len=8, **kw)  # type: ignore[arg-type]
    return SequenceEncoder(cfg).eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_items": 0}, "num_items >= 1"),
        ({"num_items": 5, "dim": 10, "heads": 3}, "dim divisible by heads"),
        ({"num_items": 5, "max_len": 0}, "max_len >= 1"),
    ],
)
def test_config_rejects(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**kwargs)  # type: ignore[arg-type]


def test_config_round_trip_and_unknown_keys() -> None:
    cfg = EncoderConfig(num_items=7, dim=32)
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="extra \\['colour'\\]"):
        EncoderConfig.from_dict(cfg.to_dict() | {"colour": 1})


def test_collate_left_pads() -> None:
    batch = collate([feats([3, 4]), feats([5])])
    assert batch.items.tolist() == [[3, 4], [0, 5]]
    assert batch.gaps.tolist() == [[1, 2], [0, 1]]
    assert collate([feats([1])], length=3).items.tolist() == [[0, 0, 1]]


def test_last_only_forward_matches_full_forward() -> None:
    model = small_model()
    batch = collate([feats([1, 2, 3, 4, 5]), feats([6, 7]), feats([9])])
    with torch.no_grad():
        torch.testing.assert_close(model.user_vectors(batch), model.hidden(batch)[:, -1])


def test_padding_length_does_not_change_user_vectors() -> None:
    model = small_model()
    seqs = [feats([1, 2, 3]), feats([4])]
    with torch.no_grad():
        short = model.user_vectors(collate(seqs))
        long = model.user_vectors(collate(seqs, length=8))
    torch.testing.assert_close(short, long)


def test_causal_future_does_not_leak() -> None:
    model = small_model()
    with torch.no_grad():
        a = model.hidden(collate([feats([1, 2, 3])]))[:, 1]
        b = model.hidden(collate([feats([1, 2, 9])]))[:, 1]
    torch.testing.assert_close(a, b)


def test_longer_than_max_len_rejected() -> None:
    with pytest.raises(ValueError, match="at most max_len=8, got 9"):
        small_model().hidden(collate([feats(list(range(1, 10)))]))


def test_without_types_and_time() -> None:
    model = small_model(use_types=False, use_time=False)
    assert model.type_emb is None
    assert model.gap_emb is None
    assert model.user_vectors(collate([feats([1, 2])])).shape == (1, 16)


def test_batches_mask_targets_under_padding(tiny_log: Interactions) -> None:
    split = leave_one_out(tiny_log)
    log = EncodedLog(tiny_log, ItemVocab(tiny_log.item_ids()))
    seqs = training_sequences(split, log, max_len=5)
    assert all(2 <= len(s) <= 6 for s in seqs)
    rng = np.random.default_rng(0)
    seen = 0
    for inputs, targets in iterate_batches(seqs, 7, rng):
        assert ((targets > 0) == (inputs.items > 0)).all()
        seen += int((targets > 0).sum())
    assert seen == sum(len(s) - 1 for s in seqs)


@pytest.mark.parametrize("negatives", [0, 8])
def test_softmax_losses_are_finite(negatives: int) -> None:
    model = small_model().train()
    inputs = collate([feats([1, 2, 3]), feats([4])])
    targets = torch.tensor([[2, 3, 4], [0, 0, 5]])
    loss = softmax_loss(model, inputs, targets, negatives)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.item_emb.weight.grad is not None


def test_training_learns_tiny_walk(tiny_log: Interactions) -> None:
    split = leave_one_out(tiny_log)
    cfg = EncoderConfig(
        num_items=len(tiny_log.item_ids()),
        dim=16,
        heads=1,
        max_len=8,
        dropout=0.0,
        attn_dropout=0.0,
    )
    result, vocab, _ = train_encoder(
        split, cfg, TrainConfig(epochs=20, batch_size=16, lr=1e-2, patience=20, progress=False)
    )
    assert len(vocab) == 30
    assert result.best_valid is not None
    assert result.best_valid.metrics["HR@5"] > 0.3  # random: ~5/30
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_fit_argument_errors(tiny_log: Interactions) -> None:
    split = leave_one_out(tiny_log)
    log = EncodedLog(tiny_log, ItemVocab(tiny_log.item_ids()))
    model = small_model()
    with pytest.raises(ValueError, match="epochs >= 1, got 0"):
        fit(model, lambda *_: torch.zeros(()), split, log, TrainConfig(epochs=0), max_len=8)
    short = Interactions("one-step", (tiny_log.users[0].__class__("u", ("i1",), ("view",), None),))
    with pytest.raises(ValueError, match="at least 2 training steps"):
        fit(
            model,
            lambda *_: torch.zeros(()),
            leave_one_out(short),
            EncodedLog(short, ItemVocab(["i1"])),
            TrainConfig(epochs=1),
            max_len=8,
        )


def test_train_encoder_checks_catalog_size(tiny_log: Interactions) -> None:
    with pytest.raises(ValueError, match="catalog size 30, got 5"):
        train_encoder(leave_one_out(tiny_log), EncoderConfig(num_items=5), TrainConfig(epochs=1))


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="CUDA is absent"):
        resolve_device("cuda")


def test_time_budget_stops_after_one_epoch(tiny_log: Interactions) -> None:
    split = leave_one_out(tiny_log)
    cfg = EncoderConfig(num_items=len(tiny_log.item_ids()), dim=8, heads=1, max_len=6)
    result, _, _ = train_encoder(
        split, cfg, TrainConfig(epochs=50, eval_every=10, max_minutes=0.0, progress=False)
    )
    assert result.epochs_run == 1
    assert result.best_valid is not None  # the last epoch is always evaluated


@pytest.mark.parametrize("positions", ["oldest", "newest"])
def test_every_prefix_state_equals_encoding_that_prefix(positions: str) -> None:
    """With positions from the oldest step, the training forward at step t is what serving
    computes for the prefix ending at t; with positions from the newest it is not."""
    model = small_model(positions=positions)
    seq = [1, 2, 3, 4, 5]
    with torch.no_grad():
        states = model.hidden(collate([feats(seq)]))[0]
        prefixes = torch.cat([model.user_vectors(collate([feats(seq[: t + 1])])) for t in range(5)])
    if positions == "oldest":
        torch.testing.assert_close(states, prefixes)
    else:
        assert not torch.allclose(states[:-1], prefixes[:-1])


def _past(kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], items: torch.Tensor) -> Past:
    return Past(kv, items > 0)


def test_extend_matches_full_re_encode() -> None:
    """Cached encoding, one or several steps at a time, for users of different lengths in one
    batch (left padding in the past and in the new steps), equals the full forward."""
    model = small_model()
    full = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15]]
    cut = [4, 1, 2]  # steps already cached per user
    old = collate([feats(s[:c]) for s, c in zip(full, cut, strict=True)])
    new_feats = []
    for s, c in zip(full, cut, strict=True):
        f = feats(s)
        new_feats.append(Features(f.items[c:], f.types[c:], f.gaps[c:]))
    with torch.no_grad():
        _, kv = model.extend(old, None)
        got, new_kv = model.extend(collate(new_feats), _past(kv, old.items))
        want = model.user_vectors(collate([feats(s) for s in full]))
    torch.testing.assert_close(got, want)
    # The new steps' keys/values, appended, extend the cache one more step exactly too.
    items = torch.cat([old.items, collate(new_feats).items], dim=1)
    joined = tuple(
        (torch.cat([a[0], b[0]], dim=2), torch.cat([a[1], b[1]], dim=2))
        for a, b in zip(kv, new_kv, strict=True)
    )
    longer = [feats([*s, 16 + b]) for b, s in enumerate(full)]
    step = collate([Features(f.items[-1:], f.types[-1:], f.gaps[-1:]) for f in longer])
    with torch.no_grad():
        got2, _ = model.extend(step, _past(joined, items))
        want2 = model.user_vectors(collate(longer))
    torch.testing.assert_close(got2, want2)


def test_extend_refuses_newest_positions_and_full_windows() -> None:
    newest = small_model(positions="newest")
    first = collate([feats([1, 2])])
    with torch.no_grad():
        _, kv = newest.extend(first, None)
        with pytest.raises(ValueError, match="positions='oldest' for cached encoding"):
            newest.extend(collate([feats([3])]), _past(kv, first.items))
        model = small_model()
        window = collate([feats(list(range(1, 9)))])  # max_len = 8 steps
        _, kv = model.extend(window, None)
        with pytest.raises(ValueError, match="at most max_len=8 steps, got 9"):
            model.extend(collate([feats([9])]), _past(kv, window.items))


def test_config_rejects_unknown_positions() -> None:
    with pytest.raises(ValueError, match="positions in"):
        EncoderConfig(num_items=3, positions="middle")
