"""`HTDPipeline` as a diffusers `DiffusionPipeline`: saving and loading, and one test per diffusers habit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from htd_toolkit.base.shipped import shipped_adapter_model
from htd_toolkit.errors import InputError, UserError
from htd_toolkit.models.pipeline import HTDPipeline
from htd_toolkit.testing.slides import FIDELITY_FIXTURE

STEPS = 3


@pytest.fixture(scope="module")
def inputs():
    """Two 64 x 64 maps of the shipped model's classes and a crop for each class they hold."""
    with np.load(FIDELITY_FIXTURE) as data:
        maps = list(data["maps"][:2])
        crops = [{int(c): data["crops"][i, j] for j, c in enumerate(data["crop_classes"][i]) if c} for i in range(2)]
    return maps, crops


@pytest.fixture(scope="module")
def pipe():
    pipe = HTDPipeline.from_pretrained(shipped_adapter_model())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, inputs, seeds=(3, 4), **kwargs):
    maps, crops = inputs
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe(semantic_map=maps, crops=crops, generator=pipe.seeded(seeds), **kwargs).images


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def test_save_pretrained_writes_the_diffusers_layout_and_both_loaders_give_the_same_images(pipe, saved, inputs):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["htd_pipeline", "HTDPipeline"]
    assert index["crop_adapter"] == ["htd_crop_adapter", "CropAdapter"]
    assert index["htd_config"]["classes"] == pipe.htd_config.classes
    for component in ("vae", "text_encoder", "tokenizer", "unet", "controlnet", "crop_adapter", "scheduler"):
        assert (saved / component).is_dir(), component
    unet = UNet2DConditionModel.from_pretrained(saved, subfolder="unet")  # a stock UNet: LoRA merged, no adapter
    assert unet.config.encoder_hid_dim_type is None and not any("lora" in n for n, _ in unet.named_parameters())
    reference = generate(pipe, inputs)
    for loaded in (HTDPipeline.from_pretrained(saved), DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)):
        assert type(loaded) is HTDPipeline and loaded.htd_config == pipe.htd_config
        loaded.set_progress_bar_config(disable=True)
        assert np.array_equal(generate(loaded, inputs), reference)


def test_a_saved_pipeline_whose_module_file_is_not_the_toolkits_is_refused_before_it_runs(saved, tmp_path):
    folder = tmp_path / "foreign"
    shutil.copytree(saved, folder)
    marker = tmp_path / "ran"
    (folder / "htd_pipeline.py").write_text(f"open({str(marker)!r}, 'w')\nfrom htd_toolkit.models.pipeline import "
                                            "HTDPipeline  # noqa: F401\n")
    with pytest.raises(UserError, match=r"htd_pipeline\.py: not the file htd-toolkit writes"):
        HTDPipeline.from_pretrained(folder)
    assert not marker.exists()


def test_to_moves_and_casts_every_component(inputs):
    pipe = HTDPipeline.from_pretrained(shipped_adapter_model()).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(modules) == 5 and {m.dtype for m in modules} == {torch.float64}
    assert generate(pipe, inputs).shape == (2, 64, 64, 3)
    assert pipe.to("cpu").device == torch.device("cpu")


def test_enable_model_cpu_offload_hooks_every_model_and_changes_no_pixel(inputs):
    """On this CPU-only machine the offload device is the CPU: the hooks are installed and run (each model is moved
    to the execution device when called), which is what can be checked without an accelerator."""
    pipe = HTDPipeline.from_pretrained(shipped_adapter_model())
    pipe.set_progress_bar_config(disable=True)
    reference = generate(pipe, inputs)
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in ("text_encoder", "crop_adapter", "controlnet",
                                                                     "unet", "vae"))
    assert pipe._execution_device.type == "cpu"
    assert np.array_equal(generate(pipe, inputs), reference)


def test_set_progress_bar_config_turns_the_step_bar_on_and_off(pipe, inputs, capsys):
    pipe.set_progress_bar_config(disable=False)
    try:
        generate(pipe, inputs)
        shown = capsys.readouterr().err
    finally:
        pipe.set_progress_bar_config(disable=True)
    generate(pipe, inputs)
    assert f"{STEPS}/{STEPS}" in shown and capsys.readouterr().err == ""


def test_a_scheduler_swapped_from_config_is_the_one_that_runs(pipe, inputs):
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    unipc = generate(pipe, inputs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    try:
        ddim = generate(pipe, inputs)
    finally:
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    by_name = HTDPipeline.from_pretrained(shipped_adapter_model(), scheduler="ddim")  # the string alias
    by_name.set_progress_bar_config(disable=True)
    assert not np.array_equal(ddim, unipc) and np.array_equal(ddim, generate(by_name, inputs))
    assert np.array_equal(generate(pipe, inputs), unipc)


def test_num_images_per_prompt_gives_n_images_per_map_each_from_its_generator(pipe, inputs):
    maps, crops = inputs
    out = pipe(semantic_map=maps, crops=crops, num_images_per_prompt=2, generator=pipe.seeded([1, 2, 3, 4]),
               num_inference_steps=STEPS, output_type="np")
    assert out.images.shape == (4, 64, 64, 3)
    assert all(np.array_equal(mask, maps[i // 2]) for i, mask in enumerate(out.masks))
    alone = pipe(semantic_map=maps[1], crops=crops[1], generator=pipe.seeded([4]), num_inference_steps=STEPS,
                 output_type="np").images[0]
    assert np.abs(out.images[3].astype(int) - alone).max() <= 2  # a batch rounds differently by a grey level
    with pytest.raises(ValueError, match="2 generators for 4 maps \\(2 per map\\)"):
        pipe(semantic_map=maps, crops=crops, num_images_per_prompt=2, generator=pipe.seeded([1, 2]))


@pytest.mark.parametrize("generator", ["x", 3, ["x", "y"]])
def test_a_generator_that_is_not_a_torch_generator_is_one_line(pipe, inputs, generator):
    maps, crops = inputs
    wrong = type(generator[0] if isinstance(generator, list) else generator).__name__
    with pytest.raises(InputError, match=f"generator: expected a torch.Generator or a list of them, got {wrong}$"):
        pipe(semantic_map=maps, crops=crops, generator=generator, num_inference_steps=STEPS)


def test_none_in_a_list_of_generators_is_one_line(pipe, inputs):
    """A list is one generator per image: None there is none (a DDPM step failed on it inside diffusers with an
    AttributeError)."""
    maps, crops = inputs
    with pytest.raises(InputError, match=r"generator: expected a torch.Generator or a list of them, got NoneType$"):
        pipe(semantic_map=maps, crops=crops, generator=[None] * len(maps), num_inference_steps=STEPS)


def test_latents_given_are_the_starting_noise(pipe, inputs):
    latents = pipe.prepare_latents(2, 64, 64, pipe.seeded([3, 4]))
    maps, crops = inputs
    given = pipe(semantic_map=maps, crops=crops, latents=latents, num_inference_steps=STEPS, output_type="np").images
    assert np.array_equal(given, generate(pipe, inputs, seeds=(3, 4)))
    assert not np.array_equal(given, generate(pipe, inputs, seeds=(5, 6)))
    with pytest.raises(ValueError, match="latents: shape \\(1, 4, 16, 16\\), expected \\(2, 4, 16, 16\\)"):
        pipe(semantic_map=maps, crops=crops, latents=latents[:1])


def test_callback_on_step_end_sees_every_step_and_its_latents_continue(pipe, inputs):
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append((step, int(timestep), tuple(tensors)))
        return {"latents": tensors["latents"] * 0} if step == STEPS - 1 else tensors

    zeroed = generate(pipe, inputs, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"])
    assert [s for s, _, _ in seen] == list(range(STEPS)) and {names for _, _, names in seen} == {("latents",)}
    assert [t for _, t, _ in seen] == [int(t) for t in pipe.scheduler.timesteps]
    assert np.array_equal(zeroed, np.broadcast_to(pipe.decode_images(torch.zeros(2, 4, 16, 16)), zeroed.shape))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs: \\['noise'\\]"):
        generate(pipe, inputs, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


def test_output_type_latent_and_return_dict_false(pipe, inputs):
    maps, crops = inputs
    latents, masks = pipe(semantic_map=maps, crops=crops, generator=pipe.seeded([3, 4]), num_inference_steps=STEPS,
                          output_type="latent", return_dict=False)
    assert latents.shape == (2, 4, 16, 16) and masks.shape == (2, 64, 64)
    assert np.array_equal(pipe.decode_images(latents), generate(pipe, inputs))


def test_the_model_cards_snippet_loads_the_pushed_model_in_a_fresh_environment(tmp_path, monkeypatch, hub):
    """The card's "Use" code, as pushed, run in a new Python with an empty Hub cache against the test Hub: push
    uploads the pipeline layout (model_index.json, a folder per component) beside the recipe's files."""
    from huggingface_hub import HfApi, hf_hub_download

    from htd_toolkit.models.htd_model import HTDConfig
    from htd_toolkit.publish.cards import write_model_card
    from htd_toolkit.publish.hub import push_model
    from htd_toolkit.testing.hubserver import USER_TOKEN

    folder = tmp_path / "model"
    shutil.copytree(shipped_adapter_model(), folder)
    args = SimpleNamespace(max_train_steps=1, train_batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-4,
                           lora_learning_rate=1e-4, seed=0, hub_model_id=None, output_dir=str(folder))
    write_model_card(folder, HTDConfig.load(folder), {"splits": {"train": 1}}, args)
    monkeypatch.setenv("HF_TOKEN", USER_TOKEN)
    push_model(folder, "user/card-model")
    assert not (folder / "model_index.json").exists()  # the layout went up from a temporary folder
    files = set(HfApi(token=USER_TOKEN).list_repo_files("user/card-model"))
    assert {"model_index.json", "htd_pipeline.py", "unet/config.json", "pytorch_lora_weights.safetensors"} <= files
    card = Path(hf_hub_download("user/card-model", "README.md", cache_dir=tmp_path / "card")).read_text()
    assert "library_name: diffusers" in card
    snippet = re.search(r"## Use\n.*?```python\n(.*?)```", card, re.S).group(1)
    assert 'DiffusionPipeline.from_pretrained("user/card-model", trust_remote_code=True)' in snippet
    check = "\nassert np.array_equal(out.masks[0], semantic_map) and (tmp := __import__('PIL').Image.open('tissue.png'))\n" \
            "print(type(pipe).__name__, tmp.size)\n"
    env = {**os.environ, "HF_HOME": str(tmp_path / "fresh-home"), "HF_ENDPOINT": hub.url, "HF_TOKEN": USER_TOKEN,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["HTDPipeline", "(64,", "64)"], done.stdout


@pytest.mark.parametrize("case", ["unet NaN", "unet a pickle"])
def test_a_hostile_saved_pipeline_is_one_line_naming_the_file_and_runs_no_pickle(saved, tmp_path, case):
    from safetensors.torch import load_file, save_file

    from tests.test_untrusted import RunsCode

    folder, marker = tmp_path / "hostile", tmp_path / "pwned"
    shutil.copytree(saved, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if case == "unet NaN":
        state = load_file(weights)
        state["conv_in.bias"][0] = float("nan")
        save_file(state, weights)
        message = f"{weights}: tensor conv_in.bias holds NaN or infinite values"
    else:
        import pickle

        weights.unlink()
        weights.with_suffix(".bin").write_bytes(pickle.dumps(RunsCode(marker)))
        message = f"{folder}: does not fit the model"
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        HTDPipeline.from_pretrained(folder)
    assert "\n" not in str(caught.value) and not marker.exists()


@pytest.mark.parametrize("case", ["vae/evil.py named", "vae/diffusers.py", "unet/../htd_pipeline-like path"])
def test_a_component_module_file_of_a_saved_pipeline_is_refused_before_it_runs(saved, tmp_path, case):
    """diffusers imports `<component>/<library>.py` when a component's folder has one (even for "diffusers"), and
    HTDPipeline loads with trust_remote_code: only the toolkit's own module files may be there."""
    folder, marker = tmp_path / "hostile", tmp_path / "pwned"
    shutil.copytree(saved, folder)
    index = json.loads((folder / "model_index.json").read_text())
    library = {"vae/evil.py named": "evil", "vae/diffusers.py": "diffusers", "unet/../htd_pipeline-like path": "../x"}
    component = "unet" if case.startswith("unet") else "vae"
    index[component] = [library[case], index[component][1]]
    (folder / "model_index.json").write_text(json.dumps(index))
    module = folder / component / f"{library[case]}.py"
    module.write_text(f"open({str(marker)!r}, 'w')\nfrom diffusers import {index[component][1]}  # noqa: F401\n")
    with pytest.raises(UserError, match=r"\.py: a module file htd-toolkit does not write") as caught:
        HTDPipeline.from_pretrained(folder)
    assert "\n" not in str(caught.value) and not marker.exists()


@pytest.mark.parametrize(("index", "message"), [([1, 2], "not a JSON object"), ({"vae": []}, "vae [] is not")])
def test_a_saved_pipelines_malformed_index_is_one_line(saved, tmp_path, index, message):
    folder = tmp_path / "malformed"
    shutil.copytree(saved, folder)
    if isinstance(index, dict):
        index = {**json.loads((folder / "model_index.json").read_text()), **index}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=re.escape(message)):
        HTDPipeline.from_pretrained(folder)


@pytest.mark.parametrize(("returned", "message"), [
    (lambda latents: None, "callback_on_step_end returned NoneType at step 0: expected a dict"),
    (lambda latents: {"latents": "x"}, "the latents it returned at step 0 are str, expected a float tensor"),
    (lambda latents: {"latents": latents.numpy()}, "the latents it returned at step 0 are ndarray"),
    (lambda latents: {"latents": latents[:, :2]}, "are torch.float32 (2, 2, 16, 16), expected a float tensor of "
                                                  "shape (2, 4, 16, 16)")])
def test_a_callback_returning_no_latents_of_their_shape_is_one_line(pipe, inputs, returned, message):
    with pytest.raises(InputError, match=re.escape(message)):
        generate(pipe, inputs, callback_on_step_end=lambda p, step, t, tensors: returned(tensors["latents"]))


def test_numpy_scalars_are_numbers_to_the_pipeline(pipe, inputs):
    """np.float32 guidance from np.linspace, np.int64 steps and images per map are taken as their Python values
    (they were refused: 'guidance_scale 2.0: expected a finite number at least 0 and at most 100.0')."""
    reference = generate(pipe, inputs, guidance_scale=2.0, num_images_per_prompt=1, seeds=(3, 4))
    numpy = generate(pipe, inputs, guidance_scale=np.float32(2.0), num_images_per_prompt=np.int64(1),
                     num_inference_steps=np.int64(STEPS), seeds=(3, 4))
    assert np.array_equal(numpy, reference)


@pytest.mark.parametrize(("latents", "message"), [
    (np.zeros((2, 4, 16, 16), np.float32), "latents: expected a tensor of finite floats, got ndarray"),
    (torch.zeros(2, 4, 16, 16, dtype=torch.complex64), "got torch.complex64"),
    (torch.zeros(2, 4, 16, 16, dtype=torch.int64), "got torch.int64"),
    (torch.full((2, 4, 16, 16), float("nan")), "got torch.float32 (or NaN/infinite values)")])
def test_latents_that_are_not_finite_floats_are_one_line(pipe, inputs, latents, message):
    """NaN latents made an image of noise-free garbage, complex ones lost their imaginary part, NumPy ones were an
    AttributeError."""
    with pytest.raises(InputError, match=re.escape(message)):
        generate(pipe, inputs, latents=latents)


def test_an_empty_map_is_one_line(pipe):
    with pytest.raises(InputError, match=re.escape("semantic_map: 0x0 is not a multiple of the VAE factor 4")):
        pipe(semantic_map=np.zeros((0, 0), np.uint8), crops={}, num_inference_steps=1)


@pytest.mark.parametrize(("crop", "message"), [
    (np.zeros((32, 32), np.uint8), "]: expected an RGB crop (H, W, 3), got shape (32, 32)"),
    (np.zeros((0, 0, 3), np.uint8), "got shape (0, 0, 3)"), (np.zeros(5, np.uint8), "got shape (5,)"),
    ([np.zeros((32, 32, 3), np.uint8)], "crops: expected a dict {class id: RGB crop} per map")])
def test_a_crop_that_is_not_an_rgb_picture_is_one_line(pipe, inputs, crop, message):
    """A grey, empty or flat crop was a RuntimeError from torch's permute or resize; a list of crops for a map an
    AttributeError."""
    maps, crops = inputs
    given = [crop, crops[1]] if isinstance(crop, list) else [dict.fromkeys(crops[0], crop), crops[1]]
    with pytest.raises(InputError, match=re.escape(message)):
        pipe(semantic_map=maps, crops=given, num_inference_steps=1)


def test_crops_keyed_by_name_and_tensor_inputs_as_a_string_are_one_line_naming_the_argument(pipe, inputs):
    """A crop dict keyed by class name was "invalid literal for int()"; `callback_on_step_end_tensor_inputs="latents"`
    was refused letter by letter ("['a', 'e', ...] are not among ['latents']")."""
    maps, crops = inputs
    named = [{"tumour": next(iter(crops[0].values()))}, crops[1]]
    with pytest.raises(InputError, match=re.escape("crops[0]: key 'tumour' is not a class id")):
        pipe(semantic_map=maps, crops=named, num_inference_steps=1)
    with pytest.raises(InputError, match=re.escape("callback_on_step_end_tensor_inputs: a list of names, e.g. "
                                                   "['latents']")):
        generate(pipe, inputs, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs="latents")
