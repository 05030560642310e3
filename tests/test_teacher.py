"""Teacher training (stage=teacher): the loss weighting, what trains, caption dropout, config rules."""

from __future__ import annotations

import hydra
import pytest
import torch

from lightning_sdxl.config_checks import ConfigError, validate_config
from lightning_sdxl.data import ToyWorldDataModule
from lightning_sdxl.diffusion.prediction import get_prediction
from lightning_sdxl.diffusion.schedule import NoiseSchedule
from lightning_sdxl.models.tiny import SDXL_SCHEDULER_CONFIG
from lightning_sdxl.toy.teacher import TeacherModule, loss_weight


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_v_weighting_equals_the_v_prediction_loss(prediction):
    schedule = NoiseSchedule.from_scheduler_config(SDXL_SCHEDULER_CONFIG)
    t = torch.tensor([0, 10, 500, 900, 998])
    a_t = schedule.alpha(t).double()
    x0, eps, u = (torch.randn(5, 4, 2, 2, dtype=torch.float64) for _ in range(3))
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    p = get_prediction(prediction)
    weighted = loss_weight(prediction, a_t, "v") * (u - p.target(x_t, x0, eps, a_t)) ** 2
    x0_hat, eps_hat = p.to_x0_eps(x_t, u, a_t)
    v, v_hat = (a_t.sqrt() * e - (1 - a_t).sqrt() * x for e, x in ((eps, x0), (eps_hat, x0_hat)))
    torch.testing.assert_close(weighted, (v - v_hat) ** 2)


@pytest.fixture
def teacher_module(make_config, tiny_sdxl_path):
    cfg = make_config("experiment=toy_teacher", "data.batch_size=2", "data.resolution=64", f"model.path={tiny_sdxl_path}")
    validate_config(cfg)
    return cfg, hydra.utils.instantiate(cfg.module)


def test_stage_teacher_trains_the_unet_and_text_encoders_not_the_vae(teacher_module):
    cfg, module = teacher_module
    assert isinstance(module, TeacherModule) and module.prediction.name == "epsilon"
    data = ToyWorldDataModule(resolution=cfg.data.resolution, batch_size=2, world="simple")
    batch = next(iter(data.train_dataloader()))
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    module.optimizers = lambda: torch.optim.SGD([torch.zeros(1)], lr=cfg.module.optimizer.lr)
    module.training_step(batch, 0).backward()
    def has_grad(m):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert has_grad(module.unet) and has_grad(module.text_encoder.text_encoder_2)
    assert not any(p.requires_grad for p in module.vae.parameters())


def test_caption_dropout_trains_on_the_empty_condition(teacher_module):
    _, module = teacher_module
    condition = module.condition(["a large red circle at the top left on a white background"] * 3)
    module.hparams.caption_dropout = 1.0
    dropped = module.drop_captions(condition)
    assert torch.equal(dropped.prompt_embeds, torch.zeros_like(condition.prompt_embeds))
    assert torch.equal(dropped.pooled_prompt_embeds, torch.zeros_like(condition.pooled_prompt_embeds))
    module.hparams.caption_dropout = 0.0
    assert torch.equal(module.drop_captions(condition).prompt_embeds, condition.prompt_embeds)


@pytest.mark.parametrize("overrides", [["stage=teacher", "loss=mse"], ["loss=denoising"]])
def test_denoising_loss_and_teacher_stage_go_together(make_config, overrides):
    with pytest.raises(ConfigError, match="denoising"):
        validate_config(make_config(*overrides))
