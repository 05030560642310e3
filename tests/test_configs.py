"""Every file of every config group composes and builds; a config that cannot work fails early.

Files are enumerated from conf/, so a new file is covered without editing this module. A config
that cannot work must fail in `validate_config` (one line naming the key) before any model loads.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from conftest import CONF_DIR, CPU_OVERRIDES, compose_config
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from safetensors.torch import save_file

from lightning_sdxl.checkpoint_hparams import upgrade
from lightning_sdxl.config_checks import ConfigError, validate_config
from lightning_sdxl.data.cached import VALIDATION_IMAGES
from lightning_sdxl.data.latent_cache import CACHE_INFO, encoder_files, write_shard
from lightning_sdxl.errors import MissingPathError
from lightning_sdxl.metrics import MissingMetricWeights
from lightning_sdxl.models.loading import check_pipeline_folder
from lightning_sdxl.sharding import FullyShardedStrategy
from lightning_sdxl.train import build_trainer, instantiate_callbacks, instantiate_loggers, train

REPO = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)
GROUPS = {
    folder.name: sorted(path.stem for path in folder.glob("*.yaml"))
    for folder in sorted(CONF.iterdir())
    if folder.is_dir() and folder.name != "hydra"  # Hydra's own groups (launcher): test_slurm_launcher_*
}
ALL_FILES = [(group, name) for group, names in GROUPS.items() for name in names]
FILE_IDS = [f"{group}={name}" for group, name in ALL_FILES]

# Groups whose files all feed the DistillationModule (checked on combined instantiations).
MODULE_GROUPS = ("stage", "loss", "prediction", "student", "discriminator", "optim", "model")
# Model files that name real weights (a hub id): composed and validated, never instantiated offline.
HUB_MODELS = ("sdxl",)
# recipe: the recipes' plans (test_recipe.py, test_hypersd.py walk them; composed here).
HANDLED_GROUPS = {"data", "callbacks", "logger", "trainer", "experiment", "metrics", "module", "recipe", *MODULE_GROUPS}
# Teacher training (experiment=toy_teacher: stage=teacher, module=teacher, loss=denoising) builds the TeacherModule.
TEACHER_FILES = {("stage", "teacher"), ("loss", "denoising"), ("module", "teacher")}


def _files(group: str) -> list[tuple[str, str]]:
    return [(g, name) for g, name in ALL_FILES if g == group]


def _ids(files: list[tuple[str, str]]) -> list[str]:
    return [f"{group}={name}" for group, name in files]


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> str:
    """A data.root with one captioned image."""
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (96, 80), (200, 40, 40)).save(root / "red.png")
    (root / "red.txt").write_text("a red square")
    captions = {"images": [{"id": 1, "file_name": "red.png"}], "annotations": [{"image_id": 1, "caption": "a red square"}]}
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "manifest.csv").write_text("image,caption\nred.png,a red square\n")
    return str(root)


def _required_overrides(group: str, name: str, tiny: str, root: str) -> list[str]:
    """The values a file leaves for the command line (`???`), as a user would give them."""
    if (group, name) == ("data", "folder"):
        return [f"data.root={root}"]
    if (group, name) == ("data", "coco"):
        return [f"data.captions_file={root}/captions.json", f"data.image_root={root}"]
    if (group, name) == ("data", "manifest"):
        return [f"data.manifest={root}/manifest.csv"]
    if (group, name) == ("data", "webdataset"):
        return [f"data.shards={_small_shard(Path(root) / 'shards')}"]
    if (group, name) == ("data", "cached"):
        return [f"data.cache_dir={_small_cache(Path(root) / 'cache', tiny)}"]
    if (group, name) in (("experiment", "sdxl"), ("experiment", "sdxl_recipe"), ("experiment", "sdxl_hypersd")):
        return [f"model.path={tiny}", f"data.root={root}"]
    if (group, name) in TEACHER_FILES:
        return ["experiment=toy_teacher"]
    return []


def _small_shard(folder: Path) -> Path:
    """One img2dataset-style tar shard of 2 captioned images."""
    shard = folder / "00000.tar"
    if not shard.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(shard, "w") as tar:
            for key, colour in (("a", (200, 40, 40)), ("b", (40, 200, 40))):
                image = io.BytesIO()
                Image.new("RGB", (96, 80), colour).save(image, "PNG")
                for name, data in ((f"{key}.png", image.getvalue()), (f"{key}.txt", b"a square")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return shard


def _small_cache(folder: Path, tiny: str) -> Path:
    """A latent cache of 4 items for the tiny model at 64 px (random tensors of the right shapes)."""
    if not (folder / CACHE_INFO).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"latent_mean": torch.zeros(4, 4, 8, 8), "latent_logvar": torch.zeros(4, 4, 8, 8),
                   "prompt_embeds": torch.zeros(4, 77, 80), "pooled_prompt_embeds": torch.zeros(4, 48),
                   "add_time_ids": torch.zeros(4, 6)}
        shard = write_shard(folder, 0, tensors, ["a red square"] * 4)
        save_file({"pixel_values": torch.zeros(2, 3, 64, 64)}, str(folder / VALIDATION_IMAGES))
        info = {"model": tiny, "encoders": encoder_files(tiny), "resolution": 64, "items": 4, "shuffle": True,
                "shards": [shard], "validation": {"prompts": ["a red square"] * 2, "seeds": [0, 1]}}
        (folder / CACHE_INFO).write_text(json.dumps(info))
    return folder


def _compose_with_choices(overrides: list[str], output_dir: Path) -> tuple[DictConfig, dict]:
    """compose_config(overrides) and Hydra's resolved group choices, from one composition."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=CPU_OVERRIDES + overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.output_dir = str(output_dir)
    return cfg, choices


def _target_class(target: str) -> type:
    return hydra.utils.get_class(target)


# ---- 1. every file composes and instantiates ---------------------------------------------------


def test_every_group_is_handled():
    """A new config group needs a check here (a new file in a known group is covered already)."""
    assert set(GROUPS) == HANDLED_GROUPS, f"conf/ groups {set(GROUPS) ^ HANDLED_GROUPS} need a test"
    assert all(GROUPS.values()), "every config group holds at least one file"


@pytest.mark.parametrize(("group", "name"), ALL_FILES, ids=FILE_IDS)
def test_every_file_composes(group, name, tiny_sdxl_path, image_root, tmp_path):
    overrides = [f"{group}={name}", *_required_overrides(group, name, tiny_sdxl_path, image_root)]
    cfg, choices = _compose_with_choices(overrides, tmp_path / "run")
    assert choices[group] == name
    # Every interpolation resolves (only values left for the command line may stay `???`).
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    teacher = (group, name) in TEACHER_FILES or (group, name) == ("experiment", "toy_teacher")
    module = "lightning_sdxl.toy.teacher.TeacherModule" if teacher else "lightning_sdxl.module.DistillationModule"
    assert container["module"]["_target_"] == module
    raw = OmegaConf.load(CONF / group / f"{name}.yaml")
    is_global = (CONF / group / f"{name}.yaml").read_text().startswith("# @package _global_")
    if not is_global:  # experiments are `@package _global_`
        own_keys = set(raw) - {"defaults"}
        assert own_keys <= set(cfg[group]), (
            f"{group}={name}: keys {own_keys - set(cfg[group])} were lost"
        )
        if not raw and "defaults" not in raw:
            assert not cfg[group], f"{group}={name} is empty and must compose to an empty group"


@pytest.mark.parametrize(("group", "name"), _files("experiment"), ids=_ids(_files("experiment")))
def test_experiment_presets_validate_as_given(group, name, tiny_sdxl_path, image_root, tmp_path):
    """`python train.py experiment=X [its required paths]`, unshrunk, is a valid config."""
    overrides = [
        f"experiment={name}",
        *_required_overrides(group, name, tiny_sdxl_path, image_root),
    ]
    cfg = compose_config(overrides, tmp_path / "run", shrink=False)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU is visible"):  # the GPU presets, on a CPU machine
            validate_config(cfg)
        cfg = compose_config([*overrides, "trainer.accelerator=cpu"], tmp_path / "run", shrink=False)
    validate_config(cfg)
    raw = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    for key in ("steps", "experiment_name"):
        if key in raw:
            assert cfg[key] == raw[key]


def test_experiment_sdxl_selects_the_real_setup(tiny_sdxl_path, image_root, tmp_path):
    cfg = compose_config(
        [f"model.path={tiny_sdxl_path}", f"data.root={image_root}", "experiment=sdxl"],
        tmp_path / "run",
        shrink=False,
    )
    assert (cfg.model.name, cfg.data._target_, cfg.trainer.strategy) == (
        "sdxl",
        "lightning_sdxl.data.FolderDataModule",
        "ddp",
    )
    assert cfg.model.frozen_dtype == "bfloat16" and "mixed" in cfg.trainer.precision


@pytest.mark.parametrize(("group", "name"), _files("data"), ids=_ids(_files("data")))
def test_data_files_instantiate(group, name, image_root, make_config):
    cfg = make_config(
        f"data={name}",
        *_required_overrides(group, name, "", image_root),
        "data.batch_size=1",
        "data.num_workers=0",
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    assert isinstance(datamodule, L.LightningDataModule)
    assert isinstance(datamodule, _target_class(cfg.data._target_))
    batch = next(iter(datamodule.train_dataloader()))
    if name == "cached":  # VAE posteriors of the 64 px images (tiny VAE: 8 x 8 latents)
        assert batch["latent_mean"].shape == batch["latent_logvar"].shape == (1, 4, 8, 8)
    else:
        assert batch["pixel_values"].shape == (1, 3, cfg.data.resolution, cfg.data.resolution)
    assert isinstance(batch["prompt"][0], str) and batch["prompt"][0]
    prompts = next(iter(datamodule.val_dataloader()))
    assert len(prompts["prompt"]) >= 1


@pytest.mark.parametrize(("group", "name"), _files("callbacks"), ids=_ids(_files("callbacks")))
def test_callback_files_instantiate(group, name, make_config, monkeypatch, tmp_path):
    cfg = make_config(f"callbacks={name}", "checkpoint.every_n_steps=3")
    if name == "metrics":  # real Inception / ViT-g-14 weights: absent offline, a one-line error
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        with pytest.raises(MissingMetricWeights, match="metrics.fid_whole.extractor.weights_path"):
            instantiate_callbacks(make_config(f"callbacks={name}", "metrics=sdxl"))
    callbacks = instantiate_callbacks(cfg)
    entries = list((cfg.callbacks or {}).items())
    assert len(callbacks) == len(entries)
    for callback, (key, entry) in zip(callbacks, entries):
        assert isinstance(callback, L.Callback), key
        assert type(callback) is _target_class(entry._target_), key
        if key == "model_checkpoint":  # batches -> optimizer steps (2 per adversarial batch)
            assert callback._every_n_train_steps == 3 * 2
            assert Path(callback.dirpath).is_relative_to(cfg.output_dir)


@pytest.mark.parametrize(("group", "name"), _files("metrics"), ids=_ids(_files("metrics")))
def test_metric_files_name_their_weights_when_absent(group, name, make_config, monkeypatch, tmp_path):
    """Real metric weights are absent offline: each network fails in one line naming its key."""
    from lightning_sdxl.errors import instantiate_checked

    if name.startswith("toy"):  # committed weights: they load; moved away, the error names the file
        cfg = make_config(f"metrics={name}")
        for key in ("fid_whole", "fid_patch", "clip_score"):
            assert instantiate_checked(cfg.metrics[key]) is not None
        missing = str(tmp_path / "absent.safetensors")
        cfg = make_config(
            f"metrics={name}", f"metrics.fid_whole.extractor.weights_path={missing}",
            f"metrics.clip_score.scorer.pretrained={missing}",
        )
        for key in ("fid_whole", "fid_patch", "clip_score"):
            with pytest.raises(MissingMetricWeights, match="absent.safetensors"):
                instantiate_checked(cfg.metrics[key])
        return
    cfg = make_config(f"metrics={name}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for key, config_key in (("fid_whole", "fid_whole.extractor.weights_path"), ("clip_score", "clip_score.scorer.pretrained")):
        with pytest.raises(MissingMetricWeights, match=f"metrics.{config_key}"):
            instantiate_checked(cfg.metrics[key])


@pytest.mark.parametrize(("group", "name"), _files("logger"), ids=_ids(_files("logger")))
def test_logger_files_instantiate(group, name, make_config):
    cfg = make_config(f"logger={name}")
    if name == "wandb" and importlib.util.find_spec("wandb") is None:  # optional: tests/test_logger_wandb.py
        with pytest.raises(ConfigError, match="pip install wandb"):
            validate_config(cfg)
        return
    loggers = instantiate_loggers(cfg)
    entries = list((cfg.logger or {}).values())
    assert len(loggers) == len(entries)
    for logger, entry in zip(loggers, entries):
        assert type(logger) is _target_class(entry._target_)
        assert Path(logger.save_dir).is_relative_to(cfg.output_dir)


@pytest.mark.parametrize(("group", "name"), _files("trainer"), ids=_ids(_files("trainer")))
def test_trainer_files_build(group, name, make_config):
    cfg = make_config(f"trainer={name}")
    strategy = cfg.trainer.strategy
    if cfg.trainer.accelerator not in ("cpu", "auto"):  # gpu, ddp: the same file, built on the CPU
        cfg = make_config(
            f"trainer={name}",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.precision=32-true",
        )
        assert cfg.trainer.strategy == strategy, "the CPU overrides must keep the file's strategy"
    validate_config(cfg)
    trainer = build_trainer(cfg, [], [])
    assert trainer.max_steps == cfg.steps * 2  # the default loss is adversarial
    assert trainer.val_check_interval == cfg.validation.every_n_steps
    if strategy == "auto":
        assert isinstance(trainer.strategy, SingleDeviceStrategy)
    elif "_target_" in strategy:  # fsdp: the project's FullyShardedStrategy with the file's options
        assert isinstance(trainer.strategy, FullyShardedStrategy)
        assert trainer.strategy.param_dtype == torch.bfloat16 and trainer.strategy.activation_checkpointing
    else:
        assert isinstance(trainer.strategy, DDPStrategy) and strategy == "ddp"
        # Set by build_trainer: each optimizer's backward leaves the other's weights without gradients.
        assert trainer.strategy._ddp_kwargs.get("find_unused_parameters") is True


@pytest.mark.parametrize("loss", GROUPS["loss"])
def test_max_steps_counts_optimizer_steps_per_batch(loss, make_config):
    cfg = make_config(f"loss={loss}", "steps=7", *(["experiment=toy_teacher"] if loss == "denoising" else []))
    assert build_trainer(cfg, [], []).max_steps == 7 * (1 if loss in ("mse", "denoising") else 2)


def test_several_devices_get_ddp_with_unused_parameters(make_config):
    cfg = make_config("trainer.devices=2", "trainer.accelerator=cpu")
    strategy = build_trainer(cfg, [], []).strategy
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs.get("find_unused_parameters") is True


def _module_combinations() -> list[dict[str, str]]:
    """Few choice combinations that together use every file of every module group once or more."""
    names = {
        group: [
            name for name in GROUPS[group]
            if not (group == "model" and name in HUB_MODELS) and (group, name) not in TEACHER_FILES
        ]
        for group in MODULE_GROUPS
    }
    count = max(len(choices) for choices in names.values())
    return [
        {group: choices[i % len(choices)] for group, choices in names.items()} for i in range(count)
    ]


MODULE_COMBINATIONS = _module_combinations()


def test_module_combinations_cover_every_file():
    for group in MODULE_GROUPS:
        used = {combination[group] for combination in MODULE_COMBINATIONS}
        expected = set(GROUPS[group]) - (set(HUB_MODELS) if group == "model" else set())
        assert used == expected - {name for g, name in TEACHER_FILES if g == group}, group
    assert len(MODULE_COMBINATIONS) <= 8, "keep the module instantiations few (each takes ~1-2 s)"


@pytest.mark.parametrize(
    "choices",
    MODULE_COMBINATIONS,
    ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in MODULE_COMBINATIONS],
)
def test_module_groups_instantiate(choices, tiny_sdxl_path, make_config):
    cfg = make_config(
        *(f"{group}={name}" for group, name in choices.items()), f"model.path={tiny_sdxl_path}"
    )
    validate_config(cfg)
    module = hydra.utils.instantiate(cfg.module)
    assert module.hparams.model_path == tiny_sdxl_path

    # stage: the student jumps teacher_steps // student_steps teacher steps at once.
    if not module.segmented:
        assert module.stage.substeps == cfg.stage.teacher_steps // cfg.stage.student_steps
    assert (module.stage.name, module.stage.teacher_steps, module.stage.student_steps) == (
        cfg.stage.name,
        cfg.stage.teacher_steps,
        cfg.stage.student_steps,
    )
    assert module.stage.guidance_scale == cfg.stage.guidance_scale

    # loss: a discriminator only for the adversarial losses, conditional only for cond_adv.
    if cfg.loss.name == "mse":
        assert module.discriminator is None and not module.adversarial
    else:
        assert module.adversarial
        assert module.discriminator.conditional == (cfg.loss.name == "cond_adv")
        # discriminator: the head depth of the file, or the automatic one (4 x 4 pixels left).
        feature_size = module.latent_size // module.discriminator.backbone.downsample_factor
        expected = cfg.discriminator.head_blocks
        if expected is None:
            expected = max(b for b in range(6) if feature_size // 2**b >= 4)
        assert module.discriminator.head.num_blocks == expected
        assert all(p.requires_grad for p in module.discriminator.parameters())

    # prediction: the file's type, or the teacher's (the tiny scheduler predicts epsilon).
    assert module.teacher_prediction.name == "epsilon"
    assert module.student_prediction.name == (cfg.prediction.type or "epsilon")

    # student: LoRA trains only its adapters over a shared frozen base; full trains the whole UNet.
    trainable = [name for name, p in module.pair.unet.named_parameters() if p.requires_grad]
    assert trainable
    if cfg.student.type == "lora":
        assert all("lora_" in name for name in trainable)
        assert module.pair.teacher_unet is None
        assert module.student_spec.lora_rank == cfg.student.lora_rank
    else:
        assert len(trainable) == len(list(module.pair.unet.parameters()))
        assert not any(p.requires_grad for p in module.pair.teacher_unet.parameters())
    assert not any(p.requires_grad for p in module.vae.parameters())

    # model: frozen parts in the configured dtype.
    assert module.vae.dtype == getattr(torch, cfg.model.frozen_dtype)

    # optim: one optimizer per model, lr from the student and discriminator groups, betas from the loss group.
    optimizers, schedulers = module.configure_optimizers()
    assert len(optimizers) == len(schedulers) == module.optimizers_per_batch
    for optimizer, lr in zip(optimizers, (cfg.student.lr, cfg.discriminator.lr)):
        assert type(optimizer) is _target_class(cfg.optim.optimizer._target_)
        assert optimizer.defaults["lr"] == lr
        assert tuple(optimizer.defaults["betas"]) == tuple(cfg.loss.adam_betas)
    assert sum(p.numel() for group in optimizers[0].param_groups for p in group["params"]) == sum(
        p.numel() for p in module.pair.trainable_parameters()
    )


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_models_compose_and_validate_without_network(name, make_config, monkeypatch):
    from lightning_sdxl.models import loading

    cfg = make_config(f"model={name}")
    assert not Path(cfg.model.path).exists(), "the default is a hub id, not a local folder"
    # Offline and not in the cache: one line at once (the hub client would retry for minutes).
    cfg = make_config(f"model={name}", "~experiment", "trainer.precision=bf16-mixed")
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache while the hub is not reachable"):
        validate_config(cfg)
    # Where the hub answers, the hub id passes validation: downloads happen in load_sdxl.
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=5.0: True)
    validate_config(cfg)
    check_pipeline_folder(cfg.model.path)
    with pytest.raises(FileNotFoundError, match=r"model\.path=/nonexistent/sdxl does not exist"):
        check_pipeline_folder("/nonexistent/sdxl")


def test_incomplete_local_folder_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"model\.path=.* is not a complete diffusers SDXL folder"
    ):
        check_pipeline_folder(str(tmp_path))


# ---- 2. a config that cannot work fails before any model loads ---------------------------------

BAD_CONFIGS = [
    (["stage.teacher_steps=8", "stage.student_steps=3"], ConfigError, "stage.teacher_steps=8"),
    (["stage.student_steps=0"], ConfigError, "stage.student_steps=0"),
    (["student.lora_rank=0"], ConfigError, "student.lora_rank=0"),
    (["student.type=half"], ConfigError, "student.type=half"),
    (["student.gradient_checkpointing=partial"], ConfigError, "student.gradient_checkpointing=partial: choose one of none"),
    (["trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy.activation_checkpointing=some"], ConfigError,
     "trainer.strategy.activation_checkpointing=some"),
    (["prediction.type=x0"], ConfigError, "prediction.type=x0"),
    (["steps=0"], ConfigError, "steps=0"),
    (
        ["model=sdxl", "~experiment", "model.frozen_dtype=float32", "model.path=/nonexistent/sdxl"],
        FileNotFoundError,
        "model.path=/nonexistent/sdxl",
    ),
    (["data=folder", "data.root=/nonexistent"], FileNotFoundError, "data.root=/nonexistent"),
    (["data=folder"], ConfigError, "data.root"),
    (["trainer.max_steps=10"], ConfigError, "trainer.max_steps=10"),
    (["validation.every_n_steps=0"], ConfigError, "validation.every_n_steps"),
    (["data.resolution=60"], ConfigError, "data.resolution=60"),
    (["model.frozen_dtype=bfloat16"], ConfigError, "model.frozen_dtype=bfloat16"),
    (["model.frozen_dtype=float64"], ConfigError, "model.frozen_dtype=float64"),
    (
        ["experiment=toy", "model=sdxl", "model.path={tiny}", "trainer.precision=bf16-mixed"],
        ConfigError,
        "experiment=toy",
    ),
    (["discriminator.head_blocks=6"], ConfigError, "discriminator.head_blocks=6"),
    (
        ["discriminator.head_blocks=6", "model.path={tiny}"],
        ConfigError,
        "discriminator.head_blocks=6",
    ),
    (["discriminator.head_blocks=-1"], ConfigError, "discriminator.head_blocks"),
    (["loss.renoise_weights=[1,1]"], ConfigError, "loss.renoise_weights"),
    (["loss.renoise_weights=[0,0,0,0]"], ConfigError, "loss.renoise_weights"),
    (["loss.renoise_weights=[-1,1,1,1]"], ConfigError, "loss.renoise_weights"),
    (["stage=2to1", "stage.start_timesteps=[249,499]", "stage.pure_noise_weight=5"], ConfigError, "must include t = 999"),
    (["stage.pure_noise_weight=0"], ConfigError, "stage.pure_noise_weight=0"),
    (["stage=tscd", "loss=uncond_adv"], ConfigError, "loss=mse or loss=mse_adv"),
    (["stage=tscd", "loss=mse", "stage.consistency_target=x"], ConfigError, "stage.consistency_target=x"),
    (["teacher_path=/nonexistent/teacher"], FileNotFoundError, "teacher_path"),
    (["discriminator.init=/nonexistent/d.safetensors"], FileNotFoundError, "discriminator.init"),
    (["loss=mse", "discriminator.init={tiny}/model_index.json"], ConfigError, "discriminator.init"),
    # Issue 15's probes: tracebacks after the models loaded, or silently accepted.
    (["stage.teacher_steps=0"], ConfigError, "stage.teacher_steps=0"),
    (["student.lr=abc"], ConfigError, "student.lr='abc' is not a number"),
    (["discriminator.lr=abc"], ConfigError, "discriminator.lr='abc' is not a number"),
    (["data.batch_size=0"], ConfigError, "data.batch_size=0"),
    (["ckpt_path=/nonexistent.ckpt"], FileNotFoundError, "ckpt_path=/nonexistent.ckpt"),
    (["ckpt_path=last"], FileNotFoundError, "ckpt_path=last"),
    (["ckpt_path=https://example.com/run.ckpt"], ConfigError, "is remote"),
    (["ckpt_path={tiny}/model_index.json"], ConfigError, "not a readable Lightning checkpoint"),
    (["callbacks.export.dirpath={tiny}"], FileExistsError, "did not write"),  # a folder of the user's files
]


def _model_loaded(*args, **kwargs):
    raise AssertionError("model loaded")


@pytest.fixture
def no_model_loads(tiny_sdxl_path, monkeypatch):
    """Loading or building any model fails the test (the tiny folder is built beforehand)."""
    monkeypatch.setattr("lightning_sdxl.module.load_sdxl", _model_loaded)
    monkeypatch.setattr("lightning_sdxl.models.tiny.ensure_tiny_sdxl", _model_loaded)
    return tiny_sdxl_path


def test_a_valid_config_reaches_the_model(no_model_loads, make_config):
    """The control: past validation, train() does build the model (so the patches take effect)."""
    from hydra.errors import InstantiationException

    with pytest.raises((AssertionError, InstantiationException), match="model loaded"):  # raised in the module's init
        train(make_config())


@pytest.mark.parametrize(
    ("overrides", "error", "key"), BAD_CONFIGS, ids=[" ".join(o) for o, _, _ in BAD_CONFIGS]
)
def test_bad_config_fails_before_any_model_loads(
    overrides, error, key, no_model_loads, make_config
):
    cfg = make_config(*(override.format(tiny=no_model_loads) for override in overrides))
    with pytest.raises(error) as raised:
        train(cfg)
    message = str(raised.value)
    assert key in message, message
    assert "\n" not in message.strip(), f"the message must be one line: {message!r}"


@pytest.mark.parametrize("form", ["components", "flat (before b038ffe)"])
def test_resuming_another_loss_or_stage_fails_before_any_model_loads(form, make_config, tmp_path):
    """The checkpoint's own hyperparameters are compared with the config (issue 15: loss=mse on a
    cond_adv checkpoint trained 2 of 14 batches and labelled the export mse); checkpoints of the
    older flat argument form are read through `checkpoint_hparams.upgrade`."""
    checkpoint = tmp_path / "adv.ckpt"
    hparams = {"loss": "cond_adv", "teacher_steps": 8, "student_steps": 4, "student_type": "lora", "lora_rank": 4}
    if form == "components":
        hparams = upgrade(hparams)
        assert hparams["loss"]["name"] == "cond_adv" and hparams["stage"]["teacher_steps"] == 8
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, checkpoint)
    with pytest.raises(ConfigError, match="trained with loss.name=cond_adv .this config: loss.name=mse"):
        validate_config(make_config("loss=mse", f"ckpt_path={checkpoint}"))
    with pytest.raises(ConfigError, match="stage.teacher_steps=8 .this config: stage.teacher_steps=2"):
        validate_config(make_config("stage=2to1", "loss=cond_adv", f"ckpt_path={checkpoint}"))


# ---- 3. an unknown choice lists the available ones ---------------------------------------------


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_unknown_choice_lists_the_options(group):
    with pytest.raises(ConfigCompositionException) as raised:
        compose_config([f"{group}=foo"])
    message = str(raised.value)
    assert f"Could not find '{group}/foo'" in message
    for name in GROUPS[group]:
        assert name in message
    if group == "loss":
        assert "mse" in message and "cond_adv" in message


# ---- 4. the command line -----------------------------------------------------------------------


def _run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` from the repo root, offline, with its own model cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIGHTNING_SDXL_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result


def test_cli_config_error_is_one_line_before_any_model(tmp_path):
    result = _run_cli(tmp_path, "student.lora_rank=0")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Config error:")]
    assert len(errors) == 1, result.stderr
    assert "student.lora_rank=0" in errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "home").exists(), "no model may be built before the config is checked"
    assert not (tmp_path / "run" / "checkpoints").exists(), "no training may start before the config is checked"


def test_cli_unknown_choice_names_the_options(tmp_path):
    result = _run_cli(tmp_path, "loss=foo")
    assert result.returncode != 0
    assert "Could not find 'loss/foo'" in result.stderr
    for name in GROUPS["loss"]:
        assert name in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("trainer", ["trainer.accelerator=gpu", "trainer=fsdp"])
def test_gpu_trainer_without_a_gpu_fails_before_any_model_loads(trainer, no_model_loads, tmp_path):
    overrides = [o for o in CPU_OVERRIDES if not o.startswith("trainer=")] + [trainer]
    with pytest.raises(ConfigError, match="no GPU is visible") as raised:
        train(compose_config(overrides, tmp_path / "run", shrink=False))
    assert "trainer.accelerator=cpu" in str(raised.value)


def test_slurm_launcher_composes_with_the_run(tmp_path):
    """hydra/launcher=slurm: the submitit launcher asks for trainer.num_nodes nodes, one task per GPU."""
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=fsdp", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert hydra.utils.get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 8, 8, "gpu")


def test_a_missing_packaged_teacher_names_the_command_that_rebuilds_it(make_config):
    from lightning_sdxl import ASSETS_DIR

    with pytest.raises(MissingPathError, match="lightning_sdxl.toy.build_teacher"):
        validate_config(make_config(f"model.path={ASSETS_DIR / 'toy-sdxl-missing'}"))
    with pytest.raises(MissingPathError) as raised:  # a user's own folder gets no such hint
        validate_config(make_config("model.path=/nonexistent/sdxl"))
    assert "build_teacher" not in str(raised.value)
