"""Backbones: names, where the weights come from, and the offline EfficientNet-Lite0 weights on real photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import backbones
import utils


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty caches: HF_HUB_OFFLINE=1, a fresh TORCH_HOME and Hugging Face cache."""
    from huggingface_hub import constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv(backbones.WEIGHTS_ENV, raising=False)
    return tmp_path


def _imagenet_batch(*images: np.ndarray) -> torch.Tensor:
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize((224, 224)),
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])
    return torch.stack([transform(Image.fromarray(image).convert("RGB")) for image in images])


def test_efficientnet_lite0_bundled_weights_classify_real_photos(offline):
    from skimage import data

    model = backbones.load("efficientnet_lite0")
    assert not model.training
    with torch.no_grad():
        classes = model(_imagenet_batch(data.chelsea(), data.coffee())).argmax(dim=1)
    assert classes.tolist() == [285, 967]  # Egyptian cat, espresso


@pytest.mark.parametrize("name, expected", [
    ("resnet18.seed-3", ("resnet18", 3)),
    ("wideresnet50", ("wideresnet50", None)),
    ("vit_deit_base.seed-0", ("vit_deit_base", 0)),
    ("resnet18.seed-4294967295", ("resnet18", 4294967295)),  # NumPy's largest seed
])
def test_parse_backbone_name(name, expected):
    assert backbones.parse_backbone_name(name) == expected


def test_bad_seed_suffix_is_a_user_error():
    with pytest.raises(utils.GlassError, match="NAME.seed-N"):
        backbones.parse_backbone_name("resnet18.seed-x")


def test_unknown_name_suggests_close_matches_on_one_line():
    with pytest.raises(utils.GlassError) as info:
        backbones.load("wideresnet5")
    message = str(info.value)
    assert "\n" not in message
    assert "wideresnet50" in message and "backbones.py" in message


@pytest.mark.parametrize("name", ["mnasnet_100", "wideresnet50"])  # timm, torchvision
def test_missing_weights_offline_fail_fast_with_a_hint(offline, name):
    with pytest.raises(utils.GlassError) as info:
        backbones.load(name)
    message = str(info.value)
    assert "\n" not in message
    assert name in message and backbones.WEIGHTS_ENV in message


def test_cached_library_weights_are_used_without_network(offline):
    """A file already in the torch hub / Hugging Face cache is loaded as is, with HF_HUB_OFFLINE=1."""
    import torchvision
    from safetensors.torch import save_file

    reference = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    checkpoints = offline / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / url.rsplit("/", 1)[-1])
    model = backbones.load("resnet18")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)

    timm_reference = backbones.load("mnasnet_100", pretrained=False)
    snapshot = offline / "hf" / "models--timm--mnasnet_100.rmsp_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(timm_reference.state_dict(), str(snapshot / "model.safetensors"))
    model = backbones.load("mnasnet_100")
    assert torch.equal(model.conv_stem.weight, timm_reference.conv_stem.weight)


def test_local_weights_file_from_argument_and_env(offline, monkeypatch):
    from safetensors.torch import save_file

    reference = backbones.load("resnet18", pretrained=False)
    wrapped = offline / "wrapped.pth"
    torch.save({"state_dict": reference.state_dict()}, wrapped)
    model = backbones.load("resnet18", weights=wrapped)
    assert torch.equal(model.conv1.weight, reference.conv1.weight) and not model.training

    plain = offline / "plain.safetensors"
    save_file(reference.state_dict(), str(plain))
    monkeypatch.setenv(backbones.WEIGHTS_ENV, f"wideresnet50=/nowhere.pth,resnet18={plain}")
    assert torch.equal(backbones.load("resnet18").layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)

    monkeypatch.setenv(backbones.WEIGHTS_ENV, str(wrapped))
    with pytest.raises(utils.GlassError, match="does not fit backbone mnasnet_100"):
        backbones.load("mnasnet_100")
    monkeypatch.setenv(backbones.WEIGHTS_ENV, str(offline / "missing.pth"))
    with pytest.raises(utils.GlassError, match="not found"):
        backbones.load("resnet18")
    # An empty path after a name, a misspelt name: one line each, naming the entry.
    monkeypatch.setenv(backbones.WEIGHTS_ENV, f"resnet18=, wideresnet50={plain}")
    with pytest.raises(utils.GlassError, match="gives no file after 'resnet18=': write resnet18=<path"):
        backbones.load("resnet18")
    monkeypatch.setenv(backbones.WEIGHTS_ENV, f"resnet-18={plain}")
    with pytest.raises(utils.GlassError, match="'resnet-18' .* is not a backbone name"):
        backbones.load("resnet18")
    # A bare path holding '=' is still a path.
    odd = offline / "a=b"
    odd.mkdir()
    torch.save(reference.state_dict(), odd / "w.pth")
    monkeypatch.setenv(backbones.WEIGHTS_ENV, str(odd / "w.pth"))
    assert torch.equal(backbones.load("resnet18").conv1.weight, reference.conv1.weight)


def test_every_name_resolves_to_a_library_model_without_building():
    import timm
    import torchvision

    torchvision_models = set(torchvision.models.list_models())
    names = backbones.available()
    assert names == sorted(names) and {"wideresnet50", "efficientnet_lite0"} <= set(names)
    for name in names:
        entry = backbones.spec(name)
        if entry.library == "torchvision":
            assert entry.arch in torchvision_models, name
            assert "IMAGENET1K_V1" in torchvision.models.get_model_weights(entry.arch).__members__, name
        else:
            assert entry.library == "timm", name
            base, _, tag = entry.arch.partition(".")
            assert timm.list_models(base) == [base], f"{name}: {base} is not a current timm model"
            if tag:
                assert entry.arch in timm.list_pretrained(base + ".*"), name
    assert set(backbones.DEFAULT_LAYERS) <= set(names)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "mnasnet_100"])
def test_small_backbones_build_with_random_weights(name):
    model = backbones.load(name, pretrained=False)
    assert not model.training
    for layer in backbones.DEFAULT_LAYERS[name]:
        model.get_submodule(layer)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


# The torchvision names of the spec ("Features") and the reference's models behind them.
@pytest.mark.parametrize("name, arch", [
    ("wideresnet50", "wide_resnet50_2"), ("wideresnet101", "wide_resnet101_2"), ("resnet18", "resnet18"),
    ("resnet50", "resnet50"), ("resnet101", "resnet101"), ("resnext101", "resnext101_32x8d"), ("vgg11", "vgg11"),
    ("vgg19", "vgg19"), ("vgg19_bn", "vgg19_bn"), ("alexnet", "alexnet"),
])
def test_torchvision_names_are_the_references_models(name, arch):
    assert backbones.spec(name) == backbones.BackboneSpec("torchvision", arch)


def test_torchvision_backbones_get_the_imagenet1k_v1_weights_of_pretrained_true(offline, monkeypatch):
    # wide_resnet50_2 has a newer default (IMAGENET1K_V2); the reference's pretrained=True gave V1.
    import torchvision

    v1 = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1
    assert torchvision.models.Wide_ResNet50_2_Weights.DEFAULT != v1
    checkpoints = offline / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / v1.url.rsplit("/", 1)[-1]).write_bytes(b"cached")  # in the cache: no download attempted
    asked = []
    monkeypatch.setattr(torchvision.models, "get_model",
                        lambda arch, weights=None: asked.append((arch, weights)) or torch.nn.Identity())
    backbones.load("wideresnet50")
    assert asked == [("wide_resnet50_2", v1)]


def test_local_weights_in_other_wrappings_of_a_state_dict(offline, monkeypatch):
    reference = backbones.load("resnet18", pretrained=False)
    # {"model": ...} and DataParallel's "module." prefix are unwrapped.
    wrapped = offline / "data_parallel.pth"
    torch.save({"model": {f"module.{key}": value for key, value in reference.state_dict().items()}}, wrapped)
    model = backbones.load("resnet18", weights=wrapped)
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    # pretrained=False ignores GLASS_BACKBONE_WEIGHTS: random weights, not the file's.
    monkeypatch.setenv(backbones.WEIGHTS_ENV, str(wrapped))
    assert torch.equal(backbones.load("resnet18").conv1.weight, reference.conv1.weight)
    assert not torch.equal(backbones.load("resnet18", pretrained=False).conv1.weight, reference.conv1.weight)
    # Tensors of another shape (a 10-class head) are refused in one line, naming how many.
    state = reference.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    torch.save(state, offline / "ten_classes.pth")
    with pytest.raises(utils.GlassError, match=r"does not fit backbone resnet18: 0 missing keys.*2 of another shape"):
        backbones.load("resnet18", weights=offline / "ten_classes.pth")


def test_efficientnet_pytorch_key_names_are_mapped_by_position_and_kind(offline):
    reference = backbones.load("efficientnet_lite0", pretrained=False)
    entries = [(key, value) for key, value in reference.state_dict().items() if not key.endswith("num_batches_tracked")]
    # Other names, same order (as efficientnet_pytorch's files): each tensor keeps its kind (weight, bias, ...).
    renamed = {("_conv_stem.weight" if i == 0 else f"_part{i}.{key.rsplit('.', 1)[-1]}"): value
               for i, (key, value) in enumerate(entries)}
    torch.save(renamed, offline / "renamed.pth")
    model = backbones.load("efficientnet_lite0", weights=offline / "renamed.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    # A bias listed before its weight (same shape) would land on the weight: refused.
    keys = list(renamed)
    first_bn = next(i for i, (key, _) in enumerate(entries) if key.startswith("bn1."))
    assert entries[first_bn][0] == "bn1.weight" and entries[first_bn + 1][0] == "bn1.bias"
    keys[first_bn], keys[first_bn + 1] = keys[first_bn + 1], keys[first_bn]
    torch.save({key: renamed[key] for key in keys}, offline / "misordered.pth")
    with pytest.raises(utils.GlassError, match="weights for efficientnet_lite0 do not fit"):
        backbones.load("efficientnet_lite0", weights=offline / "misordered.pth")


def test_a_timm_checkpoint_that_needs_conversion_goes_through_timms_loader(offline):
    # A ViT-S/16 checkpoint trained at 112 px: 7 x 7 position embeddings where the 224 px model has 14 x 14.
    # The keys fit but one shape does not; timm's checkpoint filter resamples it.
    reference = backbones.load("vit_small", pretrained=False)
    state = reference.state_dict()
    grid = state["pos_embed"][:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    small = torch.nn.functional.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(1, 49, -1)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], small], dim=1)
    torch.save(state, offline / "vit_112.pth")
    model = backbones.load("vit_small", weights=offline / "vit_112.pth")
    assert model.pos_embed.shape == reference.pos_embed.shape and not model.training
    assert torch.equal(model.pos_embed[:, 0], reference.pos_embed[:, 0])  # the class token's position is kept
    assert torch.equal(model.blocks[3].mlp.fc1.weight, reference.blocks[3].mlp.fc1.weight)
