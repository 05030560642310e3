"""A ComfyUI workflow for the exported single file: `comfyui_workflow.json` beside
`sdxl_single_file.safetensors` (METHOD.md 5).

The graph is ComfyUI's API ("prompt") format, the JSON that `POST /prompt` takes: node id ->
{"class_type", "inputs"}, where an input is a value or a link [source node id, output index].
Node names and inputs as read in ComfyUI's source (comfyanonymous/ComfyUI):

- nodes.py: CheckpointLoaderSimple (ckpt_name; outputs MODEL 0, CLIP 1, VAE 2), CLIPTextEncode
  (text, clip), EmptyLatentImage (width, height, batch_size), KSampler (model, seed, steps, cfg,
  sampler_name, scheduler, positive, negative, latent_image, denoise), VAEDecode (samples, vae),
  SaveImage (images, filename_prefix); script_examples/basic_api_example.py for the format.
- comfy_extras/nodes_model_advanced.py: ModelSamplingDiscrete (model, sampling in
  eps / v_prediction / lcm / x0, zsnr), which patches how the model's output is read.
- comfy/samplers.py: SCHEDULER_NAMES has "sgm_uniform" (`normal_scheduler(sgm=True)`: steps + 1
  evenly spaced timesteps from the largest, the last dropped), KSAMPLER_NAMES has "euler", and
  `sampling_function` drops the unconditional pass when cfg is 1.

The settings are SDXL-Lightning's for ComfyUI: Euler, sgm_uniform (evenly spaced timesteps from
t=999: the trailing spacing the students were trained on), CFG 1 (the empty negative prompt is never
used), the model's own step count. ComfyUI samples an SDXL single file as epsilon prediction, so an
x0 model (prediction_type "sample", the 1-step stage) gets ModelSamplingDiscrete with sampling "x0"
between the loader and the sampler, and a v-prediction model one with "v_prediction".
Written from node definitions, not run in ComfyUI here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning_sdxl.io import atomic_path

# The project's prediction types -> ModelSamplingDiscrete's `sampling` (none for epsilon: the default).
MODEL_SAMPLING = {"sample": "x0", "v_prediction": "v_prediction"}
# Output index of each output of the nodes used here (RETURN_TYPES order in ComfyUI's nodes.py).
OUTPUTS = {
    "CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"),
    "ModelSamplingDiscrete": ("MODEL",),
    "CLIPTextEncode": ("CONDITIONING",),
    "EmptyLatentImage": ("LATENT",),
    "KSampler": ("LATENT",),
    "VAEDecode": ("IMAGE",),
    "SaveImage": (),
}


def _node(class_type: str, title: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


def workflow(
    checkpoint_name: str,
    steps: int,
    resolution: int,
    prediction_type: str = "epsilon",
    prompt: str = "a photo of a cat",
    seed: int = 0,
) -> dict:
    """The API-format graph: load the single file, encode the prompt (and an empty negative), sample
    `steps` Euler steps (sgm_uniform, CFG 1) from an empty latent at `resolution`, decode, save.

    Args:
        checkpoint_name: the single file's name as ComfyUI lists it (models/checkpoints/).
        steps: the model's step count.
        resolution: width and height in pixels (the training resolution).
        prediction_type: "epsilon", "sample" (x0) or "v_prediction".
        prompt: the positive prompt.
        seed: KSampler's seed.
    """
    if prediction_type not in ("epsilon", *MODEL_SAMPLING):
        raise ValueError(f"prediction_type={prediction_type!r}: expected epsilon, sample or v_prediction")
    graph = {"1": _node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=checkpoint_name)}
    model = ["1", 0]
    if prediction_type in MODEL_SAMPLING:
        graph["2"] = _node(
            "ModelSamplingDiscrete", "ModelSamplingDiscrete", model=model,
            sampling=MODEL_SAMPLING[prediction_type], zsnr=False,
        )
        model = ["2", 0]
    graph["3"] = _node("CLIPTextEncode", "Positive prompt", text=prompt, clip=["1", 1])
    graph["4"] = _node("CLIPTextEncode", "Negative prompt (unused at CFG 1)", text="", clip=["1", 1])
    graph["5"] = _node("EmptyLatentImage", "Empty Latent Image", width=resolution, height=resolution, batch_size=1)
    graph["6"] = _node(
        "KSampler", f"KSampler ({steps} steps)", model=model, seed=seed, steps=steps, cfg=1.0,
        sampler_name="euler", scheduler="sgm_uniform", positive=["3", 0], negative=["4", 0],
        latent_image=["5", 0], denoise=1.0,
    )
    graph["7"] = _node("VAEDecode", "VAE Decode", samples=["6", 0], vae=["1", 2])
    stem = Path(checkpoint_name).stem
    graph["8"] = _node("SaveImage", "Save Image", images=["7", 0], filename_prefix=f"{stem}_{steps}step")
    return graph


def links(graph: dict) -> list[tuple[str, str, str, int]]:
    """Every link of an API-format graph: (node id, input name, source node id, output index)."""
    found = []
    for node_id, node in graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                found.append((node_id, name, value[0], value[1]))
    return found


def check_workflow(graph: dict) -> None:
    """Raise ValueError unless every link points to an existing node and one of its outputs."""
    for node_id, name, source, index in links(graph):
        if source not in graph:
            raise ValueError(f"node {node_id} input {name!r} links to node {source}, which does not exist")
        outputs = OUTPUTS.get(graph[source]["class_type"])
        if outputs is not None and not 0 <= index < len(outputs):
            raise ValueError(
                f"node {node_id} input {name!r} links to output {index} of {graph[source]['class_type']}, "
                f"which has {len(outputs)}"
            )


def write_workflow(path: str | os.PathLike, checkpoint_name: str, steps: int, resolution: int,
                   prediction_type: str = "epsilon") -> Path:
    """`workflow(...)` as indented JSON at `path`, written atomically."""
    graph = workflow(checkpoint_name, steps, resolution, prediction_type)
    check_workflow(graph)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(graph, indent=2) + "\n")
    return Path(path)
