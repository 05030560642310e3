"""Checkpoints of the flat argument form (31 module arguments, up to b038ffe) still load: their
arguments upgrade to the component configs today's groups compose, and such a checkpoint loads
for inference. tests/data/flat_hparams.json holds the flat arguments b038ffe recorded for four
configurations (model_path replaced by "TINY")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from lightning_sdxl.checkpoint_hparams import is_distillation, upgrade

RECORDED = json.loads((Path(__file__).parent / "data" / "flat_hparams.json").read_text())["cases"]


def comparable(hparams: dict) -> dict:
    """The arguments without what the flat form never recorded (the stage's name: "8to4" is derived,
    the x0 conversion becomes "1to1") and without settings a preset (experiment=toy) gives every
    choice that the chosen one does not read (LoRA settings on a full student, re-noising on a loss
    without D, the start weighting on a TSCD stage)."""
    hparams = json.loads(json.dumps(hparams))
    stage, loss, student = hparams["stage"], hparams["loss"], hparams["student"]
    stage.pop("name", None)
    if not stage["_target_"].endswith("StageGrid"):
        stage.pop("pure_noise_weight", None)
    loss.setdefault("conditional", False)
    if not loss["adversarial"]:
        loss.pop("renoise_timesteps", None), loss.pop("renoise_weights", None)
    if student["type"] == "full":
        for key in ("lora_rank", "lora_alpha", "lora_target_modules"):
            student.pop(key, None)
    return hparams


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_flat_arguments_upgrade_to_what_the_groups_compose(case):
    cfg = compose_config(RECORDED[case]["overrides"])
    cfg.model.path = "TINY"
    composed = OmegaConf.to_container(cfg.module, resolve=True)
    for key in ("_target_", "_convert_", "_recursive_"):
        composed.pop(key)
    upgraded = upgrade(RECORDED[case]["hparams"])
    assert is_distillation(upgraded) and upgrade(upgraded) == upgraded  # current arguments pass unchanged
    assert comparable(upgraded) == comparable(composed)


def test_a_flat_checkpoint_loads_for_inference(make_config, tiny_sdxl_path, tmp_path):
    from lightning_sdxl.module import DistillationModule
    from lightning_sdxl.train import train

    cfg = make_config("steps=1", "validation.every_n_steps=1", "checkpoint.every_n_steps=1", "logger=none", "~callbacks.export")
    train(cfg)
    checkpoint = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"] = {**RECORDED["default"]["hparams"], "model_path": tiny_sdxl_path}
    flat = tmp_path / "flat.ckpt"
    torch.save(checkpoint, flat)
    module = DistillationModule.for_inference(flat)
    assert (module.stage.name, module.loss.name, module.student_spec.lora_rank) == ("8to4", "cond_adv", 4)
    trained = {key: value for key, value in module.state_dict().items() if key in checkpoint["state_dict"]}
    assert trained.keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(trained[key], checkpoint["state_dict"][key]) for key in trained)
