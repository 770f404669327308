"""The training loop every stage shares.

AdamW with linear warm-up and constant/linear/cosine decay, gradient clipping, AMP on CUDA (bfloat16 where
supported), DistributedDataParallel under torchrun (gloo on CPU, NCCL on CUDA; rank 0 alone writes),
atomic resumable state, TensorBoard scalars and images, a progress bar, and a stop with a clear message
when a loss term turns NaN/inf.

Batches come from a DataLoader over step numbers (:class:`StepBatches`): the batch of step ``s`` is drawn with
a generator seeded from (seed, s, rank), in a worker process or here, and the step then continues the random
stream where that draw left it. Everything random is thus a function of (seed, step, rank): any number of
workers trains the same weights, and a resumed run (the sampler's only state is the step) repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from maisi.config import to_jsonable
from maisi.config.train_config import OptimizerConfig, TrainConfig
from maisi.distributed import Ranks
from maisi.errors import InputError, TrainingDiverged
from maisi.progress import progress_bar
from maisi.training.state import TrainState, save_train_state

log = logging.getLogger(__name__)


class Stage(Protocol):
    """What a stage gives the loop."""

    name: str
    model: torch.nn.Module  # the module being trained

    def batch_draw(self) -> Callable[[torch.Generator], Any]:
        """What draws one step's batch (CPU tensors) with the generator it is given, drawing nothing from any
        other; it runs in DataLoader workers, so it must pickle and hold no network."""

    def train_loss(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Loss terms of one step on its batch (from :meth:`batch_draw`); ``"loss"`` is the one optimised."""

    def after_step(self, step: int) -> dict[str, float]:
        """Extra updates after the optimiser step (e.g. a discriminator); returns values to log."""

    def validate(self, model: torch.nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Validation metrics and 2D images (values in [0, 1]) for TensorBoard."""

    def export(self, model: torch.nn.Module, folder: Path, config_sha256: str) -> list[Path]:
        """Write the inference checkpoint(s) of the trained network."""

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


class StepBatches(Dataset):
    """Item ``step``: ``(step, batch, state)``, the batch of that training step drawn by ``draw`` with a
    generator seeded from (seed, step, rank), and that generator's state after the draw.

    The batch depends on nothing else (not on the worker that drew it, nor when), so workers may read ahead in
    any order. An input problem found while drawing comes back as the message in place of the state: raised in
    a worker, it would reach the user wrapped in the worker's traceback.
    """

    def __init__(self, draw: Callable[[torch.Generator], Any], seed: int, rank: int, steps: int):
        self.draw, self.seed, self.rank, self.steps = draw, seed, rank, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[int, Any, torch.Tensor | str]:
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank))
        try:
            batch = self.draw(generator)
        except InputError as e:
            return step, None, str(e)
        return step, batch, generator.get_state()


def step_batches(
    draw: Callable[[torch.Generator], Any],
    config: TrainConfig,
    rank: int,
    start: int,
    pin_memory: bool = False,
) -> Iterator[tuple[int, Any, torch.Tensor]]:
    """``(step, batch, generator state)`` for steps ``start`` .. ``config.steps - 1`` in order, read ahead by
    ``config.loader.num_workers`` worker processes (0: drawn here when asked for).

    Raises:
        InputError: a file found unreadable or non-finite when its batch was read (its message names it).
    """
    workers = config.loader.num_workers
    loader = DataLoader(
        StepBatches(draw, config.seed, rank, config.steps),
        batch_size=None,  # an item is a whole step's batch
        sampler=range(start, config.steps),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=config.loader.prefetch_factor if workers else None,
        generator=torch.Generator().manual_seed(config.seed),  # its worker seeds: not from the global stream
    )
    for step, batch, state in loader:
        if isinstance(state, str):
            raise InputError(state)
        yield step, batch, state


def lr_factor(opt: OptimizerConfig, steps: int):
    """Multiplier of the peak learning rate at a given step."""

    def factor(step: int) -> float:
        if step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.decay == "constant":
            return 1.0
        progress = (step - opt.warmup_steps) / max(1, steps - opt.warmup_steps)
        shape = 1.0 - progress if opt.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * shape

    return factor


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bfloat16" else torch.float16


def _check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value.detach()).all():
            raise TrainingDiverged(
                f"step {step + 1}: loss term '{name}' is {value.item()}; stopping (lower the "
                "learning rate, enable gradient clipping, or check the data)"
            )


def train(
    stage: Stage,
    config: TrainConfig,
    ranks: Ranks,
    device: torch.device,
    config_sha256: str,
    resume_from: TrainState | None,
) -> None:
    """Run ``stage`` from step 0, or from ``resume_from``, to ``config.steps``."""
    out = Path(config.output_dir)
    model = stage.model.to(device)
    wrapped = DistributedDataParallel(model) if ranks.world_size > 1 else model
    opt = config.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(opt, config.steps))
    dtype = amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    start = 0
    if resume_from is not None:
        model.load_state_dict(resume_from.model)
        optimizer.load_state_dict(resume_from.optimizer)
        scheduler.load_state_dict(resume_from.lr_scheduler)
        if resume_from.scaler:
            scaler.load_state_dict(resume_from.scaler)
        stage.load_state(resume_from.stage_state)
        start = resume_from.step
        log.info("resuming %s at step %d of %d", stage.name, start, config.steps)
    writer = None
    if ranks.is_main and config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    def save(step: int) -> None:
        if not ranks.is_main:
            return
        save_train_state(
            out,
            TrainState(
                stage.name,
                step,
                config_sha256,
                model.state_dict(),
                optimizer.state_dict(),
                scheduler.state_dict(),
                scaler.state_dict() if scaler.is_enabled() else {},
                stage.state(),
                to_jsonable(config),
            ),
        )
        stage.export(model, out, config_sha256)

    def validate(step: int) -> None:
        if not ranks.is_main:
            return
        metrics, images = stage.validate(model)
        if metrics:
            log.info("step %d validation: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if writer:
            for k, v in metrics.items():
                writer.add_scalar(f"val/{k}", v, step)
            for k, img in images.items():
                writer.add_image(f"val/{k}", img[None], step)

    steps = range(start, config.steps)
    # rank 0's bar, unless --no-progress (maisi.progress)
    bar = progress_bar(steps, enabled=ranks.is_main, initial=start, total=config.steps, desc=stage.name)
    draw = stage.batch_draw()
    t0, done = time.perf_counter(), 0
    # closing: the workers stop when training stops, by success or by error
    with closing(step_batches(draw, config, ranks.rank, start, pin_memory=device.type == "cuda")) as batches:
        for step in bar:
            torch.manual_seed(step_seed(config.seed, step, ranks.rank))  # CUDA's generator too
            drawn, batch, state = next(batches)
            if drawn != step:
                raise RuntimeError(f"the data loader gave the batch of step {drawn} for step {step}")
            torch.set_rng_state(state)  # the stream continues where the draw left it, as if drawn here
            model.train()
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
                terms = stage.train_loss(wrapped, batch)
            _check_finite(terms, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.unscale_(optimizer)
            clip = opt.grad_clip if opt.grad_clip else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            extra = stage.after_step(step)
            done += 1
            rate = done / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{terms['loss'].item():.4g}", steps_s=f"{rate:.2f}")
            if writer and (step + 1) % config.log_every == 0:
                for k, v in terms.items():
                    writer.add_scalar(f"train/{k}", v.item(), step + 1)
                for k, v in extra.items():
                    writer.add_scalar(f"train/{k}", v, step + 1)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step + 1)
                writer.add_scalar("train/grad_norm", float(grad_norm), step + 1)
                writer.add_scalar("train/steps_per_s", rate, step + 1)
            last = step + 1 == config.steps
            if last or (step + 1) % config.checkpoint_every == 0:
                save(step + 1)
            if last or (step + 1) % config.validate_every == 0:
                validate(step + 1)
    if writer:
        writer.close()
    if done:
        log.info(
            "%s: %d steps in %.1f s (%.3f steps/s per process)",
            stage.name,
            done,
            time.perf_counter() - t0,
            done / (time.perf_counter() - t0),
        )
