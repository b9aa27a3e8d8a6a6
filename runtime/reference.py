"""Single-process training on the whole global batch: the computation every plan must
reproduce (same init, same data, same optimizer), used by the equivalence tests."""

from __future__ import annotations

import torch

from hetalloc.models import resolve_model
from hetalloc.plan import Plan, plan_context

from .config import TrainConfig
from .datasets import TokenDataset
from .models import DTYPES, BuiltModel, build_model, token_loss_sum
from .optim import build_optimizer


def reference_run(plan: Plan, cfg: TrainConfig, *, model: str | None = None,
                  val_losses: dict[int, float] | None = None,
                  optimizer_state: dict[str, dict[str, torch.Tensor]] | None = None,
                  ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of cfg.steps steps and the final parameters (by whole-model name). With
    cfg.eval_every, the validation losses are put into `val_losses` (step -> loss); the
    final optimizer state by parameter name into `optimizer_state` when given."""
    shape = resolve_model(model) if model else plan_context(plan)[1].shape()
    built = build_model(shape, seed=cfg.seed, dropout=cfg.dropout, dtype=DTYPES[cfg.dtype])
    optimizer = build_optimizer(plan.optimizer, list(built.model.parameters()), cfg)
    data = TokenDataset(cfg.dataset, vocab=shape.vocab, seq_len=plan.seq_len, seed=cfg.seed,
                        classify=shape.family == "bert", val_fraction=cfg.val_fraction)
    B = plan.global_batch
    losses = []
    for step in range(1, cfg.steps + 1):
        ids, labels = data.batch((step - 1) * B, B)
        loss = token_loss_sum(built.logits(ids), labels) / labels.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and val_losses is not None:
            val_losses[step] = _validation_loss(built, data, B, cfg.eval_batches)
    if optimizer_state is not None:
        optimizer_state.update({n: {k: v.detach().clone() for k, v in optimizer.state[p].items()}
                                for n, p in built.model.named_parameters()})
    return losses, {n: p.detach().clone() for n, p in built.model.named_parameters()}


def _validation_loss(built: BuiltModel, data: TokenDataset, batch: int, batches: int) -> float:
    training = built.model.training
    built.model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for k in range(batches):
            ids, labels = data.batch(k * batch, batch, "val")
            total += float(token_loss_sum(built.logits(ids), labels).double())
            tokens += labels.numel()
    built.model.train(training)
    return total / tokens
