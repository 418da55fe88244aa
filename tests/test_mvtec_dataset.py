"""The MVTec loader on real images (MVTec 3D-AD tire, DTD textures): items, LAS blend, masks, errors."""
import shutil

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

from datasets.mvtec import DatasetSplit, MVTecDataset
import utils
from utils import GlassError

SIZE = 64


@pytest.fixture(scope="module")
def train_set(tire_root, dtd_root):
    return MVTecDataset(tire_root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE)


@pytest.fixture(scope="module")
def test_set(tire_root, dtd_root):
    return MVTecDataset(tire_root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)


def make_class(tire_root, root, name="tire", n_train=3, defects=None, masks=True):
    """A small MVTec-layout class ``root/name`` copied from tire: {type: [image numbers]} defects."""
    defects = {"cut": [0, 1]} if defects is None else defects
    src = tire_root / "tire"
    (root / name / "train" / "good").mkdir(parents=True)
    for i in range(n_train):
        shutil.copy(src / "train" / "good" / f"{i:03d}.png", root / name / "train" / "good")
    (root / name / "test" / "good").mkdir(parents=True)
    shutil.copy(src / "test" / "good" / "000.png", root / name / "test" / "good")
    for kind, numbers in defects.items():
        (root / name / "test" / kind).mkdir(parents=True)
        if masks:
            (root / name / "ground_truth" / kind).mkdir(parents=True)
        for i in numbers:
            shutil.copy(src / "test" / kind / f"{i:03d}.png", root / name / "test" / kind)
            if masks:
                shutil.copy(src / "ground_truth" / kind / f"{i:03d}_mask.png", root / name / "ground_truth" / kind)
    return root


def test_train_item_shapes(train_set):
    assert len(train_set) == 239
    assert train_set.imagesize == (3, SIZE, SIZE)
    assert train_set.classname == "tire" and train_set.dataset_name == "mvtec" and train_set.distribution == 0
    np.random.seed(0)
    torch.manual_seed(0)
    item = train_set[0]
    assert set(item) == {"image", "aug", "mask_s", "mask_gt", "is_anomaly", "anomaly", "image_path", "beta", "index"}
    assert item["index"] == 0
    assert item["image"].shape == item["aug"].shape == (3, SIZE, SIZE)
    assert item["aug"].dtype == torch.float32
    assert item["mask_s"].shape == (SIZE // 8, SIZE // 8) and item["mask_s"].dtype == torch.float32
    assert item["mask_s"].max() == 1
    assert item["mask_gt"].shape == (1, SIZE, SIZE) and item["mask_gt"].max() == 0
    assert item["is_anomaly"] == 0 and item["anomaly"] == "good"
    assert item["image_path"].endswith("train/good/000.png")


def test_items_batch_in_a_dataloader(train_set, test_set):
    torch.manual_seed(0)
    batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=4, shuffle=True)))
    assert batch["aug"].shape == (4, 3, SIZE, SIZE) and batch["mask_s"].shape == (4, SIZE // 8, SIZE // 8)
    assert batch["beta"].shape == (4,) and len(batch["image_path"]) == 4
    batch = next(iter(torch.utils.data.DataLoader(test_set, batch_size=4)))
    assert batch["mask_gt"].shape == (4, 1, SIZE, SIZE) and batch["is_anomaly"].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aug_is_the_las_blend_of_image_and_texture(train_set, seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    item = train_set.make_train_item(seed)
    image, aug, texture, beta = item["image"], item["aug"], item["texture"], item["beta"]
    mask_l = item["mask_l"]
    assert 0.2 <= beta <= 0.8
    assert texture.shape == image.shape
    assert set(mask_l.unique().tolist()) <= {0.0, 1.0} and mask_l.shape == (SIZE, SIZE)
    outside, inside = mask_l == 0, mask_l == 1
    # Untouched outside the Perlin mask, a beta-blend of texture and image inside it.
    assert torch.equal(aug[:, outside], image[:, outside])
    blend = (1 - beta) * texture + beta * image
    assert torch.allclose(aug[:, inside], blend[:, inside], atol=1e-6)
    assert not torch.allclose(aug[:, inside], image[:, inside])
    pooled = torch.nn.functional.max_pool2d(mask_l[None, None], 8)[0, 0].float()
    assert torch.equal(item["mask_s"], pooled)

    # __getitem__ gives the same item for the same random state.
    np.random.seed(seed)
    torch.manual_seed(seed)
    public = train_set[seed]
    assert torch.equal(public["aug"], aug) and public["beta"] == beta


@pytest.mark.parametrize("mean, beta", [(0.0, 0.2), (1.0, 0.8)])
def test_blend_weight_beta_is_clipped_to_0_2_and_0_8(tire_root, dtd_root, mean, beta):
    data = MVTecDataset(tire_root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, mean=mean, std=1e-3)
    np.random.seed(0)
    torch.manual_seed(0)
    item = data.make_train_item(0)
    assert item["beta"] == beta
    inside = item["mask_l"] == 1
    blend = (1 - beta) * item["texture"] + beta * item["image"]
    assert torch.allclose(item["aug"][:, inside], blend[:, inside], atol=1e-6)


def test_perlin_masks_are_drawn_at_noise_scales_2_to_the_0_to_5_on_the_feature_grid(train_set, monkeypatch):
    import datasets.base

    calls = []

    def recording(img_shape, feat_size, min_scale, max_scale, mask_fg, flag=0):
        calls.append((tuple(img_shape), feat_size, min_scale, max_scale, flag))
        return perlin_mask(img_shape, feat_size, min_scale, max_scale, mask_fg, flag)

    perlin_mask = datasets.base.perlin_mask
    monkeypatch.setattr(datasets.base, "perlin_mask", recording)
    np.random.seed(0)
    torch.manual_seed(0)
    train_set.make_train_item(0)
    assert calls == [((3, SIZE, SIZE), SIZE // 8, 0, 6, 1)]  # the spec: scales 2 ** randint(0, 6)


def test_image_transform_is_the_references_pipeline(tire_root, dtd_root):
    from torchvision import transforms as T

    data = MVTecDataset(tire_root, dtd_root, classname="tire", resize=72, imagesize=SIZE, rotate_degrees=10,
                        translate=0.1, scale=0.2, brightness_factor=0.3, contrast_factor=0.4, saturation_factor=0.5,
                        gray_p=0.25, h_flip_p=0.5, v_flip_p=0.75)
    steps = data.transform_img.transforms
    assert [type(t) for t in steps] == [T.Resize, T.ColorJitter, T.RandomHorizontalFlip, T.RandomVerticalFlip,
                                        T.RandomGrayscale, T.RandomAffine, T.CenterCrop, T.ToTensor, T.Normalize]
    assert steps[0].size == 72 and steps[6].size == (SIZE, SIZE)
    assert (steps[1].brightness, steps[1].contrast, steps[1].saturation) == ((0.7, 1.3), (0.6, 1.4), (0.5, 1.5))
    assert (steps[2].p, steps[3].p, steps[4].p) == (0.5, 0.75, 0.25)
    affine = steps[5]
    assert (affine.degrees, affine.translate, affine.scale) == ([-10.0, 10.0], (0.1, 0.1), (0.8, 1.2))
    assert affine.interpolation == T.InterpolationMode.BILINEAR
    assert steps[8].mean == [0.485, 0.456, 0.406] and steps[8].std == [0.229, 0.224, 0.225]


def test_rand_aug_puts_three_distinct_texture_transforms_between_resize_and_crop(train_set):
    from torchvision import transforms as T

    # The spec's nine candidates, in their order: contrast, brightness, saturation + hue, hflip, vflip,
    # grayscale, autocontrast, equalize, rotation +-45.
    def describe(t):
        if isinstance(t, T.ColorJitter):
            return ("jitter", t.brightness, t.contrast, t.saturation, t.hue)
        if isinstance(t, T.RandomAffine):
            return ("affine", tuple(t.degrees))
        return (type(t).__name__, getattr(t, "p", None))

    spec = [("jitter", None, (0.8, 1.2), None, None), ("jitter", (0.8, 1.2), None, None, None),
            ("jitter", None, None, (0.8, 1.2), (-0.2, 0.2)), ("RandomHorizontalFlip", 1),
            ("RandomVerticalFlip", 1), ("RandomGrayscale", 1), ("RandomAutocontrast", 1), ("RandomEqualize", 1),
            ("affine", (-45.0, 45.0))]
    for seed in range(6):
        np.random.seed(seed)
        chosen = np.random.choice(9, 3, replace=False)  # three distinct ones, drawn from NumPy's generator
        np.random.seed(seed)
        steps = train_set.rand_augmenter().transforms
        assert isinstance(steps[0], T.Resize) and isinstance(steps[4], T.CenterCrop)
        assert [describe(t) for t in steps[1:4]] == [spec[i] for i in chosen]
        assert [type(t) for t in steps[5:]] == [T.ToTensor, T.Normalize]
    # The texture is resized as the images are (to `resize`, not to the crop size), then cropped to the image size.
    data = MVTecDataset(train_set.source, train_set.anomaly_source_path, classname="tire", resize=80, imagesize=SIZE)
    steps = data.rand_augmenter().transforms
    assert steps[0].size == 80 and steps[4].size == (SIZE, SIZE)


@pytest.mark.parametrize("option, turn", [("h_flip_p", PIL.Image.Transpose.FLIP_LEFT_RIGHT),
                                          ("v_flip_p", PIL.Image.Transpose.FLIP_TOP_BOTTOM)])
def test_train_time_flips_flip_the_training_images(tire_root, dtd_root, train_set, option, turn):
    # With probability 1 the flip always happens (between Resize and CenterCrop): the image transform of the
    # flipping dataset equals the plain transform of the flipped picture (same random draws).
    flipping = MVTecDataset(tire_root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, **{option: 1.0})
    picture = PIL.Image.open(train_set.data_to_iterate[0][2]).convert("RGB")
    torch.manual_seed(0)
    flipped = flipping.transform_img(picture)
    torch.manual_seed(0)
    assert torch.equal(flipped, train_set.transform_img(picture.transpose(turn)))
    torch.manual_seed(0)
    assert not torch.equal(flipped, train_set.transform_img(picture))


def test_without_rand_aug_textures_get_the_image_transform(tire_root, dtd_root):
    data = MVTecDataset(tire_root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, rand_aug=0)
    np.random.seed(0)
    item = data.make_train_item(0)
    assert item["texture_path"].startswith(str(dtd_root)) and item["texture_path"].endswith(".jpg")
    expected = data.transform_img(PIL.Image.open(item["texture_path"]).convert("RGB"))
    assert torch.equal(item["texture"], expected)


def test_with_rand_aug_textures_go_through_three_random_augmentations(train_set):
    # Replayed in the documented order of draws: image transform (torch), texture file and the three
    # augmentations (NumPy), texture transform (torch).
    for seed in range(3):
        np.random.seed(seed)
        torch.manual_seed(seed)
        item = train_set.make_train_item(0)
        np.random.seed(seed)
        torch.manual_seed(seed)
        train_set.transform_img(PIL.Image.open(train_set.data_to_iterate[0][2]).convert("RGB"))
        path = train_set.anomaly_source_paths[np.random.choice(len(train_set.anomaly_source_paths))]
        augmenter = train_set.rand_augmenter()
        picture = PIL.Image.open(path).convert("RGB")
        assert item["texture_path"] == path
        assert torch.equal(item["texture"], augmenter(picture))
        assert not torch.equal(item["texture"], train_set.transform_img(picture))


def test_test_items_carry_resized_masks(test_set):
    assert len(test_set) == 112
    kinds = [row[1] for row in test_set.data_to_iterate]
    assert kinds == sorted(kinds)
    for i in (0, 24, 40, 70, 90):
        item = test_set[i]
        classname, kind, image_path, mask_path = test_set.data_to_iterate[i]
        assert item["image"].shape == (3, SIZE, SIZE)
        assert item["mask_gt"].shape == (1, SIZE, SIZE)
        assert item["mask_gt"].min() >= 0 and item["mask_gt"].max() <= 1
        assert item["anomaly"] == kind and item["is_anomaly"] == int(kind != "good")
        assert torch.equal(item["aug"], torch.tensor([1])) and torch.equal(item["mask_s"], torch.tensor([1]))
        if kind == "good":
            assert mask_path is None and item["mask_gt"].max() == 0
        else:
            assert item["mask_gt"].max() > 0.5  # tiny defects may lose their exact-1 core at 64 px


def test_images_sorted_and_masks_paired_by_name(test_set):
    for kind in ("combined", "contamination", "cut", "good", "hole"):
        paths = [row[2] for row in test_set.data_to_iterate if row[1] == kind]
        assert paths == sorted(paths) and len(paths) > 0
    for _, kind, image_path, mask_path in test_set.data_to_iterate:
        if kind != "good":
            stem = image_path.rsplit("/", 1)[1][:-4]
            assert mask_path.endswith(f"ground_truth/{kind}/{stem}_mask.png")


def test_pairing_survives_an_extra_mask_and_other_mask_names(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path, defects={"cut": [2, 5]})
    gt = root / "tire" / "ground_truth" / "cut"
    shutil.copy(tire_root / "tire" / "ground_truth" / "cut" / "000_mask.png", gt)  # no image 000
    (gt / "005_mask.png").rename(gt / "005.png")  # the mask named like its image
    data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    pairs = {row[2].rsplit("/", 1)[1]: row[3] for row in data.data_to_iterate}
    assert pairs["002.png"].endswith("cut/002_mask.png")
    assert pairs["005.png"].endswith("cut/005.png")


def test_wood_and_toothbrush_are_enlarged_unless_judging(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path, name="wood")
    data = MVTecDataset(root, dtd_root, classname="wood", resize=SIZE, imagesize=SIZE)
    assert data.resize == round(SIZE * 329 / 288) == 73
    np.random.seed(0)
    torch.manual_seed(0)
    item = data[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["mask_s"].shape == (8, 8)
    judged = MVTecDataset(root, dtd_root, classname="wood", resize=SIZE, imagesize=SIZE, distribution=1)
    assert judged.resize == [SIZE, SIZE]
    assert judged[0]["image"].shape == (3, SIZE, SIZE)
    plain = MVTecDataset(tire_root, dtd_root, classname="tire", resize=80, imagesize=SIZE, split=DatasetSplit.TEST)
    assert plain.resize == 80
    # round(imagesize x 329 / 288): 329 at the paper's 288, 365.56 -> 366 at 320; toothbrush as wood.
    root = make_class(tire_root, tmp_path / "more", name="toothbrush")
    for imagesize, enlarged in ((288, 329), (320, 366)):
        data = MVTecDataset(root, dtd_root, classname="toothbrush", resize=imagesize, imagesize=imagesize)
        assert data.resize == enlarged
        assert data.transform_img.transforms[0].size == data.transform_mask.transforms[0].size == enlarged


def test_grayscale_and_odd_extensions(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path, n_train=1)
    good = root / "tire" / "train" / "good"
    PIL.Image.open(good / "000.png").convert("L").save(good / "001.JPG")
    (good / "notes.txt").write_text("not an image")
    data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE)
    assert [row[2].rsplit("/", 1)[1] for row in data.data_to_iterate] == ["000.png", "001.JPG"]
    item = data[1]
    assert item["image"].shape == (3, SIZE, SIZE)
    assert torch.allclose(item["image"][0] * 0.229 + 0.485, item["image"][2] * 0.225 + 0.406, atol=1e-5)


def write_fg_masks(root, names, width_share=0.5):
    """White left part, black right part, same size as each training image."""
    (root / "fg_mask" / "tire").mkdir(parents=True)
    for path in names:
        w, h = PIL.Image.open(path).size
        mask = np.zeros((h, w), np.uint8)
        mask[:, : int(w * width_share)] = 255
        PIL.Image.fromarray(mask).save(root / "fg_mask" / "tire" / path.name)


def test_foreground_masks_keep_anomalies_inside(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path)
    write_fg_masks(root, sorted((root / "tire" / "train" / "good").iterdir()))
    data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, fg=1)
    assert data.class_fg == 1
    for seed in range(3):
        np.random.seed(seed)
        torch.manual_seed(seed)
        item = data.make_train_item(seed % len(data))
        # Tire images are portrait: the crop keeps the whole width, so the left half is columns < 32;
        # the ceil (as in the reference) also keeps the antialiased border column 32.
        fg, mask_l = item["mask_fg"], item["mask_l"]
        assert set(fg.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(fg[:, : SIZE // 2 + 1], torch.ones(SIZE, SIZE // 2 + 1))
        assert fg[:, SIZE // 2 + 1 :].max() == 0
        assert torch.all(mask_l <= fg) and mask_l.max() == 1
        assert item["mask_s"][:, 5:].max() == 0


def test_preloaded_images_and_foreground_masks_give_the_same_items(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path)
    write_fg_masks(root, sorted((root / "tire" / "train" / "good").iterdir()))

    def items(preload: bool):
        data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, fg=1)
        kept = data.preload_images(2**30) if preload else 0
        utils.fix_seeds(0)
        return kept, data, [data.make_train_item(i) for i in (0, 1, 2, 1)]

    kept, data, preloaded = items(True)
    assert kept == 3 * (SIZE * 85 * 3 + SIZE * SIZE)  # the resized images and the cropped masks, a byte a value
    assert [m.dtype for m in data.foreground_masks] == [torch.uint8] * 3
    _, _, decoded = items(False)
    for a, b in zip(preloaded, decoded):
        for key in ("image", "aug", "mask_s", "mask_l", "mask_fg", "texture"):
            assert torch.equal(a[key], b[key]), key
        assert a["mask_fg"].dtype == torch.float32 and a["beta"] == b["beta"]
    data.release_images()
    assert data.resized_images is None and data.foreground_masks is None


def test_foreground_flag_from_the_xlsx(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path / "data")
    excel = tmp_path / "excel"
    excel.mkdir()
    table = pd.DataFrame({"Class": ["mvtec_tire"], "Distribution": [1], "Foreground": [0]})  # fg: the 2nd column
    table.to_excel(excel / "mvtec_distribution.xlsx", index=False)
    data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, fg=2, excel_dir=str(excel))
    assert data.class_fg == 0
    assert data[0]["aug"].shape == (3, SIZE, SIZE)
    # Not listed anywhere, with a hypothesis forced -> foreground masks (the reference's fallback), which this
    # class lacks.
    with pytest.raises(GlassError, match="--fg 0"):
        MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, fg=2, excel_dir=None,
                     distribution=2)
    # Not listed, --distribution 0 or 4: the trainer judges the class, and the Foreground flag it records decides.
    for distribution in (0, 4):
        data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, fg=2, excel_dir=None,
                            distribution=distribution)
        assert data.foreground_pending and data.class_fg == 0
        data.settle_foreground(0)
        assert not data.foreground_pending and data.class_fg == 0
        assert data[0]["aug"].shape == (3, SIZE, SIZE)
        with pytest.raises(GlassError, match=r"3 missing or unreadable foreground masks \(fg_mask/tire/000.png.*"
                                             r"judged as needing them \(--fg 2\)"):
            data.settle_foreground(1)


def test_a_foreground_mask_left_empty_by_the_centre_crop_is_a_user_error(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path, n_train=1)
    path = root / "tire" / "train" / "good" / "000.png"
    w, h = PIL.Image.open(path).size  # portrait: the crop of the resized image drops rows at the top and bottom
    assert h > w
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 20] = 255  # foreground only in the top rows, which the crop removes
    (root / "fg_mask" / "tire").mkdir(parents=True)
    PIL.Image.fromarray(mask).save(root / "fg_mask" / "tire" / path.name)
    data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, fg=1)
    with pytest.raises(GlassError, match="foreground mask .*000.png is empty after resizing and cropping"):
        data.make_train_item(0)
    with pytest.raises(GlassError, match="foreground mask .*000.png is empty after resizing and cropping"):
        data.preload_images(2**30)  # before training, when the trainer keeps the images
    assert data.resized_images is None


def test_items_are_the_files_resized_centre_cropped_and_normalised(tire_root, dtd_root):
    # By hand: shorter side to `resize` (PIL bilinear, the long side truncated), centre crop, /255, ImageNet
    # normalisation; the mask (non-zero = 255) resized and cropped the same way, without normalisation.
    resize = 80
    data = MVTecDataset(tire_root, dtd_root, classname="tire", resize=resize, imagesize=SIZE, split=DatasetSplit.TEST)
    index = next(i for i, row in enumerate(data.data_to_iterate) if row[1] == "cut")
    _, _, image_path, mask_path = data.data_to_iterate[index]
    item = data[index]

    def by_hand(picture):
        w, h = picture.size
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        picture = picture.resize(size, PIL.Image.BILINEAR)
        top, left = int(round((size[1] - SIZE) / 2)), int(round((size[0] - SIZE) / 2))
        return np.asarray(picture.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float64) / 255

    image = by_hand(PIL.Image.open(image_path).convert("RGB"))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((image - mean) / std).transpose(2, 0, 1)
    assert np.allclose(item["image"].numpy(), expected, atol=1e-5)
    binary = PIL.Image.fromarray(((np.asarray(PIL.Image.open(mask_path)) > 0) * 255).astype(np.uint8))
    mask = by_hand(binary)
    assert 0 < mask.mean() < 1 and np.allclose(item["mask_gt"][0].numpy(), mask, atol=1e-6)


def test_missing_foreground_masks_are_reported(tire_root, dtd_root):
    with pytest.raises(GlassError, match=r"fg_mask.*--fg 0"):
        MVTecDataset(tire_root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, fg=1)


def test_missing_data_path(dtd_root, tmp_path):
    with pytest.raises(GlassError, match="does not exist"):
        MVTecDataset(tmp_path / "nowhere", dtd_root, classname="tire")


def test_missing_class_lists_the_available_ones(tire_root, dtd_root):
    with pytest.raises(GlassError, match=r"'bottle' not found.*available classes are tire"):
        MVTecDataset(tire_root, dtd_root, classname="bottle")


def test_empty_training_folder(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path, n_train=0)
    with pytest.raises(GlassError, match="no training images"):
        MVTecDataset(root, dtd_root, classname="tire")


def test_texture_folder_without_jpg(tire_root, tmp_path):
    textures = tmp_path / "textures" / "banded"
    textures.mkdir(parents=True)
    (textures / "readme.txt").write_text("no images here")
    with pytest.raises(GlassError, match="holds no images"):
        MVTecDataset(tire_root, tmp_path / "textures", classname="tire", resize=SIZE, imagesize=SIZE)
    # The test split does not need textures.
    MVTecDataset(tire_root, tmp_path / "textures", classname="tire", split=DatasetSplit.TEST)


def test_defect_image_without_mask_has_unknown_ground_truth(tire_root, dtd_root, tmp_path, caplog):
    root = make_class(tire_root, tmp_path, defects={"cut": [0, 1, 2]})
    (root / "tire" / "ground_truth" / "cut" / "001_mask.png").unlink()
    with caplog.at_level("WARNING"):
        data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    assert data.unknown_masks == 1 and "1 of 3 defect test images have no mask" in caplog.text
    by_name = {row[2].rsplit("/", 1)[1]: i for i, row in enumerate(data.data_to_iterate) if row[1] == "cut"}
    assert torch.isnan(data[by_name["001.png"]]["mask_gt"]).all()
    assert not torch.isnan(data[by_name["002.png"]]["mask_gt"]).any()


def test_ground_truth_missing_entirely(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path, masks=False)
    data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    assert data.unknown_masks == 2
    assert all(row[3] is None for row in data.data_to_iterate)
    assert data[0]["mask_gt"].isnan().all() and data[len(data) - 1]["mask_gt"].max() == 0  # cut, then good


def test_corrupt_image_names_the_file(tire_root, dtd_root, tmp_path):
    root = make_class(tire_root, tmp_path)
    bad = root / "tire" / "test" / "cut" / "001.png"
    bad.write_bytes(b"\x89PNG garbage, not an image")
    with pytest.raises(GlassError, match=r"1 unreadable image \(tire/test/cut/001.png"):
        MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST)
    # Without the check (as main.py builds it), reading the item names the file.
    data = MVTecDataset(root, dtd_root, classname="tire", resize=SIZE, imagesize=SIZE, split=DatasetSplit.TEST,
                        check_layout=False)
    assert data.layout_problems
    index = [row[2] for row in data.data_to_iterate].index(str(bad))
    with pytest.raises(GlassError, match="cannot read image .*cut/001.png"):
        data[index]


def test_dataset_options_reach_the_loaders(tmp_path, tire_root, dtd_root):
    """Every `dataset` option, each at a value other than its default, arrives where it acts; the training loader
    shuffles, the test loader keeps the file order."""
    import main

    root = tmp_path / "data"
    make_class(tire_root, root, n_train=4)
    args = ["--distribution", "3", "--mean", "0.4", "--std", "0.05", "--fg", "0", "--rand_aug", "0", "--downsampling", "4",
            "--rotate_degrees", "5", "--translate", "0.1", "--scale", "0.2", "--brightness", "0.3", "--contrast", "0.4",
            "--saturation", "0.6", "--gray", "0.7", "--hflip", "0.8", "--vflip", "0.9", "--resize", "72", "--imagesize", "64",
            "--batch_size", "3", "--num_workers", "0", "-d", "tire", "mvtec", str(root), str(dtd_root)]
    _, get_dataloaders = main.dataset.invoke(main.dataset.make_context("dataset", args))
    [loaders] = get_dataloaders("ckpt", None)
    train, test = loaders["training"], loaders["testing"]
    data = train.dataset
    assert (data.distribution, data.mean, data.std, data.fg, data.rand_aug, data.downsampling) == (3, 0.4, 0.05, 0, 0, 4)
    assert data.augmentation == {"rotate_degrees": 5, "translate": 0.1, "scale": 0.2, "brightness": 0.3, "contrast": 0.4,
                                 "saturation": 0.6, "gray": 0.7, "hflip": 0.8, "vflip": 0.9}
    assert (data.resize, data.imgsize, test.dataset.resize, test.dataset.imgsize) == (72, 64, 72, 64)
    assert (train.batch_size, train.num_workers, test.batch_size) == (3, 0, 3)
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(test.sampler, torch.utils.data.SequentialSampler)
