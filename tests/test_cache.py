"""The frozen-backbone feature cache: same numbers with it as without it, and when it is (not) used; and the
same for GAS's frozen true half.

Runs use the tiny profile on the CPU. "Same" means bit-identical: results.csv, the best checkpoint's
tensors and every entry of ckpt.pth (optimiser states and random-generator states included).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import common
import glass
import model
import utils
from common import GlassError
from conftest import TINY_NET, copy_class_subset, run_main, tiny_dataset_args
from test_resume import CLASS_DIR, assert_same_outcome

# All training batches are used (limit above the training set), so every image's cached true features count.
NET = [*TINY_NET, "--limit", "100"]


@pytest.fixture(scope="module")
def odd_tire(tmp_path_factory, tire_root) -> Path:
    """17 training images: batches of 8, 8 and 1 (a lone image in the centre pass and in training)."""
    root = tmp_path_factory.mktemp("odd_tire")
    copy_class_subset(tire_root / "tire", root / "tire", n_train=17, n_good=3, n_per_defect=1)
    return root


def train(results: Path, data: Path, dtd: Path, *net_extra: str, dataset_extra=()) -> Path:
    assert run_main(["--results_path", results, *NET, *net_extra, *tiny_dataset_args(data, dtd, extra=dataset_extra)]) == 0
    return results


@pytest.fixture(scope="module")
def without_cache(tmp_path_factory, odd_tire, dtd_root) -> Path:
    return train(tmp_path_factory.mktemp("cache_off"), odd_tire, dtd_root, "--cache", "off")


def eval_grids(results: Path) -> list:
    """(epoch, PNG bytes) of the ``eval/samples`` grids a run logged to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(results / CLASS_DIR / "tb"), size_guidance={"images": 0}).Reload()
    return [(event.step, event.encoded_image_string) for event in tb.Images(utils.TB_SAMPLES_TAG)]


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_cache_gives_the_same_results_as_no_cache(tmp_path, without_cache, odd_tire, dtd_root, caplog, mode):
    caplog.set_level("INFO")
    results = train(tmp_path / mode, odd_tire, dtd_root, "--cache", mode)
    wanted = "in memory" if mode == "ram" else "on disk under"
    assert any("Feature cache: patch embeddings of 17 train + 7 test images" in r.message and wanted in r.message
               for r in caplog.records)
    assert_same_outcome(results, without_cache)
    assert not list(results.glob(common.CACHE_FOLDER_PREFIX + "*"))  # the disk cache is removed
    # The logged statistics (r_t, r_g, r_f measure distances to the centre, computed from the cached training
    # features) and the evaluations' TensorBoard grids (each test image beside its own map) are the same too.
    history = CLASS_DIR / "history.csv"
    assert (results / history).read_text() == (without_cache / history).read_text()
    assert eval_grids(results) == eval_grids(without_cache) and len(eval_grids(results)) == 2


def test_cached_layer_maps_give_the_same_results(tmp_path, without_cache, odd_tire, dtd_root, monkeypatch, caplog):
    caplog.set_level("INFO")
    monkeypatch.setattr(common, "CACHE_CONTENTS", ("maps", "embeddings"))  # as when the embeddings do not fit
    results = train(tmp_path, odd_tire, dtd_root, "--cache", "ram")
    assert "Feature cache: layer maps of 17 train + 7 test images" in caplog.text
    assert_same_outcome(results, without_cache)


def test_frozen_true_half_of_the_ascent_steps_changes_no_number(tmp_path, without_cache, odd_tire, dtd_root,
                                                                  monkeypatch, caplog):
    """GAS's ascent steps and final pass through glass.FrozenTrueHalf (the default) train to the bits of the plain
    passes, which run instead where the check finds other bits."""
    caplog.set_level("INFO")
    calls, finals = [], []
    frozen_gradient, frozen_final = glass.FrozenTrueHalf.gradient, glass.FrozenTrueHalf.final_scores
    monkeypatch.setattr(glass.FrozenTrueHalf, "gradient",
                        lambda self, feats: calls.append(self.by_hand) or frozen_gradient(self, feats))
    monkeypatch.setattr(glass.FrozenTrueHalf, "final_scores",
                        lambda self, feats: finals.append(len(feats)) or frozen_final(self, feats))
    frozen = train(tmp_path / "frozen", odd_tire, dtd_root, "--cache", "off")
    assert calls == [True] * (2 * 3 * 3 + 2)  # 2 epochs x 3 batches x --step 3, a check per batch size (8 and 1 images)
    # A final pass per training step (2 epochs of batches of 8, 8, 1 images), after the check's own for each batch size.
    assert finals == [8 * 64] * 3 + [64] * 2 + [8 * 64] * 2 + [64]
    assert "GAS:" not in caplog.text

    monkeypatch.setattr(glass, "ascent_pass_is_exact", lambda *args, **kwargs: False)
    refused = train(tmp_path / "refused", odd_tire, dtd_root, "--cache", "off")
    assert len(calls) == 20 and len(finals) == 8
    for patches in (8 * 64, 64):  # 8 x 8 positions per 64 px image
        assert f"GAS: on cpu the frozen true half would change the last bits for batches of {patches} patches" in caplog.text

    monkeypatch.setattr(glass.GLASS, "reuse_true_half", False)
    plain = train(tmp_path / "plain", odd_tire, dtd_root, "--cache", "off")
    assert len(calls) == 20 and len(finals) == 8
    for results in (plain, refused, without_cache):
        assert_same_outcome(frozen, results)


@pytest.fixture
def one_thread():
    """torch at one thread in this process (the DataLoader workers' count) during the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_workers_embedding_the_synthesised_images_changes_no_number(tmp_path, odd_tire, dtd_root, one_thread,
                                                                   monkeypatch, caplog):
    """With one torch thread on the CPU the DataLoader workers embed each batch's synthesised images
    (glass.EmbeddingCollate); the run equals one whose main process embeds them, lone last batch included."""
    caplog.set_level("INFO")
    embedded = []
    step = glass.GLASS._train_step
    monkeypatch.setattr(glass.GLASS, "_train_step",
                        lambda self, batch: embedded.append(glass.AUG_FEATURES in batch) or step(self, batch))
    workers = ("--num_workers", "2")
    in_workers = train(tmp_path / "workers", odd_tire, dtd_root, "--cache", "off", dataset_extra=workers)
    assert embedded == [True] * 6  # 2 epochs x batches of 8, 8 and 1 images
    assert "The DataLoader workers embed the synthesised images" in caplog.text

    embedded.clear()
    monkeypatch.setattr(glass.GLASS, "_workers_can_embed", lambda self, data: False)
    in_main = train(tmp_path / "main", odd_tire, dtd_root, "--cache", "off", dataset_extra=workers)
    assert embedded == [False] * 6
    assert_same_outcome(in_workers, in_main)
    history = CLASS_DIR / "history.csv"
    assert (in_workers / history).read_text() == (in_main / history).read_text()


def test_workers_embed_only_where_they_give_the_same_bits(tiny_tire, dtd_root, one_thread):
    """Not at more torch threads than the workers' one, not without workers, not with a trained backbone, not on
    another device, not with a loader's own collate_fn."""
    from datasets.mvtec import MVTecDataset

    data = MVTecDataset(str(tiny_tire), str(dtd_root), classname="tire", resize=64, imagesize=64, fg=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, num_workers=2)
    detector = glass.GLASS(torch.device("cpu"))
    detector.train_backbone = False
    assert detector._workers_can_embed(loader)
    synthesis = detector._synthesis_loader(loader)
    assert isinstance(synthesis.collate_fn, glass.EmbeddingCollate) and synthesis.sampler is loader.sampler
    assert (synthesis.batch_size, synthesis.num_workers) == (8, 2)

    assert not detector._workers_can_embed(torch.utils.data.DataLoader(data, batch_size=8, num_workers=0))
    assert not detector._workers_can_embed(torch.utils.data.DataLoader(data, batch_size=8, num_workers=2,
                                                                       collate_fn=lambda items: items))
    torch.set_num_threads(2)
    assert not detector._workers_can_embed(loader)
    assert detector._synthesis_loader(loader) is loader
    torch.set_num_threads(1)
    detector.train_backbone = True
    assert not detector._workers_can_embed(loader)
    detector.train_backbone, detector.device = False, torch.device("meta")
    assert not detector._workers_can_embed(loader)


@pytest.mark.skipif(not model.onednn_linear_available(), reason="this torch build has no oneDNN Linear kernel")
def test_onednn_trains_through_onednn_and_repeats_itself(tmp_path, odd_tire, dtd_root, monkeypatch, caplog):
    """--onednn: every ascent pass's matrix products and every Linear layer of the projection and discriminator go
    through oneDNN, without the exactness check (other last bits by choice); two runs give the same bits; a torch
    without oneDNN says so and runs as usual."""
    by_hand, routed = [], []
    onednn, apply = glass.onednn_linear, model.OneDNNLinear.apply
    monkeypatch.setattr(glass, "onednn_linear", lambda *args: by_hand.append(len(args[0])) or onednn(*args))
    monkeypatch.setattr(model.OneDNNLinear, "apply", lambda *args: routed.append(len(args[0])) or apply(*args))
    monkeypatch.setattr(glass, "ascent_pass_is_exact", lambda *args: pytest.fail("no check with --onednn"))
    first = train(tmp_path / "first", odd_tire, dtd_root, "--onednn")
    # 2 epochs x 3 batches (8, 8, 1 images of 64 patches): the true half once, then 2 products x --step 3.
    assert by_hand == [512] * 7 + [512] * 7 + [64] * 7 + [512] * 7 + [512] * 7 + [64] * 7
    # The projections (512 rows), the final GAS pass (both halves: 1024 rows); the evaluations (7 test images).
    assert {512, 1024, 64, 7 * 64} <= set(routed)
    assert '"onednn": true' in (first / CLASS_DIR / "config.json").read_text()
    second = train(tmp_path / "second", odd_tire, dtd_root, "--onednn")
    assert_same_outcome(first, second)

    # A deeper discriminator: no pass by hand, its autograd passes through oneDNN's Linear layers.
    by_hand.clear()
    routed.clear()
    train(tmp_path / "deep", odd_tire, dtd_root, "--meta_epochs", "1", "--limit", "1", "--onednn", "--dsc_layers", "3")
    assert by_hand == [] and 1024 in routed

    monkeypatch.undo()
    monkeypatch.setattr(glass, "onednn_linear_available", lambda: False)
    caplog.set_level("WARNING")
    train(tmp_path / "without", odd_tire, dtd_root, "--meta_epochs", "1", "--limit", "1", "--onednn")
    assert "--onednn: this torch build has no oneDNN Linear kernel: ignored" in caplog.text


def test_cache_is_bypassed_when_the_features_change(tmp_path, odd_tire, dtd_root, caplog):
    caplog.set_level("INFO")
    short = ["--meta_epochs", "1", "--limit", "1"]
    train(tmp_path / "backbone", odd_tire, dtd_root, *short, "--train_backbone")
    assert "Feature cache off: --train_backbone changes the backbone features every step" in caplog.text
    caplog.clear()
    train(tmp_path / "augmented", odd_tire, dtd_root, *short, dataset_extra=["--hflip", "0.5"])
    assert "training images not cached (train-time augmentation --hflip" in caplog.text
    assert "Feature cache: patch embeddings of 7 test images" in caplog.text


def test_a_train_backbone_class_warns_that_its_best_checkpoint_holds_no_backbone(tmp_path, odd_tire, dtd_root, caplog):
    caplog.set_level("WARNING")
    short = ["--meta_epochs", "1", "--limit", "1", "--train_backbone"]
    train(tmp_path, odd_tire, dtd_root, *short)  # the test after training uses the trained backbone: no warning
    assert "with the pretrained backbone" not in caplog.text
    assert run_main(["--results_path", tmp_path, "--test", "test", *NET, *short, *tiny_dataset_args(odd_tire, dtd_root)]) == 0
    assert "mvtec_tire: testing ckpt_best_0.pth with the pretrained backbone: the class was trained with " \
           "--train_backbone" in caplog.text
    caplog.clear()
    glass.load_trained(str(tmp_path / CLASS_DIR))
    assert "ckpt_best_0.pth of" in caplog.text and "with the pretrained backbone" in caplog.text


def test_speed_flags_parse_and_run_on_the_cpu(tmp_path, odd_tire, dtd_root, caplog):
    caplog.set_level("INFO")
    train(tmp_path, odd_tire, dtd_root, "--meta_epochs", "1", "--limit", "1", "--amp", "bf16", "--compile",
          "--channels_last", "--cache_dtype", "float16")
    assert "--amp bf16 needs a CUDA device: ignored on cpu" in caplog.text
    assert "--compile needs a CUDA device: ignored on cpu" in caplog.text
    assert re.search(r"Feature cache: (patch embeddings|layer maps) of \d+ train \+ \d+ test images, float16, ", caplog.text)
    config = json.loads((tmp_path / CLASS_DIR / "config.json").read_text())["net"]
    assert (config["channels_last"], config["amp"], config["compile"], config["cache_dtype"]) == (True, "bf16", True, "float16")


def test_plan_chooses_memory_then_disk_then_nothing(tmp_path, monkeypatch):
    sizes = {"embeddings": 8 * 2**30, "maps": 4 * 2**30}
    monkeypatch.setattr(common, "free_disk", lambda folder: 100 * 2**30)
    monkeypatch.setattr(common, "available_memory", lambda: 32 * 2**30)
    assert (common.plan_cache("auto", sizes, str(tmp_path)).storage,
            common.plan_cache("auto", sizes, str(tmp_path)).content) == ("ram", "embeddings")
    monkeypatch.setattr(common, "available_memory", lambda: 12 * 2**30)
    plan = common.plan_cache("auto", sizes, str(tmp_path))
    assert (plan.storage, plan.content, plan.nbytes) == ("ram", "maps", 4 * 2**30)  # the embeddings need more than half
    monkeypatch.setattr(common, "available_memory", lambda: 4 * 2**30)
    assert common.plan_cache("auto", sizes, str(tmp_path)).storage == "disk"
    with pytest.raises(common.GlassError, match="--cache ram needs 4.00 GB but 4.00 GB of memory is available"):
        common.plan_cache("ram", sizes, str(tmp_path))
    monkeypatch.setattr(common, "free_disk", lambda folder: 2**30)
    plan = common.plan_cache("auto", sizes, str(tmp_path))
    assert plan.storage == "off" and "more than half of the available memory" in plan.reason
    with pytest.raises(common.GlassError, match=r"--cache disk needs 4.90 GB of free disk space \(4.00 GB of features, "
                                                r"10 % more and 0.50 GB to spare\) but 1.00 GB is free under "):
        common.plan_cache("disk", sizes, str(tmp_path))
    # A nearly full small disk: the sizes in MB, not "needs 0.00 GB but 0.00 GB is free".
    monkeypatch.setattr(common, "free_disk", lambda folder: 150 * 2**10)
    with pytest.raises(common.GlassError, match=r"needs 0.50 GB of free disk space \(0.5 MB of features, .* but "
                                                r"0.1 MB is free"):
        common.plan_cache("disk", {"embeddings": 2**20, "maps": 2**19}, str(tmp_path))
    assert common.plan_cache("off", sizes, str(tmp_path)).storage == "off"


def test_plan_limits_are_inclusive_and_exact(tmp_path, monkeypatch):
    """RAM (auto) takes a cache of at most half the available memory; disk one whose size plus 10 % plus 512 MiB
    fits in the free space; unknown sizes are not held against a cache (RAM up to 1 GiB, disk always)."""
    gib = 2**30
    sizes = {"embeddings": 8 * gib, "maps": 6 * gib}
    monkeypatch.setattr(common, "free_disk", lambda folder: 0)
    monkeypatch.setattr(common, "available_memory", lambda: 16 * gib)
    plan = common.plan_cache("auto", sizes, str(tmp_path))
    assert (plan.storage, plan.content) == ("ram", "embeddings")  # exactly half
    monkeypatch.setattr(common, "available_memory", lambda: 16 * gib - 2)
    plan = common.plan_cache("auto", sizes, str(tmp_path))
    assert (plan.storage, plan.content) == ("ram", "maps")  # the embeddings need a byte more than half
    monkeypatch.setattr(common, "available_memory", lambda: 12 * gib - 2)
    disk_need = math.ceil(6 * gib * 1.1) + 512 * 2**20  # the maps on disk: 6 GiB + 10 % + 512 MiB
    monkeypatch.setattr(common, "free_disk", lambda folder: disk_need)
    plan = common.plan_cache("auto", sizes, str(tmp_path))
    assert (plan.storage, plan.content) == ("disk", "maps")
    monkeypatch.setattr(common, "free_disk", lambda folder: disk_need - 1)
    assert common.plan_cache("auto", sizes, str(tmp_path)).storage == "off"
    monkeypatch.setattr(common, "free_disk", lambda folder: None)
    assert common.plan_cache("auto", sizes, str(tmp_path)).storage == "disk"
    monkeypatch.setattr(common, "available_memory", lambda: None)
    assert common.plan_cache("ram", sizes, str(tmp_path)).storage == "ram"
    assert common.plan_cache("auto", sizes, str(tmp_path)).storage == "disk"
    small = {"embeddings": gib, "maps": gib // 2}
    assert (common.plan_cache("auto", small, str(tmp_path)).storage, common.plan_cache("auto", small, str(tmp_path)).content) \
        == ("ram", "embeddings")


def test_cache_size_counts_every_cached_image(tmp_path, odd_tire, dtd_root, monkeypatch):
    """The size put to the plan is that of all cached images (17 training + 7 test), as the cache holds them."""
    planned = []
    plan_cache = common.plan_cache
    monkeypatch.setattr(common, "plan_cache", lambda mode, sizes, folder: planned.append(sizes) or plan_cache(mode, sizes, folder))
    train(tmp_path, odd_tire, dtd_root, "--meta_epochs", "1", "--limit", "1", "--cache", "ram")
    [sizes] = planned
    # Tiny profile: 128-d embeddings on the 8 x 8 grid of a 64 px image, float32.
    assert sizes["embeddings"] == (17 + 7) * 8 * 8 * 128 * 4


def test_store_round_trip_in_memory_and_on_disk(tmp_path):
    rows = torch.randn(5, 6)
    for storage in ("ram", "disk"):
        store = common.FeatureStore(5, 6, "float32", storage, str(tmp_path / "rows.f32"))
        store.write([4, 0, 2], rows[[4, 0, 2]])
        store.write([1, 3], rows[[1, 3]])
        assert torch.equal(store.read([3, 1, 4]), rows[[3, 1, 4]])
        store.close()


def test_stale_disk_cache_of_a_dead_run_is_removed(tmp_path):
    pid = 2**22 - 1  # the highest process id Linux hands out: look down from there for one that is not running
    while pid > 1 and _running(pid):
        pid -= 1
    stale = tmp_path / f"{common.CACHE_FOLDER_PREFIX}{pid}-abc"
    stale.mkdir()
    (stale / "train.f32").write_bytes(b"0" * 16)
    alive = tmp_path / f"{common.CACHE_FOLDER_PREFIX}1-abc"  # process 1 is always running
    alive.mkdir()
    mine = common.make_cache_folder(str(tmp_path))
    assert not stale.exists() and alive.exists()
    assert os.path.basename(mine).startswith(f"{common.CACHE_FOLDER_PREFIX}{os.getpid()}-")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def test_predict_without_images_loads_them_on_demand(tmp_path, odd_tire, dtd_root):
    import main

    train(tmp_path, odd_tire, dtd_root, "--meta_epochs", "1", "--limit", "1")
    model, _ = glass.load_trained(str(tmp_path / CLASS_DIR))
    from datasets.mvtec import DatasetSplit, MVTecDataset

    test_set = MVTecDataset(str(odd_tire), str(dtd_root), classname="tire", split=DatasetSplit.TEST, resize=64, imagesize=64)
    loader = main.make_loader(test_set, 4, 0, shuffle=False)
    kept = model.predict(loader)
    lazy = model.predict(loader, keep_images=False)
    assert isinstance(lazy[0], glass.LazyImages) and len(lazy[0]) == len(kept[0])
    assert all(np.array_equal(lazy[0][i], kept[0][i]) for i in range(len(kept[0])))
    for a, b in zip(kept[1:], lazy[1:]):
        assert np.array_equal(a, b)


def test_preloaded_training_images_give_the_same_items_and_draws(odd_tire, dtd_root):
    """Decoding and resizing the training images once (preload_images) changes no item and no random draw."""
    from datasets.mvtec import DatasetSplit, MVTecDataset

    def items(preload: bool):
        dataset = MVTecDataset(str(odd_tire), str(dtd_root), classname="tire", resize=80, imagesize=64,
                               split=DatasetSplit.TRAIN, distribution=2, fg=0)
        kept = dataset.preload_images(2**30) if preload else 0
        utils.fix_seeds(3)
        out = [dataset[i] for i in (0, 5, 16, 5)] + [dataset.plain_image(i) for i in (2, 16)]
        return kept, out, (torch.rand(1), np.random.rand())

    kept, preloaded, draws_after = items(True)
    assert kept == 17 * 80 * 106 * 3  # 17 RGB images resized to a shorter side of 80 (tire is 4:3)
    not_kept, plain, plain_draws_after = items(False)
    assert not_kept == 0
    for a, b in zip(preloaded, plain):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
        else:
            assert torch.equal(a, b)
    assert torch.equal(draws_after[0], plain_draws_after[0]) and draws_after[1] == plain_draws_after[1]


@pytest.fixture(scope="module")
def few_textures(tmp_path_factory, dtd_root) -> Path:
    """A texture folder of 6 real DTD images in 2 categories, one of them an unreadable file."""
    root = tmp_path_factory.mktemp("few_textures")
    for category in sorted(p for p in dtd_root.iterdir() if p.is_dir())[:2]:
        (root / category.name).mkdir()
        for path in sorted(category.glob("*.jpg"))[:3]:
            shutil.copyfile(path, root / category.name / path.name)
    (root / category.name / "zz_broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.mark.parametrize("rand_aug, seed", [(1, 5), (0, 11)])  # seeds whose draws take each readable texture
def test_preloaded_textures_give_the_same_items_and_draws(odd_tire, few_textures, rand_aug, seed):
    """Decoding and resizing the textures once (preload_textures) changes no item and no random draw; the
    unreadable texture is not kept and still stops the item that draws it."""
    from datasets.mvtec import DatasetSplit, MVTecDataset

    def items(preload: bool):
        dataset = MVTecDataset(str(odd_tire), str(few_textures), classname="tire", resize=80, imagesize=64,
                               split=DatasetSplit.TRAIN, distribution=2, fg=0, rand_aug=rand_aug)
        kept = dataset.preload_textures(2**30) if preload else 0
        utils.fix_seeds(seed)
        out = [dataset.make_train_item(i) for i in (0, 5, 16, 5, 3, 9, 1, 0, 2, 4, 7, 11)]
        return kept, dataset, out, (torch.rand(1), np.random.rand())

    kept, dataset, preloaded, draws_after = items(True)
    sizes = [PIL.Image.open(path).size for path in sorted(few_textures.glob("*/*_0*.jpg"))]
    assert len(sizes) == 6 and len(dataset.resized_textures) == 6
    assert kept == sum(80 * int(80 * max(size) / min(size)) * 3 for size in sizes)  # RGB, shorter side 80
    assert not any(path.endswith("zz_broken.jpg") for path in dataset.resized_textures)
    _, _, plain, plain_draws_after = items(False)
    assert {item["texture_path"] for item in plain} == set(dataset.resized_textures)  # every kept one drawn
    for a, b in zip(preloaded, plain):
        for key in ("aug", "texture", "mask_l", "image"):
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
        assert a["texture_path"] == b["texture_path"] and a["beta"] == b["beta"]
    assert torch.equal(draws_after[0], plain_draws_after[0]) and draws_after[1] == plain_draws_after[1]
    broken = dataset.anomaly_source_paths.index(str(few_textures / sorted(os.listdir(few_textures))[-1] / "zz_broken.jpg"))
    dataset.anomaly_source_paths = [dataset.anomaly_source_paths[broken]]
    with pytest.raises(GlassError, match="zz_broken.jpg.*a texture of AUG_PATH"):
        dataset.make_train_item(0)


def test_a_run_with_preloaded_textures_equals_one_without(tmp_path, odd_tire, few_textures, monkeypatch, caplog):
    caplog.set_level("INFO")
    readable = tmp_path / "textures"
    shutil.copytree(few_textures, readable)
    next(readable.glob("*/zz_broken.jpg")).unlink()
    workers = ["--num_workers", "2"]  # forked workers that share the kept textures
    preloaded = train(tmp_path / "preloaded", odd_tire, readable, dataset_extra=workers)
    assert "Textures decoded and resized once: 6 textures" in caplog.text
    caplog.clear()
    monkeypatch.setattr(glass, "PRELOAD_MEMORY_SHARE", 0.0)
    decoded = train(tmp_path / "decoded", odd_tire, readable, dataset_extra=workers)
    assert "Textures decoded at every draw: kept, they would need more than" in caplog.text
    assert_same_outcome(preloaded, decoded)


def test_textures_are_kept_only_when_the_run_draws_more_than_there_are(odd_tire, dtd_root, few_textures):
    from datasets.mvtec import DatasetSplit, MVTecDataset

    model = glass.GLASS(torch.device("cpu"))
    model.sample_limit = 100
    for textures, epochs, kept in ((dtd_root, 2, False), (few_textures, 1, True), (dtd_root, 40, True)):
        dataset = MVTecDataset(str(odd_tire), str(textures), classname="tire", resize=64, imagesize=64,
                               split=DatasetSplit.TRAIN, distribution=2, fg=0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8)
        model._preload_training_images(loader, epochs=epochs)  # 17 images: 17 draws an epoch
        assert bool(dataset.resized_textures) == kept, (textures, epochs)


def test_preload_keeps_nothing_over_its_budget_or_for_spawned_workers(odd_tire, dtd_root, caplog):
    from datasets.mvtec import DatasetSplit, MVTecDataset

    caplog.set_level("INFO")
    dataset = MVTecDataset(str(odd_tire), str(dtd_root), classname="tire", resize=64, imagesize=64,
                           split=DatasetSplit.TRAIN, distribution=2, fg=0)
    assert dataset.preload_images(64 * 85 * 3 * 16) == 0 and dataset.resized_images is None  # room for 16 of 17
    model = glass.GLASS(torch.device("cpu"))
    model.sample_limit = 100
    spawned = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=1, multiprocessing_context="spawn")
    model._preload_training_images(spawned, epochs=1)
    assert dataset.resized_images is None
    forked = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=1, multiprocessing_context="fork")
    model._preload_training_images(forked, epochs=1)
    assert len(dataset.resized_images) == 17
    assert "Training images decoded and resized once: 17 images" in caplog.text


def test_a_run_with_preloaded_images_equals_one_without(tmp_path, odd_tire, dtd_root, monkeypatch, caplog):
    caplog.set_level("INFO")
    workers = ["--num_workers", "2"]  # forked workers that share the kept images
    preloaded = train(tmp_path / "preloaded", odd_tire, dtd_root, dataset_extra=workers)
    assert "Training images decoded and resized once: 17 images" in caplog.text
    monkeypatch.setattr(glass, "PRELOAD_MEMORY_SHARE", 0.0)
    decoded = train(tmp_path / "decoded", odd_tire, dtd_root, dataset_extra=workers)
    assert "Training images decoded at every epoch: kept, they would need more than" in caplog.text
    assert_same_outcome(preloaded, decoded)
