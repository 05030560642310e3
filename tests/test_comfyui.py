"""comfyui_workflow.json: ComfyUI's API-format graph for the exported single file is well formed, samples
with the model's steps at CFG 1 with Euler / sgm_uniform, and reads x0 models as x0."""

from __future__ import annotations

import json

import hydra
import pytest
from conftest import compose_config
from omegaconf import open_dict

from lightning_sdxl.comfyui import check_workflow, links, workflow, write_workflow
from lightning_sdxl.export import COMFYUI_FILE, INFO_FILE, SINGLE_FILE, export_student

# RETURN_TYPES of each node, as ComfyUI's nodes.py and comfy_extras/nodes_model_advanced.py declare them.
RETURN_TYPES = {
    "CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"),
    "ModelSamplingDiscrete": ("MODEL",),
    "CLIPTextEncode": ("CONDITIONING",),
    "EmptyLatentImage": ("LATENT",),
    "KSampler": ("LATENT",),
    "VAEDecode": ("IMAGE",),
    "SaveImage": (),
}
# Each link input's expected type.
INPUT_TYPES = {"model": "MODEL", "clip": "CLIP", "vae": "VAE", "positive": "CONDITIONING", "negative": "CONDITIONING",
               "latent_image": "LATENT", "samples": "LATENT", "images": "IMAGE"}


def nodes_of(graph: dict, class_type: str) -> list[tuple[str, dict]]:
    return [(node_id, node) for node_id, node in graph.items() if node["class_type"] == class_type]


def assert_well_formed(graph: dict) -> None:
    """Every link points to an existing node and one of its outputs, of the type the input takes."""
    assert all(set(node) >= {"class_type", "inputs"} for node in graph.values())
    assert all(isinstance(node_id, str) for node_id in graph)
    found = links(graph)
    assert found, "a graph without links"
    for node_id, name, source, index in found:
        assert source in graph, f"{node_id}.{name} -> missing node {source}"
        outputs = RETURN_TYPES[graph[source]["class_type"]]
        assert 0 <= index < len(outputs), f"{node_id}.{name} -> output {index} of {graph[source]['class_type']}"
        assert outputs[index] == INPUT_TYPES[name], f"{node_id}.{name} takes {INPUT_TYPES[name]}, gets {outputs[index]}"
    check_workflow(graph)


@pytest.mark.parametrize(("prediction", "sampling"), [("epsilon", None), ("sample", "x0"), ("v_prediction", "v_prediction")])
def test_workflow_samples_the_model_as_trained(prediction, sampling):
    graph = workflow(SINGLE_FILE, steps=4, resolution=1024, prediction_type=prediction)
    assert_well_formed(graph)
    ((loader_id, loader),) = nodes_of(graph, "CheckpointLoaderSimple")
    assert loader["inputs"] == {"ckpt_name": SINGLE_FILE}
    ((_, sampler),) = nodes_of(graph, "KSampler")
    inputs = sampler["inputs"]
    assert (inputs["steps"], inputs["cfg"], inputs["sampler_name"], inputs["scheduler"], inputs["denoise"]) == (
        4, 1.0, "euler", "sgm_uniform", 1.0,
    )
    ((_, latent),) = nodes_of(graph, "EmptyLatentImage")
    assert latent["inputs"] == {"width": 1024, "height": 1024, "batch_size": 1}
    texts = {graph[inputs[key][0]]["inputs"]["text"] for key in ("positive", "negative")}
    assert "" in texts and len(texts) == 2  # a prompt and the empty negative
    model_sampling = nodes_of(graph, "ModelSamplingDiscrete")
    if sampling is None:  # epsilon: the loader's model goes straight to the sampler
        assert not model_sampling and inputs["model"] == [loader_id, 0]
    else:
        ((patch_id, patch),) = model_sampling
        assert patch["inputs"] == {"model": [loader_id, 0], "sampling": sampling, "zsnr": False}
        assert inputs["model"] == [patch_id, 0]
    ((_, decode),) = nodes_of(graph, "VAEDecode")
    ((_, save),) = nodes_of(graph, "SaveImage")
    assert decode["inputs"]["vae"] == [loader_id, 2] and graph[save["inputs"]["images"][0]] is decode


def test_check_workflow_rejects_dangling_links(tmp_path):
    graph = workflow(SINGLE_FILE, steps=1, resolution=64, prediction_type="sample")
    broken = json.loads(json.dumps(graph))
    broken["6"]["inputs"]["model"] = ["99", 0]
    with pytest.raises(ValueError, match="node 99"):
        check_workflow(broken)
    broken = json.loads(json.dumps(graph))
    broken["7"]["inputs"]["vae"] = ["1", 3]
    with pytest.raises(ValueError, match="output 3 of CheckpointLoaderSimple"):
        check_workflow(broken)
    with pytest.raises(ValueError, match="prediction_type"):
        workflow(SINGLE_FILE, steps=1, resolution=64, prediction_type="flow")
    path = write_workflow(tmp_path / COMFYUI_FILE, SINGLE_FILE, 2, 64)
    assert json.loads(path.read_text()) == workflow(SINGLE_FILE, 2, 64)
    assert [p.name for p in tmp_path.iterdir()] == [COMFYUI_FILE]  # no temporary file left


def test_export_writes_the_workflow_beside_the_single_file(tiny_sdxl_path, tmp_path):
    """An x0 (1-step) student's export: steps 1, the training resolution, the x0 node."""
    cfg = compose_config(["stage=2to1", "prediction=sample"], tmp_path / "run")
    with open_dict(cfg):
        cfg.model.path = tiny_sdxl_path
    module = hydra.utils.instantiate(cfg.module).eval()
    export = export_student(module, tmp_path / "export")
    graph = json.loads((export / COMFYUI_FILE).read_text())
    assert_well_formed(graph)
    assert graph == workflow(SINGLE_FILE, steps=1, resolution=64, prediction_type="sample")
    assert nodes_of(graph, "ModelSamplingDiscrete")[0][1]["inputs"]["sampling"] == "x0"
    info = json.loads((export / INFO_FILE).read_text())
    assert {SINGLE_FILE, COMFYUI_FILE} <= set(info["files"]) and info["num_inference_steps"] == 1
    without = export_student(module, tmp_path / "without", single_file=False)
    assert not (without / COMFYUI_FILE).exists()
    assert COMFYUI_FILE not in json.loads((without / INFO_FILE).read_text())["files"]
