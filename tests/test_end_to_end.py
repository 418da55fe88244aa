"""Train -> test through the CLI on real images, and reproducibility of the results."""
import csv

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_NET, run_main, tiny_dataset_args


def read_results(path):
    with open(path / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_training_writes_checkpoints_logs_and_results(trained_tire):
    class_dir = trained_tire / "models" / "backbone_0" / "mvtec_tire"
    best = list(class_dir.glob("ckpt_best_*.pth"))
    assert len(best) == 1 and (class_dir / "ckpt.pth").is_file() and (class_dir / "config.json").is_file()
    events = list((class_dir / "tb").glob("events.out.tfevents.*"))
    assert events
    tags = EventAccumulator(str(class_dir / "tb")).Reload().Tags()["scalars"]
    assert {"loss", "p_true", "p_fake", "r_t", "r_g", "r_f", "i-auroc", "p-auroc"} <= set(tags)
    rows = read_results(trained_tire)
    assert [row["Row Names"] for row in rows] == ["mvtec_tire", "Mean"]
    assert list(rows[0]) == ["Row Names", "image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro", "best_epoch"]
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro"):
        assert 0.0 <= float(rows[0][key]) <= 1.0
    assert int(float(rows[0]["best_epoch"])) == int(best[0].stem.split("_")[-1])
    heatmaps = sorted((trained_tire / "eval" / "mvtec_tire").glob("*.png"))
    assert len(heatmaps) == 18  # one per test image


def test_the_results_row_is_the_metrics_of_the_best_checkpoint_s_predictions(trained_tire, tiny_tire, dtd_root):
    """The five numbers of results.csv, recomputed from the best checkpoint's scores and maps of the test images
    with scikit-learn and the PRO loop written out in test_metrics (not with the project's metrics code)."""
    import numpy as np
    import sklearn.metrics as skm

    import glass
    import main
    from datasets.mvtec import DatasetSplit, MVTecDataset
    from test_metrics import slow_pro

    model, _ = glass.load_trained(str(trained_tire / "models" / "backbone_0" / "mvtec_tire"))
    test_set = MVTecDataset(str(tiny_tire), str(dtd_root), classname="tire", split=DatasetSplit.TEST, resize=64,
                            imagesize=64)
    _, scores, maps, labels, masks = model.predict(main.make_loader(test_set, 8, 0, shuffle=False))
    scores, maps, masks = np.asarray(scores).ravel(), np.asarray(maps), np.asarray(masks)[:, 0]
    pixels = (masks.ravel() >= 1).astype(int)  # the reference counts a pixel as defective where its mask is 1
    expected = [skm.roc_auc_score(labels, scores), skm.average_precision_score(labels, scores),
                skm.roc_auc_score(pixels, maps.ravel()), skm.average_precision_score(pixels, maps.ravel()),
                slow_pro((masks >= 1).astype(np.uint8), maps)]
    row = read_results(trained_tire)[0]
    got = [float(row[key]) for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro")]
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0 < sum(labels) < len(labels) and 0 < pixels.sum() < pixels.size  # both kinds, so every metric means something


def test_the_best_checkpoint_loads_back_as_the_model_that_wrote_it(tmp_path, tiny_tire, dtd_root, monkeypatch):
    """Save -> load_trained gives back the model in memory: the test images' scores and anomaly maps, taken from the
    training model at the moment it writes its best checkpoint, are the loaded model's, bit for bit (a scaled or
    transposed weight or a lost BatchNorm statistic would move them)."""
    import os

    import numpy as np

    import glass
    import main
    from datasets.mvtec import DatasetSplit, MVTecDataset

    test_set = MVTecDataset(str(tiny_tire), str(dtd_root), classname="tire", split=DatasetSplit.TEST, resize=64,
                            imagesize=64)

    def scores_and_maps(model):
        _, scores, maps, _, _ = model.predict(main.make_loader(test_set, 8, 0, shuffle=False))
        return scores, maps

    when_saved = {}  # best checkpoint name -> the training model's scores and maps when it wrote that checkpoint
    save_epoch = glass.GLASS._save_epoch

    def save_epoch_noting_scores(model, epoch, weights, result, best_record, best_path, new_best):
        if new_best is not None:
            when_saved[os.path.basename(new_best)] = scores_and_maps(model)
        return save_epoch(model, epoch, weights, result, best_record, best_path, new_best)

    monkeypatch.setattr(glass.GLASS, "_save_epoch", save_epoch_noting_scores)
    assert run_main(["--results_path", tmp_path, *TINY_NET, *tiny_dataset_args(tiny_tire, dtd_root)]) == 0

    loaded, _ = glass.load_trained(str(tmp_path / "models" / "backbone_0" / "mvtec_tire"))
    scores, maps = when_saved[os.path.basename(loaded.checkpoint_path)]
    loaded_scores, loaded_maps = scores_and_maps(loaded)
    assert len(scores) == len(test_set) and maps.shape == (len(test_set), 64, 64) and np.ptp(scores) > 0
    assert np.array_equal(loaded_scores, scores) and np.array_equal(loaded_maps, maps)


def test_glass_finds_the_demo_defects(tmp_path):
    """A detector, not only a pipeline: on the demo's brick class (real photographs with painted-in defects, exact masks;
    README quick start) two short epochs at the demo's profile separate defective from good images and pixels."""
    from datasets import demo

    demo.build_demo_dataset(tmp_path, classes=["brick"], n_train=24, n_test_good=8, n_test_defect=8, n_textures=12)
    net = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "512",
           "--target_embed_dimension", "512", "--dsc_hidden", "512", "--meta_epochs", "2", "--step", "20", "--limit", "64"]
    dataset = ["dataset", "--distribution", "2", "--fg", "0", "--resize", "128", "--imagesize", "128", "--num_workers", "0",
               "-d", "brick", "mvtec", str(tmp_path / "demo"), str(tmp_path / "textures")]
    assert run_main(["--results_path", tmp_path / "results", *net, *dataset]) == 0
    row = read_results(tmp_path / "results")[0]
    assert float(row["image_auroc"]) >= 0.9 and float(row["pixel_auroc"]) >= 0.9 and float(row["pixel_pro"]) >= 0.5, row


def test_test_only_run_reproduces_the_best_epoch(trained_tire, tiny_tire, dtd_root):
    before = read_results(trained_tire)
    best = next((trained_tire / "models" / "backbone_0" / "mvtec_tire").glob("ckpt_best_*.pth"))
    tb = EventAccumulator(str(best.parent / "tb")).Reload()
    epoch = int(best.stem.split("_")[-1])
    training_iauroc = {e.step: e.value for e in tb.Scalars("i-auroc")}[epoch]
    training_pauroc = {e.step: e.value for e in tb.Scalars("p-auroc")}[epoch]

    assert run_main(["--results_path", trained_tire, "--test", "test", *TINY_NET, *tiny_dataset_args(tiny_tire, dtd_root)]) == 0
    after = read_results(trained_tire)
    assert after == before
    assert float(after[0]["image_auroc"]) == pytest.approx(training_iauroc, abs=1e-6)
    assert float(after[0]["pixel_auroc"]) == pytest.approx(training_pauroc, abs=1e-6)


def test_same_seed_twice_gives_identical_metrics(tmp_path, tiny_tire, dtd_root, trained_tire):
    args = [*TINY_NET, *tiny_dataset_args(tiny_tire, dtd_root)]
    assert run_main(["--results_path", tmp_path, *args]) == 0
    assert read_results(tmp_path) == read_results(trained_tire)


def _checkpoint(results) -> dict:
    import torch

    return torch.load(results / "models" / "backbone_0" / "mvtec_tire" / "ckpt.pth", weights_only=True)


def _same_weights(a: dict, b: dict) -> bool:
    import torch

    return all(torch.equal(a[part][key], b[part][key]) for part in ("discriminator", "pre_projection") for key in a[part])


def test_seeds_change_the_run(tmp_path, tiny_tire, dtd_root, trained_tire):
    """--seed and a backbone's NAME.seed-N each give another run than the default seed 0 (trained_tire)."""
    dataset = tiny_dataset_args(tiny_tire, dtd_root)
    assert run_main(["--results_path", tmp_path / "seed1", "--seed", "1", *TINY_NET, *dataset]) == 0
    seeded = [arg if arg != "efficientnet_lite0" else "efficientnet_lite0.seed-1" for arg in TINY_NET]
    assert run_main(["--results_path", tmp_path / "backbone_seed1", *seeded, *dataset]) == 0
    base, seed1, backbone_seed1 = _checkpoint(trained_tire), _checkpoint(tmp_path / "seed1"), _checkpoint(tmp_path / "backbone_seed1")
    assert not _same_weights(base, seed1) and not _same_weights(base, backbone_seed1)
    # The backbone's seed is set after the model is built (as in the reference): the initial weights come from --seed,
    # the training's random stream from N. So the two differ from each other too.
    assert not _same_weights(seed1, backbone_seed1)


def test_eval_epochs_evaluates_every_nth_epoch_only(tmp_path, tiny_tire, dtd_root):
    net = [arg if arg != "2" else "3" for arg in TINY_NET] + ["--eval_epochs", "2"]  # --meta_epochs 3
    assert "--meta_epochs" in net and net[net.index("--meta_epochs") + 1] == "3"
    assert run_main(["--results_path", tmp_path, *net, *tiny_dataset_args(tiny_tire, dtd_root)]) == 0
    class_dir = tmp_path / "models" / "backbone_0" / "mvtec_tire"
    with open(class_dir / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    assert [row["epoch"] for row in history] == ["0", "1", "2"]
    assert [bool(row["image_auroc"]) for row in history] == [False, True, False]  # after epochs 2 only (1-based)
    assert [path.name for path in class_dir.glob("ckpt_best_*.pth")] == ["ckpt_best_1.pth"]
    tb = EventAccumulator(str(class_dir / "tb")).Reload()
    assert [event.step for event in tb.Scalars("i-auroc")] == [1]


def test_a_second_backbone_writes_outputs_of_its_own(tmp_path, tiny_tire, dtd_root, caplog):
    """With two -b, backbone_1's results.csv row, heatmaps and plots carry `_backbone_1` beside backbone_0's (the
    reference names both rows alike and writes both sets of heatmaps into one folder). A damaged history.csv then
    costs the test its training curves only."""
    net = TINY_NET[:3] + ["-b", "efficientnet_lite0.seed-1"] + TINY_NET[3:]
    dataset = tiny_dataset_args(tiny_tire, dtd_root)
    assert run_main(["--results_path", tmp_path, *net, *dataset]) == 0
    assert [row["Row Names"] for row in read_results(tmp_path)] == ["mvtec_tire", "mvtec_tire_backbone_1", "Mean"]
    for name in ("mvtec_tire", "mvtec_tire_backbone_1"):
        assert len(list((tmp_path / "eval" / name).glob("*.png"))) == 18, name
        assert (tmp_path / "plots" / name / "training_curves.png").is_file(), name
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["mvtec_tire", "mvtec_tire_backbone_1"]

    plots = tmp_path / "plots" / "mvtec_tire"
    for png in plots.iterdir():
        png.unlink()
    (tmp_path / "models" / "backbone_0" / "mvtec_tire" / "history.csv").write_bytes(bytes(range(128, 256)))
    assert run_main(["--results_path", tmp_path, "--test", "test", *net, *dataset]) == 0
    assert sorted(p.name for p in plots.iterdir()) == ["pr.png", "roc.png", "score_histogram.png"]
    assert any("so no training curves are drawn" in r.getMessage() for r in caplog.records)
