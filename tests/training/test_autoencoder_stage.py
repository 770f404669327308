"""``maisi.train autoencoder`` on the tiny VAE and crops of a real CT."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi.checkpoints import load_network
from maisi.data.io import Volume, read_volume, write_volume
from maisi.errors import InputError
from maisi.families.ct import get_preset
from maisi.intensity import hu_to_unit
from maisi.train import main
from maisi.training.autoencoder import discriminator_fits, kl_divergence
from maisi.training.ct_data import CTVolumes, PatchDraw, check_images, draw_patches
from maisi.training.loop import StepBatches, step_seed
from maisi.training.perceptual import (
    _medicalnet_backbone,
    _MedicalNetSimilarity,
    build_perceptual_loss,
    detect_perceptual_type,
)
from tests.conftest import write_config

CT = Path(__file__).resolve().parents[1] / "data" / "totalseg_example_ct_sm.nii.gz"  # 122 x 101 x 30


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 3D convolutions: one thread is faster, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """Crops of the real CT (RAS geometry kept): two training volumes, a one-patch volume, a validation
    volume."""
    root = tmp_path_factory.mktemp("ct")
    ct = read_volume(CT)

    def crop(name: str, x: int, y: int, size: tuple[int, int, int]) -> None:
        sx, sy, sz = size
        affine = ct.affine.copy()
        affine[:3, 3] = ct.affine[:3, :3] @ np.array([x, y, 4.0]) + ct.affine[:3, 3]
        write_volume(
            root / f"{name}.nii.gz", Volume(ct.array[x : x + sx, y : y + sy, 4 : 4 + sz].copy(), affine)
        )

    crop("train_a", 40, 30, (40, 36, 24))
    crop("train_b", 30, 40, (36, 40, 26))
    crop("one_patch", 52, 42, (16, 16, 16))
    crop("val", 45, 35, (32, 28, 18))
    return root


def make_config(
    tmp_path: Path, crops: Path, images: list[tuple[str, int]], name: str = "train.json", **changes
) -> Path:
    """A train config on a datalist of ``(crop name, fold)``; fold 1 validates when any case has it."""
    datalist = tmp_path / "datalist.json"
    entries = [{"image": f"{image}.nii.gz", "fold": fold} for image, fold in images]
    datalist.write_text(json.dumps({"training": entries}))
    autoencoder = {"patch_size": [16, 16, 16], "val_roi_size": [16, 16, 16], "adversarial_weight": 0.0}
    autoencoder.update(changes.pop("autoencoder", {}))
    data = {
        "preset": "tiny-rflow",
        "datalist": str(datalist),
        "data_root": str(crops),
        "fold": 1 if any(f == 1 for _, f in images) else None,
        "output_dir": str(tmp_path / "run"),
        "steps": 3,
        "checkpoint_every": 1000,
        "validate_every": 1000,
        "log_every": 1,
        "device": "cpu",
        "autoencoder": autoencoder,
    }
    data.update(changes)
    return write_config(tmp_path / name, data)


def scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_equal_tensors(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


TRAIN = [("train_a", 0), ("train_b", 0), ("val", 1)]


def test_training_writes_a_checkpoint_that_loads_and_validates(tmp_path, crops, caplog):
    config = make_config(tmp_path, crops, TRAIN, steps=3)
    assert main(["autoencoder", "--config", str(config)]) == 0
    run = tmp_path / "run"
    network, weights = load_network(get_preset("tiny-rflow"), "autoencoder", run / "autoencoder.pt")  # strict
    assert weights.source_format == "maisi" and (run / "state" / "last.pt").is_file()
    assert any((run / "tensorboard").iterdir()) and len(scalars(run, "train/recon")) == 3
    assert "perceptual loss off: no local weights given ($.autoencoder.perceptual_weights)" in caplog.text
    assert "adversarial loss off" in caplog.text
    found = re.search(r"step 3 validation: psnr (\S+), ssim (\S+)", caplog.text)
    assert found, caplog.text
    psnr, ssim = float(found.group(1)), float(found.group(2))
    assert math.isfinite(psnr) and psnr > 0 and math.isfinite(ssim) and -1 <= ssim <= 1
    assert scalars(run, "val/psnr") == [pytest.approx(psnr, rel=1e-3)]


def test_decoder_only_finetune_keeps_the_encoder_bit_identical(tmp_path, crops, capsys):
    first = make_config(tmp_path, crops, TRAIN, steps=2)
    assert main(["autoencoder", "--config", str(first)]) == 0
    base = tmp_path / "run" / "autoencoder.pt"
    (tmp_path / "t").mkdir()
    (tmp_path / "a").mkdir()
    tuned = make_config(
        tmp_path / "t",
        crops,
        TRAIN,
        steps=3,
        output_dir=str(tmp_path / "tuned"),
        init={"autoencoder": str(base)},
        optimizer={"lr": 1e-2},
        autoencoder={"train_decoder_only": True},
    )
    assert main(["autoencoder", "--config", str(tuned)]) == 0
    before, after = state_dict_of(base), state_dict_of(tmp_path / "tuned" / "autoencoder.pt")
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv_mu.", "quant_conv_log_sigma."))]
    decoder = [
        k for k in before if k.startswith(("decoder.", "post_quant_conv.")) and before[k].is_floating_point()
    ]
    assert encoder and decoder
    assert all(torch.equal(before[k], after[k]) for k in encoder)  # the latent space is untouched
    assert any(not torch.equal(before[k], after[k]) for k in decoder)  # the decoder trained
    # without the VAE to keep, the option is refused up front
    alone = make_config(
        tmp_path / "a",
        crops,
        TRAIN,
        output_dir=str(tmp_path / "alone"),
        autoencoder={"train_decoder_only": True},
    )
    assert main(["autoencoder", "--config", str(alone)]) == 2
    assert "$.autoencoder.train_decoder_only: needs $.init.autoencoder" in capsys.readouterr().err


def test_validation_is_deterministic_and_gives_images_in_unit_range(tmp_path, crops):
    from maisi.config import load_config
    from maisi.training.autoencoder import AutoencoderStage

    config = load_config(make_config(tmp_path, crops, TRAIN), "train")
    stage = AutoencoderStage(
        config,
        get_preset("tiny-rflow"),
        crops,
        [(0, {"image": "train_a.nii.gz"})],
        [(2, {"image": "val.nii.gz"})],
        torch.device("cpu"),
    )
    first, images = stage.validate(stage.model)
    torch.manual_seed(123)  # validation must not depend on the random state
    second, _ = stage.validate(stage.model)
    assert first == second and set(first) == {"psnr", "ssim"}
    assert set(images) == {"input", "reconstruction"}
    for image in images.values():
        assert image.dtype == np.float32 and image.shape == (28, 32) and 0 <= image.min() and image.max() <= 1
    assert stage.reconstruct(stage.model, stage.val_volumes[0]).shape == (1, 32, 28, 18)


def test_validation_psnr_is_the_pipelines_round_trip_of_the_checkpoint(tmp_path, crops):
    """Default validation scores the whole-volume round trip of maisi.encode / infer / evaluate (exact
    tiles, here many of them); MAISI's sliding windows, on request, score something else."""
    from monai.metrics import PSNRMetric

    from maisi.evaluation.run import reconstruct

    config = make_config(tmp_path, crops, TRAIN, steps=3, autoencoder={"val_memory_budget_mb": 16})
    assert main(["autoencoder", "--config", str(config)]) == 0
    vae, _ = load_network(get_preset("tiny-rflow"), "autoencoder", tmp_path / "run" / "autoencoder.pt")
    val = torch.from_numpy(hu_to_unit(read_volume(crops / "val.nii.gz").array))[None, None]
    expected = float(PSNRMetric(max_val=1.0)(reconstruct(vae.eval(), val, 4, 1024), val).item())
    assert scalars(tmp_path / "run", "val/psnr") == [pytest.approx(expected, abs=1e-3)]

    (tmp_path / "sw").mkdir()
    windows = make_config(
        tmp_path / "sw",
        crops,
        TRAIN,
        steps=3,
        output_dir=str(tmp_path / "run_sw"),
        autoencoder={"val_method": "sliding_window", "val_roi_size": [16, 16, 16]},
    )
    assert main(["autoencoder", "--config", str(windows)]) == 0
    # same weights (validation does not touch training), other score: only the method differs
    assert_equal_tensors(
        state_dict_of(tmp_path / "run_sw" / "autoencoder.pt"),
        state_dict_of(tmp_path / "run" / "autoencoder.pt"),
    )
    assert scalars(tmp_path / "run_sw", "val/psnr") != [pytest.approx(expected, abs=0.05)]


def test_loss_falls_when_overfitting_one_batch(tmp_path, crops):
    # a 16^3 volume and a 16^3 patch: every step sees the same batch
    config = make_config(
        tmp_path,
        crops,
        [("one_patch", 0)],
        steps=60,
        tensorboard=True,
        optimizer={"lr": 1e-3, "grad_clip": None},
    )
    assert main(["autoencoder", "--config", str(config)]) == 0
    recon = scalars(tmp_path / "run", "train/recon")
    assert len(recon) == 60
    first, last = np.mean(recon[:10]), np.mean(recon[-10:])
    assert last < 0.7 * first, (first, last)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, crops, caplog):
    gan = {"patch_size": [24, 24, 24], "adversarial_weight": 0.1, "adversarial_warmup_steps": 2}
    images = [("train_a", 0), ("train_b", 0)]
    straight = make_config(
        tmp_path, crops, images, "a.json", steps=6, output_dir=str(tmp_path / "a"), autoencoder=gan
    )
    assert main(["autoencoder", "--config", str(straight)]) == 0
    first = make_config(
        tmp_path, crops, images, "b.json", steps=3, output_dir=str(tmp_path / "b"), autoencoder=gan
    )
    assert main(["autoencoder", "--config", str(first)]) == 0
    # the validation method and its sizes may change on resume, and so may how the images are read (held or
    # read per draw, by worker processes): none of them moves the weights
    validation = {"val_method": "sliding_window", "val_roi_size": [24, 24, 24], "val_memory_budget_mb": 64}
    loader = {"num_workers": 2, "cache_rate": 0.0}
    more = make_config(
        tmp_path,
        crops,
        images,
        "b.json",
        steps=6,
        output_dir=str(tmp_path / "b"),
        autoencoder={**gan, **validation},
        loader=loader,
    )
    assert main(["autoencoder", "--config", str(more), "--resume"]) == 0
    assert "2 training and 0 validation volumes (0 and 0 held in memory)" in caplog.text
    assert "adversarial loss on: PatchDiscriminator (8 channels), weight 0.1, from step 2" in caplog.text
    a, b = state_dict_of(tmp_path / "a" / "autoencoder.pt"), state_dict_of(tmp_path / "b" / "autoencoder.pt")
    assert_equal_tensors(a, b)
    sa = torch.load(tmp_path / "a" / "state" / "last.pt", weights_only=True)["stage_state"]
    sb = torch.load(tmp_path / "b" / "state" / "last.pt", weights_only=True)["stage_state"]
    assert sa["step"] == sb["step"] == 6 and "discriminator" in sa
    saved = torch.load(tmp_path / "b" / "state" / "last.pt", weights_only=True)
    assert not [k for k in saved if k.startswith("rng")]  # (seed, step, rank) is all a resumed run needs
    assert_equal_tensors(sa["discriminator"], sb["discriminator"])
    assert_equal_tensors(sa["discriminator_optimizer"]["state"], sb["discriminator_optimizer"]["state"])
    # the adversarial terms ran after the warm-up, and only then
    assert len(scalars(tmp_path / "a", "train/generator_adv")) == 4
    assert len(scalars(tmp_path / "a", "train/discriminator")) == 4


@pytest.fixture
def medicalnet_weights(tmp_path) -> Path:
    """MedicalNet ResNet10 weights in their release layout (random values; MONAI's ResNet,
    pretrained=False)."""
    from monai.networks.nets.resnet import ResNetFeatures

    torch.manual_seed(0)
    sd = ResNetFeatures("resnet10", pretrained=False, spatial_dims=3, in_channels=1).state_dict()
    path = tmp_path / "medicalnet_resnet10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    return path


def test_perceptual_loss_from_local_weights(tmp_path, crops, medicalnet_weights, caplog):
    perceptual = {"perceptual_weights": str(medicalnet_weights), "perceptual_weight": 0.3}
    config = make_config(tmp_path, crops, [("train_a", 0)], steps=2, autoencoder=perceptual)
    assert main(["autoencoder", "--config", str(config)]) == 0
    assert (
        f"perceptual loss on: medicalnet_resnet10_23datasets network (3D) from {medicalnet_weights}"
        in caplog.text
    )
    values = scalars(tmp_path / "run", "train/perceptual")
    assert len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values)


def test_perceptual_weights_of_the_wrong_shape_exit_2(tmp_path, crops, medicalnet_weights, capsys):
    sd = torch.load(medicalnet_weights, weights_only=True)["state_dict"]
    sd["module.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    config = make_config(tmp_path, crops, [("train_a", 0)], autoencoder={"perceptual_weights": str(bad)})
    assert main(["autoencoder", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "perceptual_weights" in err and str(bad) in err and "layer1.0.conv1.weight" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "state").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"conv1.weight": torch.zeros(3, 3)}, "not the weights of a supported perceptual network"),
        ([1, 2, 3], "holds no state_dict"),
        (b"not a checkpoint", "not a readable weights file"),
    ],
)
def test_unusable_perceptual_files_are_input_errors(tmp_path, content, message):
    from maisi.errors import CheckpointError

    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        build_perceptual_loss(path)
    with pytest.raises(CheckpointError, match="file not found"):
        build_perceptual_loss(tmp_path / "missing.pth")


def test_medicalnet_perceptual_is_finite_on_a_patch_of_pure_air():
    similarity = _MedicalNetSimilarity(_medicalnet_backbone(10))
    air, noise = torch.zeros(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    assert torch.isfinite(similarity(air, noise)).all() and similarity(air, air).abs().max() == 0


class _StandInLPIPS(torch.nn.Module):
    """The interface and state_dict layout of ``lpips.LPIPS`` (``net.slice1``..., ``lin0``...``lin6``
    holding ``model.1``) on a tiny network: lpips needs torchvision, which does not install beside the CPU
    torch CI uses, so the suite checks our side (recognising the file, the strict load, the 2.5D loss around
    the module) with this instead of the real package."""

    def __init__(self, *, pretrained: bool, net: str, pnet_rand: bool, verbose: bool):
        super().__init__()
        assert not pretrained and pnet_rand and net == "squeeze"  # what maisi asks for: nothing downloaded
        self.net = torch.nn.Module()
        self.net.slice1 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1))
        for i in range(7):
            setattr(self, f"lin{i}", torch.nn.Module())
            getattr(self, f"lin{i}").model = torch.nn.Sequential(
                torch.nn.Dropout(), torch.nn.Conv2d(4, 1, 1, bias=False)
            )

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        a, b = (self.net.slice1(x.expand(-1, 3, -1, -1)) for x in (in0, in1))
        return self.lin0.model[1]((a - b) ** 2).mean(dim=(2, 3), keepdim=True)  # (N, 1, 1, 1) as LPIPS


def test_lpips_weights_are_recognised_and_loaded_without_download(tmp_path, monkeypatch):
    lpips = type(sys)("lpips")
    lpips.LPIPS = _StandInLPIPS
    monkeypatch.setitem(sys.modules, "lpips", lpips)
    torch.manual_seed(0)
    sd = _StandInLPIPS(pretrained=False, net="squeeze", pnet_rand=True, verbose=False).state_dict()
    assert detect_perceptual_type(sd) == "squeeze"
    torch.save(sd, tmp_path / "squeeze.pth")
    loss, kind = build_perceptual_loss(tmp_path / "squeeze.pth")
    assert kind == "squeeze" and loss.is_fake_3d and loss.fake_3d_ratio == 0.2
    assert torch.equal(loss.perceptual_function.lin0.model[1].weight, sd["lin0.model.1.weight"])
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.isfinite(loss(x, torch.rand_like(x))) and loss(x, x) == 0


@pytest.mark.parametrize(
    ("package", "state_dict", "says"),
    [
        (
            "lpips",
            {
                "net.slice1.0.weight": torch.zeros(4, 3, 3, 3),
                "lin0.model.1.weight": torch.zeros(1, 4, 1, 1),
                "lin5.model.1.weight": torch.zeros(1, 4, 1, 1),
            },
            "LPIPS-squeeze weights",
        ),
        (
            "torchvision",
            {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)},
            "torchvision ResNet50 weights",
        ),
    ],
)
def test_weights_whose_package_is_not_installed_are_refused_naming_it(
    tmp_path, monkeypatch, package, state_dict, says
):
    """CI's case (neither lpips nor torchvision installs beside its CPU torch): the file is recognised and
    refused with the package to install, never a download nor a traceback."""
    monkeypatch.setitem(sys.modules, package, None)  # import fails as when not installed
    torch.save(state_dict, tmp_path / "weights.pth")
    with pytest.raises(InputError, match=f"{tmp_path / 'weights.pth'} holds {says}.*pip install {package}"):
        build_perceptual_loss(tmp_path / "weights.pth")


def test_missing_and_unreadable_images_are_listed_at_once(tmp_path, crops, capsys):
    broken = tmp_path / "data"
    broken.mkdir()
    (broken / "garbage.nii.gz").write_bytes(b"not an image")
    (broken / "ok.nii.gz").write_bytes((crops / "train_a.nii.gz").read_bytes())
    datalist = [("ok", 0), ("absent", 0), ("garbage", 1)]
    config = make_config(tmp_path, crops, datalist, data_root=str(broken))
    assert main(["autoencoder", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "2)" in err and "absent.nii.gz: file not found" in err and "$.training[1].image" in err
    assert "garbage.nii.gz" in err and "$.training[2].image (validation)" in err and "Traceback" not in err


@pytest.mark.parametrize("cache_rate", [1.0, 0.0])
def test_a_ct_with_nan_voxels_is_refused_by_name(cache_rate, tmp_path, crops, capsys):
    """Held images are checked before the first step (nothing written); an image read per draw when it is
    read, in a worker process, and the message still reaches the user without a traceback."""
    data = tmp_path / "data"
    data.mkdir()
    ct = read_volume(crops / "train_a.nii.gz")
    array = ct.array.astype(np.float32)
    array[3, 4, 5] = np.nan
    write_volume(data / "nan.nii.gz", Volume(array, ct.affine))
    config = make_config(tmp_path, data, [("nan", 0)], loader={"cache_rate": cache_rate, "num_workers": 2})
    assert main(["autoencoder", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"$.training[0].image (training): {data / 'nan.nii.gz'} holds 1 NaN/infinite voxels" in err, err
    assert "Traceback" not in err
    assert (tmp_path / "run").exists() == (cache_rate == 0.0)  # found while training: the run had started
    assert not (tmp_path / "run" / "state").exists()


def test_each_process_holds_its_share_and_only_the_first_validates(tmp_path, crops, caplog):
    from maisi.config import load_config
    from maisi.distributed import Ranks
    from maisi.training.autoencoder import AutoencoderStage

    config = load_config(make_config(tmp_path, crops, TRAIN), "train")
    entries = [(0, {"image": "train_a.nii.gz"}), (1, {"image": "train_b.nii.gz"})]
    val = [(2, {"image": "val.nii.gz"})]
    second = AutoencoderStage(
        config, get_preset("tiny-rflow"), crops, entries, val, torch.device("cpu"), Ranks(1, 2)
    )
    assert len(second.volumes) == 1 and second.volumes.held == 1  # the second of two images
    assert torch.equal(second.volumes[0], _volumes(crops, ["train_b"], min_size=None)[0])
    assert (
        second.val_volumes.held == 0 and len(second.val_volumes) == 1
    )  # validation images: read when needed


def test_too_small_patch_for_the_discriminator_is_an_input_error(tmp_path, crops, capsys):
    config = make_config(tmp_path, crops, [("train_a", 0)], autoencoder={"adversarial_weight": 0.1})
    assert main(["autoencoder", "--config", str(config)]) == 2
    assert (
        "$.autoencoder.patch_size: [16, 16, 16] is too small for the PatchDiscriminator"
        in capsys.readouterr().err
    )
    assert not discriminator_fits((20, 24, 24)) and discriminator_fits((24, 24, 24))


def _volumes(crops: Path, names: list[str], cache_rate: float = 1.0, min_size=(24, 24, 24)) -> CTVolumes:
    items, problems = check_images(
        [(i, {"image": f"{n}.nii.gz"}) for i, n in enumerate(names)], crops, "training"
    )
    assert not problems
    return CTVolumes(items, min_size, cache_rate)


def test_patches_come_from_the_generator_given_and_small_volumes_are_padded(crops):
    volumes = _volumes(crops, ["one_patch", "val"])
    assert [tuple(volumes[i].shape) for i in range(2)] == [(1, 24, 24, 24), (1, 32, 28, 24)]
    assert volumes[0][0, 0, 0, 0] == 0.0  # padding is -1000 HU
    a = draw_patches(volumes, 3, (24, 24, 24), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    b = draw_patches(volumes, 3, (24, 24, 24), generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 1, 24, 24, 24) and torch.equal(a, b)


def test_a_steps_batch_is_the_draw_the_global_generator_made_before_workers(crops):
    """The batch of step s, drawn in a worker, equals what the loop drew in-process with the global
    generator seeded for step s before the DataLoader existed, and the stream continues where that draw left
    it: the demo recipe trains the shipped weights tensor for tensor."""
    volumes = _volumes(crops, ["train_a", "train_b", "one_patch"], cache_rate=0.0)
    draw = PatchDraw(volumes, 3, (24, 24, 24), 0.6)  # min_foreground: redraws, so several draws per patch
    data = StepBatches(draw, seed=5, rank=1, steps=10)
    for step in (0, 7):
        drawn, batch, state = data[step]
        torch.manual_seed(step_seed(5, step, 1))
        before = draw_patches(volumes, 3, (24, 24, 24), 0.6)  # the old path: global generator
        assert drawn == step and torch.equal(batch, before) and torch.equal(state, torch.get_rng_state())
    assert not torch.equal(data[0][1], data[1][1])


def test_cache_rate_0_holds_no_image_and_reads_one_per_draw(crops, monkeypatch):
    import maisi.training.ct_data as ct_data

    reads = []
    monkeypatch.setattr(ct_data, "read_volume", lambda path: reads.append(path) or read_volume(path))
    held = _volumes(crops, ["train_a", "train_b"], cache_rate=1.0)
    assert held.held == 2 and len(reads) == 2
    PatchDraw(held, 4, (24, 24, 24), 0.0)(torch.Generator().manual_seed(0))
    assert len(reads) == 2  # patches of held images read nothing
    lazy = _volumes(crops, ["train_a", "train_b"], cache_rate=0.0)
    assert lazy.held == 0 and len(reads) == 2  # nothing read up front: headers only
    from_disk = PatchDraw(lazy, 4, (24, 24, 24), 0.0)(torch.Generator().manual_seed(0))
    assert 2 < len(reads) <= 6  # read when drawn, at most once per patch (not again for a repeated image)
    from_memory = PatchDraw(held, 4, (24, 24, 24), 0.0)(torch.Generator().manual_seed(0))
    assert torch.equal(from_disk, from_memory)


def test_min_foreground_redraws_patches_of_outside_air():
    volume = torch.zeros(1, 64, 16, 16)  # -1000 HU ...
    volume[:, 32:] = 0.5  # ... but for a block of tissue (0 HU) in one half
    torch.manual_seed(3)
    uniform = draw_patches([volume], 40, (16, 16, 16))
    torch.manual_seed(3)
    tissue = draw_patches([volume], 40, (16, 16, 16), min_foreground=0.5)
    fraction = lambda batch: (batch > 0.025).float().mean(dim=(1, 2, 3, 4))  # noqa: E731
    assert (fraction(uniform) < 0.5).sum() > 10  # about half of the uniform draws are mostly air
    assert (fraction(tissue) >= 0.5).all()


def test_kl_matches_the_closed_form():
    mu, sigma = torch.zeros(2, 4, 3, 3, 3), torch.ones(2, 4, 3, 3, 3)
    assert kl_divergence(mu, sigma) == 0
    mu[0] = 1.0  # 0.5 * 108 voxels * 1 for the first sample, 0 for the second -> mean 27
    assert kl_divergence(mu, sigma).item() == pytest.approx(27.0)


def test_stage_volumes_list_every_problem_at_once_and_hold_validation_on_the_main_process_only(crops):
    from maisi.distributed import Ranks
    from maisi.errors import InputError
    from maisi.training.ct_data import read_stage_volumes

    def check(entries, what):
        return check_images(entries, crops, what)

    def hold(items, min_size, rate):
        return CTVolumes(items, min_size, rate)

    def read(train, val, ranks=None):
        ranks = ranks or Ranks()
        return read_stage_volumes(train, val, check, hold, (24, 24, 24), 1.0, ranks, "autoencoder", "none")

    with pytest.raises(InputError) as e:
        read([(0, {"image": "gone.nii.gz"})], [(1, {"image": "lost.nii.gz"})])
    assert "autoencoder datalist problems (2)" in str(e.value)
    assert "$.training[0].image (training)" in str(e.value) and "lost.nii.gz" in str(e.value)
    with pytest.raises(InputError, match="^none$"):
        read([], [(1, {"image": "val.nii.gz"})])
    volumes, val = read([(0, {"image": "one_patch.nii.gz"})], [(1, {"image": "val.nii.gz"})])
    assert (len(volumes), volumes.held, tuple(volumes[0].shape)) == (1, 1, (1, 24, 24, 24))
    assert (len(val), val.held) == (1, 1)
    _, val = read([(0, {"image": "one_patch.nii.gz"})], [(1, {"image": "val.nii.gz"})], Ranks(1, 2, 1))
    assert (len(val), val.held) == (1, 0)  # the other process reads its validation cases when asked
