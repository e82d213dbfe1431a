"""The ImageNet-256 pipeline end to end, at toy size on the CPU, through the same CLI entry points a
GPU run uses: an image folder -> `dar prepare-latents` (a tiny random AutoencoderKL saved as a VAE
folder, the SD-VAE's structure) -> `dar train` of a latent SiT (residual and DAR, with VAE-decoded
sample grids) -> `dar sample` decoded to uint8 images -> `dar eval --make-ref` on the training images
and `dar eval` of the samples against it. Only the sizes differ from docs/IMAGENET.md: 64 px images,
8x8 latents, SiT-Pico/2, 4 steps.

The one stand-in is the evaluation's feature network. With Inception (2048 features) a single `dar
eval` costs more on this CPU than the rest of the pipeline together, nearly all of it two scipy
matrix square roots of 2048 x 2048 covariances (10 s to over a minute each, depending on the load).
So a tiny fixed network (32 features) is registered in the extractor registry that `dar eval
--extractor` chooses from, and everything else (input checks, reference file, metrics, the sampling
sidecar in the result) is the code an Inception evaluation runs; the Inception network itself is
tested in test_inception.py, and benchmarks/gpu_check.sh evaluates decoded 256 px samples with it.
`dar eval` reads only the sample .npz and its sidecar, so it runs on the DAR model's samples only.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
# a covariance of 8 samples is singular, whatever the network: the metrics say so and carry on
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore:Fréchet distance")

import dar.cli.eval as eval_cli  # noqa: E402
import dar.evaluate.features as features  # noqa: E402
from dar.cli import main  # noqa: E402
from dar.data.vae import save_vae, tiny_autoencoder  # noqa: E402
from dar.provenance import weights_sha256  # noqa: E402

RESOLUTION = 64  # pixels; the tiny VAE downsamples 8x, as the SD-VAE: 8x8x4 latents
PER_CLASS = 8
NUM_SAMPLES = 8
TRAIN = ["model.arch=SiT-Pico/2", "model.input_size=8", "model.num_classes=2", "train.steps=4",
         "train.global_batch=4", "train.precision=fp32", "train.sample_every=4", "train.ckpt_every=4",
         "train.log_every=2", "sampler.method=euler", "sampler.steps=2"]
PRESETS = {"residual": "imagenet256-b-residual", "dar": "imagenet256-b"}  # model.* overrides make them tiny
# benchmarks/gpu_check.sh runs this file on the GPU with DAR_TEST_DEVICE=cuda
DEVICE = os.environ.get("DAR_TEST_DEVICE", "cpu")
EVAL_DEVICE = "cuda" if DEVICE.startswith("cuda") else "cpu"  # `dar eval --device` takes cpu | cuda


def structured_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """Class 0: stripes at a random angle; class 1: a disc at a random place. Random colours."""
    yy, xx = np.mgrid[0:RESOLUTION, 0:RESOLUTION] / RESOLUTION
    if label == 0:
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.1, 0.3)
        mask = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0
    else:
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return np.where(mask[..., None], fg, bg).astype(np.uint8)


class StandInExtractor(features.FeatureExtractor):
    """RGB images -> 4x4 average colours -> a fixed random projection: 32 pool features, 10 logits."""

    name = "test-stand-in"
    metric_names = {"fd": "fd_stand_in", "is": "is_stand_in", "kd": "kd_stand_in"}
    class_names = None
    has_spatial = False
    default_batch_size = 64
    feature_dim = 32
    weights_file = None  # set by the fixture: a real file, hashed and recorded like Inception's

    def __init__(self, device="cpu"):
        super().__init__(self.weights_file, device)
        state = torch.load(self.weights_file, weights_only=True)
        self.projection, self.classifier = state["projection"].to(self.device), state["classifier"].to(self.device)

    def _forward(self, images):
        x = torch.from_numpy(images).to(self.device).float().permute(0, 3, 1, 2) / 127.5 - 1
        pool = torch.relu(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.projection)
        return {"pool": pool, "logits": pool @ self.classifier}


def run(*args) -> None:
    status = main([str(a) for a in args])
    assert status == 0, f"dar {' '.join(map(str, args))} exited with {status}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Every stage once; the tests below check what each left behind."""
    root = tmp_path_factory.mktemp("imagenet_toy")
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, name in enumerate(["n01_stripes", "n02_discs"]):
        (root / "images" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = structured_image(label, rng)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
            images.append(pixels)
            labels.append(label)
    np.savez(root / "reference_images.npz", arr_0=np.stack(images), labels=np.array(labels))
    vae = save_vae(tiny_autoencoder(seed=0), root / "vae")
    other_vae = save_vae(tiny_autoencoder(seed=1), root / "other_vae")
    g = torch.Generator().manual_seed(0)
    StandInExtractor.weights_file = root / "stand_in.pt"
    torch.save({"projection": torch.randn(48, 32, generator=g), "classifier": torch.randn(32, 10, generator=g)},
               StandInExtractor.weights_file)

    run("prepare-latents", root / "images", "--out", root / "latents", "--vae", vae, "--resolution", RESOLUTION,
        "--device", DEVICE)
    for name, preset in PRESETS.items():
        run("train", "--preset", preset, "--run-dir", root / name, "--device", DEVICE, "--no-progress", *TRAIN,
            f"data.path={root / 'latents'}", f"data.vae={vae}")
        run("sample", root / name, "--num", NUM_SAMPLES, "--batch-size", 4, "--out", root / f"{name}_samples",
            "--grid", root / f"{name}_grid.png", "--device", DEVICE, "--no-progress")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(features._CLASSES, StandInExtractor.name, StandInExtractor)
        patch.setattr(eval_cli, "EXTRACTORS", (*eval_cli.EXTRACTORS, StandInExtractor.name))  # --extractor choices
        run("eval", root / "reference_images.npz", "--make-ref", root / "reference.npz",
            "--extractor", StandInExtractor.name, "--force", "--device", EVAL_DEVICE)
        run("eval", root / "dar_samples" / "samples.npz", "--ref", root / "reference.npz", "--force", "--device", EVAL_DEVICE)
    return {"root": root, "vae": vae, "other_vae": other_vae}


def test_prepare_latents_writes_a_dataset_the_trainer_reads(pipeline):
    root = pipeline["root"]
    manifest = json.loads((root / "latents" / "manifest.json").read_text())
    assert manifest["count"] == 2 * PER_CLASS and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["class_names"] == ["n01_stripes", "n02_discs"]
    assert manifest["vae"]["weights_sha256"] == weights_sha256(pipeline["vae"] / "diffusion_pytorch_model.safetensors")
    for name in PRESETS:
        config = json.loads((root / name / "config.json").read_text())
        assert config["data"]["name"] == "latents" and config["model"]["in_channels"] == 4
        assert config["data"]["vae"] == str(pipeline["vae"])
        losses = [json.loads(line)["loss"] for line in (root / name / "metrics.jsonl").read_text().splitlines()
                  if "loss" in line]
        assert losses and all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("name", list(PRESETS))
def test_training_grids_are_decoded_by_data_vae(pipeline, name):
    grid = Image.open(pipeline["root"] / name / "samples" / "step_0000004.png")
    assert grid.mode == "RGB" and grid.height >= 2 * RESOLUTION * 2  # two class rows of 64 px images, enlarged


@pytest.mark.parametrize("name", list(PRESETS))
def test_samples_are_decoded_images_recorded_with_their_vae(pipeline, name):
    root, vae = pipeline["root"], pipeline["vae"]
    with np.load(root / f"{name}_samples" / "samples.npz") as archive:
        images, labels = archive["arr_0"], archive["labels"]
    assert images.shape == (NUM_SAMPLES, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8
    assert images.std() > 0 and sorted(set(labels.tolist())) == [0, 1]
    record = json.loads((root / f"{name}_samples" / "samples.json").read_text())
    expected = weights_sha256(vae / "diffusion_pytorch_model.safetensors")
    assert record["vae"]["source"] == str(vae) and record["vae"]["weights_sha256"] == expected
    assert record["vae"]["scale_factor"] == pytest.approx(0.18215) and record["vae"]["config"]["latent_channels"] == 4
    assert record["image_shape"] == [RESOLUTION, RESOLUTION, 3]
    request = json.loads((root / f"{name}_samples" / "request.json").read_text())
    assert request["vae"]["weights_sha256"] == expected
    assert Image.open(root / f"{name}_grid.png").mode == "RGB"


def test_eval_measures_decoded_samples_and_keeps_the_vae_with_the_number(pipeline):
    root = pipeline["root"]
    result = json.loads((root / "dar_samples" / "samples.eval.json").read_text())
    assert math.isfinite(result["metrics"]["fd_stand_in"]) and result["metrics"]["fd_stand_in"] > 0
    assert result["settings"]["sample_shape"] == [RESOLUTION, RESOLUTION, 3]
    assert result["sampling"]["vae"]["weights_sha256"] == weights_sha256(
        pipeline["vae"] / "diffusion_pytorch_model.safetensors")
    assert result["sampling"]["sampler"]["method"] == "euler" and result["sampling"]["num_samples"] == NUM_SAMPLES


def test_a_rerun_with_another_vae_is_refused(pipeline, capsys):
    root = pipeline["root"]
    out = root / "dar_samples"
    before = (out / "samples.npz").read_bytes()
    status = main(["sample", str(root / "dar"), "--num", str(NUM_SAMPLES), "--batch-size", "4", "--out", str(out),
                   "--vae", str(pipeline["other_vae"]), "--device", DEVICE, "--no-progress"])
    assert status == 2
    assert "holds samples made with different settings (vae)" in capsys.readouterr().err
    assert (out / "samples.npz").read_bytes() == before


def test_a_latent_model_without_any_vae_says_to_pass_one(pipeline, tmp_path, capsys):
    root = pipeline["root"]
    run("train", "--preset", "imagenet256-b", "--run-dir", tmp_path / "run", "--device", DEVICE, "--no-progress",
        *TRAIN, "train.steps=1", "train.sample_every=1", f"data.path={root / 'latents'}")
    assert "no sample grids: the model makes 4-channel latents and data.vae" in capsys.readouterr().out
    assert not (tmp_path / "run" / "samples").exists()
    status = main(["sample", str(tmp_path / "run"), "--num", "2", "--out", str(tmp_path / "s"), "--device", DEVICE])
    assert status == 2
    assert "pass --vae FOLDER_OR_HUB_ID" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "run"), "--num", "2", "--grid", str(tmp_path / "g.png"), "--device", DEVICE,
                 "--vae", str(pipeline["vae"])]) == 0
    assert Image.open(tmp_path / "g.png").mode == "RGB"


def test_a_pixel_model_refuses_a_vae(tmp_path, capsys):
    run("train", "--preset", "fmnist", "--run-dir", tmp_path / "run", "--device", DEVICE, "--no-progress",
        "model.arch=SiT-Pico/8", "train.steps=1", "train.global_batch=4", "train.sample_every=0")
    status = main(["sample", str(tmp_path / "run"), "--num", "2", "--grid", str(tmp_path / "g.png"),
                   "--vae", "stabilityai/sd-vae-ft-ema", "--device", DEVICE])
    assert status == 2
    assert "pixels, which need no VAE; leave them out" in capsys.readouterr().err


def test_sampling_precision_is_recorded_and_part_of_the_request(pipeline, tmp_path, capsys):
    root, out = pipeline["root"], tmp_path / "bf16"
    args = ["sample", str(root / "dar"), "--num", "4", "--out", str(out), "--device", DEVICE, "--no-progress"]
    run(*args, "--precision", "bf16")
    record = json.loads((out / "samples.json").read_text())
    assert record["precision"] == "bf16" and json.loads((out / "request.json").read_text())["precision"] == "bf16"
    with np.load(out / "samples.npz") as archive:
        assert archive["arr_0"].shape == (4, RESOLUTION, RESOLUTION, 3)
    assert main(args) == 2  # fp32 into the bf16 samples' directory
    assert "different settings (precision)" in capsys.readouterr().err


def test_the_official_checkpoint_path(pipeline, tmp_path):
    """docs/IMAGENET.md step 2 at toy size: an official-format SiT state dict (learn_sigma, 1000 classes)
    -> `dar convert-sit ... data.vae=FOLDER` -> `dar sample` with SiT's FID settings, decoded by it."""
    from dar.models.sit import ModelConfig, build_model
    from dar.routing import RoutingConfig

    official = build_model(ModelConfig(arch="SiT-Pico/2", input_size=8, learn_sigma=True, num_classes=1000,
                                       routing=RoutingConfig(mode="residual")))
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save(official.state_dict(), tmp_path / "SiT-Pico-2.pt")
    weights, out = tmp_path / "sit.safetensors", tmp_path / "samples"
    run("convert-sit", tmp_path / "SiT-Pico-2.pt", "--arch", "SiT-Pico/2", "--out", weights, "model.input_size=8",
        f"data.vae={pipeline['vae']}")
    run("sample", weights, "--num", 4, "--out", out, "--labels", "random", "--precision", "tf32", "--device", DEVICE,
        "--no-progress", "sampler.method=sde", "sampler.steps=3", "sampler.cfg_scale=1.5", "sampler.cfg_channels=legacy3")
    record = json.loads((out / "samples.json").read_text())
    assert record["sampler"]["cfg_channels"] == "legacy3" and record["precision"] == "tf32"
    assert record["vae"]["weights_sha256"] == weights_sha256(pipeline["vae"] / "diffusion_pytorch_model.safetensors")
    with np.load(out / "samples.npz") as archive:
        assert archive["arr_0"].shape == (4, RESOLUTION, RESOLUTION, 3) and archive["labels"].max() < 1000
