"""The live evaluation's pure parts: what it scores, what it records, how `peer status` prints it."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from peer.daemon.evaluator import Evaluator
from peer.daemon.metrics import Counters
from peer.tools.status import evaluation_text


def _evaluator(classification: bool, max_samples: int) -> tuple[Evaluator, torch.nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(100, 4)
    y = torch.randint(0, 3, (100,)) if classification else torch.randn(100, 3)
    loss = torch.nn.functional.cross_entropy if classification else torch.nn.functional.mse_loss
    ev = Evaluator(
        model,
        TensorDataset(x, y),
        loss=loss,
        classification=classification,
        counters=Counters(),
        max_samples=max_samples,
    )
    return ev, model, TensorDataset(x, y)


def test_scores_the_first_max_samples_of_the_test_set_on_a_copy() -> None:
    ev, model, data = _evaluator(classification=True, max_samples=40)
    ev.counters.step = 7
    before = [p.detach().clone() for p in model.parameters()]
    step, acc, loss = ev.evaluate()
    x, y = data.tensors
    with torch.no_grad():
        out = model(x[:40])
    assert step == 7 and ev.samples == 40
    assert acc == int((out.argmax(1) == y[:40]).sum()) / 40
    assert math.isclose(loss, torch.nn.functional.cross_entropy(out, y[:40]).item(), rel_tol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # the model is untouched
    ev.record(step, acc, loss)
    snap = ev.counters.snapshot()
    assert (snap["eval_step"], snap["eval_accuracy"], snap["eval_samples"]) == (7, acc, 40)


def test_a_regression_task_reports_loss_only() -> None:
    ev, _, _ = _evaluator(classification=False, max_samples=1000)
    step, acc, loss = ev.evaluate()
    ev.record(step, acc, loss)
    assert ev.samples == 100 and math.isnan(ev.counters.eval_accuracy) and loss > 0
    info = {"eval.step": "3", "eval.accuracy": "nan", "eval.loss": repr(loss), "eval.samples": "100"}
    assert evaluation_text(info) == f"test loss {loss:.4f} on 100 test samples, at step 3"


def test_status_line_before_the_first_score_says_why() -> None:
    assert "not scored yet" in evaluation_text({})
    info = {"eval.step": "12", "eval.accuracy": "0.9612", "eval.loss": "0.12", "eval.samples": "359"}
    assert evaluation_text(info) == "accuracy 96.12%, loss 0.1200 on 359 test samples, at step 12"
