"""What the two Lightning-trained methods (``train bc``, ``distill``) share: the warm-up + cosine AdamW schedule,
the callback that mirrors metrics to the run and exports the EMA policy at every checkpoint, the Trainer set-up
with resumable step checkpoints, and the export + evaluation at the end.

The method modules keep what differs: their LightningModule's loss, their data, their summary fields.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import lightning as L
import torch

from robofinetune.policies import Policy, save_policy
from robofinetune.runs import Run


def warmup_cosine_optimizer(parameters: Iterable[torch.nn.Parameter], config: Any) -> dict[str, Any]:
    """AdamW with a linear warm-up over ``config.warmup_steps`` then a cosine decay to 0 at ``config.max_steps``
    (Diffusion Policy's schedule), in the form ``LightningModule.configure_optimizers`` returns."""
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step"}}


class RunMetrics(L.Callback):
    """Mirrors the named progress-bar metrics to the run's JSONL and exports the EMA policy at every checkpoint,
    so a killed run always leaves a loadable ``<run>/policy``."""

    def __init__(self, run: Run, config: Any, metadata: dict[str, Any], metric_names: tuple[str, ...],
                 ema_policy: Callable[[L.LightningModule], Policy]) -> None:
        self.run, self.config, self.metadata = run, config, metadata
        self.metric_names, self.ema_policy = metric_names, ema_policy

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           index: int) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step % self.config.log_every == 0:
            metrics = {name: float(trainer.callback_metrics[name])
                       for name in self.metric_names if name in trainer.callback_metrics}
            if metrics:
                self.run.log(step, **metrics, **{"train/lr": trainer.optimizers[0].param_groups[0]["lr"]})
        if trainer.is_global_zero and step % self.config.checkpoint_every == 0 and step > 0:
            save_policy(self.ema_policy(module), self.run.path / "policy", {**self.metadata, "train_steps": step})


def fit(module: L.LightningModule, loader: torch.utils.data.DataLoader, run: Run, config: Any,
        metrics: RunMetrics, resume: bool, progress: bool) -> tuple[L.Trainer, float]:
    """Train ``module`` for ``config.max_steps`` with step checkpoints (``--resume`` continues from ``last.ckpt``);
    returns the trainer and the training seconds."""
    checkpointing = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run.checkpoints, every_n_train_steps=config.checkpoint_every, save_last=True, save_top_k=-1,
        filename="step{step:06d}", auto_insert_metric_name=False)
    trainer = L.Trainer(max_steps=config.max_steps, accelerator=config.accelerator, devices=config.devices,
                        num_nodes=config.num_nodes,
                        logger=L.pytorch.loggers.TensorBoardLogger(run.path, name="tensorboard"),
                        callbacks=[checkpointing, metrics], enable_progress_bar=progress,
                        enable_model_summary=False, log_every_n_steps=config.log_every, num_sanity_val_steps=0,
                        max_epochs=-1, deterministic=False)
    last = run.checkpoints / "last.ckpt"
    start = time.time()
    trainer.fit(module, loader, ckpt_path=str(last) if resume and last.exists() else None)
    return trainer, time.time() - start


def export_and_evaluate(policy: Policy, run: Run, config: Any, metadata: dict[str, Any], summary: dict[str, Any],
                        progress: bool) -> dict[str, Any]:
    """Save the final EMA policy as ``<run>/policy``, evaluate it in sim when ``config.eval_episodes`` > 0
    (``eval.json``), write ``summary.json`` and return the summary."""
    save_policy(policy, run.path / "policy", {**metadata, "train_steps": summary["train_steps"],
                                              "train_seconds": summary["train_seconds"]})
    if config.eval_episodes > 0:
        from robofinetune.eval import evaluate_policy

        result = evaluate_policy(policy.cpu(), config.task, episodes=config.eval_episodes,
                                 num_envs=config.eval_envs, progress=progress)
        run.write_json("eval.json", result.to_dict())
        summary.update(success=result.success_rate, success_ci=list(result.success_ci),
                       eval_episodes=result.episodes, eval_summary=result.summary())
    run.write_json("summary.json", summary)
    return summary
