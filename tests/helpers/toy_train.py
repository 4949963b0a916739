"""A toy regression trained with the shared runtime: the foundation tests run it under torchrun and plain python."""
import json
import os
import time

import torch
import torch.nn as nn

from core.cli import entry_point
from training.optim import lr_factor, make_ema, make_optimizer, set_lr, update_ema
from training.run import TrainingRun


class ToyData(torch.utils.data.Dataset):
    """Fixed random (x, target) pairs; accepts the (index, epoch) items of the infinite sampler."""

    def __init__(self, size: int = 64):
        generator = torch.Generator().manual_seed(1234)
        self.x = torch.randn(size, 6, generator=generator)
        self.target = self.x @ torch.randn(6, 1, generator=generator) + 0.1 * torch.randn(size, 1, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        return {"x": self.x[index], "y": self.target[index], "index": index}


def main(cfg):
    run = TrainingRun(cfg, stage="autoencoder")
    torch.manual_seed(0)  # identical init on every rank and world size
    dropout = float(os.environ.get("TOY_DROPOUT", "0"))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1)).to(run.device)
    ema = make_ema(model)
    opt = make_optimizer(model.parameters(), cfg.optim, run.device)
    run.restore({"model": model, "ema": ema}, {"opt": opt})
    run.write_config()
    ddp_model = run.wrap(model)
    batches = run.loader(ToyData())
    losses = []
    last = run.should_stop()
    while not last:
        batch = next(batches)
        set_lr(opt, lr_factor(cfg.optim, run.step, cfg.train.max_steps))
        loss = nn.functional.mse_loss(ddp_model(run.to_device(batch["x"])), run.to_device(batch["y"]))
        if run.step + 1 in {int(s) for s in os.environ.get("TOY_NAN_STEPS", "").split(",") if s}:
            loss = loss * float("nan")  # the non-finite tests: this update must be skipped
        time.sleep(float(os.environ.get("TOY_STEP_SECONDS", "0")))
        loss.backward()
        _, stepped = run.clip_and_step(ddp_model, opt)
        if stepped:
            update_ema(ema, model, cfg.train.ema_decay)
        run.count_step()
        losses.append(loss.item())
        last = run.should_stop()
        run.log({"loss": loss}, last)
        if run.due(cfg.train.ckpt_every, last):
            run.save({"model": model, "ema": ema}, {"opt": opt})
    if run.dist.is_main:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
        (run.run_dir / f"result-{run.step}.json").write_text(json.dumps({"losses": losses, "params": flat}))
    run.finish()


if __name__ == "__main__":
    entry_point(main, "autoencoder", "toy trainer for tests")
