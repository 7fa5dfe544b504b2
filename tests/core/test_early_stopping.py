"""Early stopping: patience, the best state kept, one vector tracker as G scalar ones, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

from pipeline.core.early_stopping import EarlyStopping

NAN = math.nan


def _stop_epoch(losses, patience):
    """How many epochs run before the tracker says stop (all of them if it never does)."""
    stopping = EarlyStopping(patience)
    for loss in losses:
        stopping.step(loss)
        if stopping.should_stop:
            break
    return stopping.epochs


@pytest.mark.parametrize(
    ("losses", "patience", "epochs"),
    [
        ([5, 4, 3, 3.5, 3.2, 3.1, 2], 3, 6),  # best at index 2, then three worse epochs
        ([5, 4, 3, 3.5, 3.2, 3.1, 2], 4, 7),  # patience not used up: every epoch runs
        ([5, 4, 3, 3.5, 2, 3.3, 3.4], 2, 7),  # an improvement starts the count again
        ([5, 5, 5, 5], 2, 3),  # an equal loss is no improvement
        ([5, 4, 6, 1], 1, 3),
        ([5, 4, 6, 1], 0, 3),  # 0: stop at the first epoch without improvement, as 1 does
        ([5, 4, 3, 2], 0, 4),
        ([NAN, NAN, NAN, NAN], 2, 2),  # a NaN loss never improves: counted from the start
        ([3, NAN, NAN, 1], 2, 3),
    ],
)
def test_patience_counts_epochs_without_a_better_loss(losses, patience, epochs):
    assert _stop_epoch(losses, patience) == epochs


def test_no_epoch_no_stop_and_nothing_kept():
    stopping = EarlyStopping(patience=0)
    assert not stopping.should_stop
    assert stopping.best_loss is None and stopping.best_epoch is None
    assert stopping.best_state is None


def test_the_best_epochs_state_is_kept_as_a_copy_and_restores_a_module():
    module = torch.nn.Linear(3, 2)
    stopping = EarlyStopping(patience=5, keep_on="cpu")
    snapshots = []
    for loss in [3.0, 1.0, 2.0, 4.0]:
        with torch.no_grad():  # training moves the weights in place between epochs
            module.weight.add_(1.0)
        snapshots.append({k: v.clone() for k, v in module.state_dict().items()})
        improved = stopping.step(loss, module.state_dict())
        assert improved.dtype == torch.bool and improved.shape == ()
    assert (int(stopping.best_epoch), float(stopping.best_loss)) == (1, 1.0)
    assert stopping.best_loss.dtype == torch.float64  # a float keeps its digits
    module.load_state_dict(stopping.best_state)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in snapshots[1].items())


def test_no_state_is_kept_while_nothing_improves():
    stopping = EarlyStopping(patience=2)
    stopping.step(NAN, {"w": torch.ones(2)})
    assert stopping.best_state is None and int(stopping.best_epoch) == -1


def _random_run(n_epochs=12, n_models=5, seed=0):
    """Losses with ties, NaNs and a model that never improves, and a state that changes."""
    g = torch.Generator().manual_seed(seed)
    losses = torch.randint(0, 6, (n_epochs, n_models), generator=g).float()  # many ties
    losses[torch.rand(n_epochs, n_models, generator=g) < 0.15] = NAN
    losses[:, 3] = NAN  # never improves
    states = [{"W": torch.randn(n_models, 4, 3, generator=g),
               "correct": torch.randint(0, 100, (n_models,), generator=g)}
              for _ in range(n_epochs)]
    return losses, states


@pytest.mark.parametrize("patience", [0, 1, 3, 50])
def test_a_vector_tracks_like_independent_scalar_trackers(patience):
    losses, states = _random_run()
    vector = EarlyStopping(patience)
    scalars = [EarlyStopping(patience) for _ in range(losses.shape[1])]
    for loss, state in zip(losses, states):
        improved = vector.step(loss, state)
        for g, scalar in enumerate(scalars):
            rows = {k: v[g] for k, v in state.items()}
            assert bool(scalar.step(float(loss[g]), rows)) == bool(improved[g])
        # the grid stops once every one of its models would have stopped alone
        assert vector.should_stop == all(s.should_stop for s in scalars)
        for g, scalar in enumerate(scalars):
            assert int(vector.best_epoch[g]) == int(scalar.best_epoch)
            assert float(vector.best_loss[g]) == float(scalar.best_loss)
            for key, kept in vector.best_state.items():
                expected = (torch.zeros_like(kept[g]) if scalar.best_state is None
                            else scalar.best_state[key])
                assert torch.equal(kept[g], expected)
    assert vector.best_loss.dtype == losses.dtype  # a tensor keeps its dtype (and device)
    assert int(vector.best_epoch[3]) == -1 and math.isinf(vector.best_loss[3])


def _run(stopping, losses, states):
    stopped_at = None
    for epoch, (loss, state) in enumerate(zip(losses, states)):
        if stopping.should_stop:
            stopped_at = epoch
            break
        stopping.step(loss, state)
    return stopped_at


def _through_a_checkpoint(state_dict):
    buffer = io.BytesIO()
    torch.save({"best": state_dict}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["best"]


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_a_resumed_tracker_stops_where_an_uninterrupted_one_does(vector):
    losses, states = _random_run(n_epochs=20, seed=1)
    if not vector:
        losses = [float(row[0]) for row in losses]
        states = [{k: v[0] for k, v in state.items()} for state in states]
    whole = EarlyStopping(patience=3)
    stopped_at = _run(whole, losses, states)
    assert stopped_at is not None  # the run exercises the stop
    first = EarlyStopping(patience=3)
    _run(first, losses[:4], states[:4])
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(_through_a_checkpoint(first.state_dict()))
    resumed_at = _run(resumed, losses[4:], states[4:])
    assert resumed_at is not None and 4 + resumed_at == stopped_at
    assert resumed.epochs == whole.epochs
    assert torch.equal(resumed.best_epoch, whole.best_epoch)
    assert torch.equal(resumed.best_loss, whole.best_loss)
    assert all(torch.equal(resumed.best_state[k], v) for k, v in whole.best_state.items())
