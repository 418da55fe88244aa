"""GLASS: training loop, evaluation and inference around the feature pipeline and discriminator.

One training step (paper Sec. 3, spec "Training"):
  * true features  u   = projection(embed(image))
  * LAS features   u+  = projection(embed(synthesised image)), labelled by the Perlin mask ``mask_s``
  * GAS features   g   = u + N(0, noise), pushed by ``step`` normalised gradient-ascent steps on the
                        discriminator's loss and truncated every 5 steps to a band around u (manifold,
                        ``svd 0``) or around the class centre c (hypersphere, ``svd 1``)
  * loss = BCE(D(u), 0) + BCE(D(g), 1) + focal(D(u+), mask_s) on the hardest ``p`` share of u+.
"""
from __future__ import annotations

import glob
import logging
import math
import os
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import tqdm
from torch.utils.tensorboard import SummaryWriter

import backbones
import common
import metrics
import utils
from loss import FocalLoss
from model import Discriminator, Projection
from utils import GlassError

LOGGER = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("discriminator", "pre_projection")
CONFIG_NAME = "config.json"
# The `net` options that shape the model (the rest only affect training).
MODEL_OPTIONS = (
    "pretrain_embed_dimension", "target_embed_dimension", "patchsize", "dsc_layers", "dsc_hidden", "pre_proj",
)
BEST_CHECKPOINT_PATTERN = re.compile(r"ckpt_best_(\d+)\.pth$")


# --------------------------------------------------------------------------------------------------
# The two synthesis strategies and hard-sample mining, written as the paper's equations.

def quantile_radius(distances: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of the distances as a detached one-element tensor (r_t, r_g, r_f)."""
    return torch.quantile(distances.detach(), q=q).reshape(1)


def truncate_to_band(points: torch.Tensor, anchors: torch.Tensor, low, high, norm: torch.Tensor | None = None):
    """Move each point along its direction from its anchor so that the distance lies in [low, high]."""
    offset = points - anchors
    length = torch.norm(offset, dim=1) if norm is None else norm
    scale = (torch.clamp(length, low, high) / (length + 1e-10)).view(-1, 1)
    return anchors + scale * offset


class GASResult(NamedTuple):
    """Outcome of global anomaly synthesis: the last step's loss and scores, the features and r_g."""

    bce_loss: torch.Tensor
    true_scores: torch.Tensor
    gaus_scores: torch.Tensor
    gaus_feats: torch.Tensor
    r_g: torch.Tensor


def global_anomaly_synthesis(
    discriminator: torch.nn.Module,
    true_feats: torch.Tensor,
    center: torch.Tensor,
    r_t: torch.Tensor,
    noise_std: float,
    steps: int,
    svd: int,
    mining: int,
    radius: float,
) -> GASResult:
    """GAS: Gaussian features moved by gradient ascent on the discriminator's loss, then truncated.

    Returns the BCE loss of the last step (true -> 0, synthetic -> 1), the true and synthetic scores
    of that step, the synthetic features, and r_g, the ``radius`` quantile of their distance to c.
    """
    noise = torch.normal(0, noise_std, true_feats.shape).to(true_feats.device)
    gaus_feats = true_feats + noise
    r_g = torch.zeros(1, device=true_feats.device)
    bce = torch.nn.BCELoss()
    for step in range(steps + 1):
        scores = discriminator(torch.cat([true_feats, gaus_feats]))
        true_scores, gaus_scores = scores[: len(true_feats)], scores[len(true_feats):]
        true_loss = bce(true_scores, torch.zeros_like(true_scores))
        gaus_loss = bce(gaus_scores, torch.ones_like(gaus_scores))
        bce_loss = true_loss + gaus_loss
        if step == steps:
            break
        if mining == 0:
            dist_g = torch.norm(gaus_feats - center, dim=1)
            r_g = quantile_radius(dist_g, radius)
            break

        grad = torch.autograd.grad(gaus_loss, [gaus_feats])[0]
        grad_normalized = grad / (torch.norm(grad, dim=1).view(-1, 1) + 1e-10)
        with torch.no_grad():
            gaus_feats.add_(0.001 * grad_normalized)

        if (step + 1) % 5 == 0:
            dist_g = torch.norm(gaus_feats - center, dim=1)
            r_g = quantile_radius(dist_g, radius)
            if svd == 1:  # hypersphere: distance to the centre within [r_t, 2 r_t]
                gaus_feats = truncate_to_band(gaus_feats, center, r_t, 2 * r_t, norm=dist_g)
            else:  # manifold: distance to the true feature within [0.5, 1]
                gaus_feats = truncate_to_band(gaus_feats, true_feats, 0.5, 1.0)
    return GASResult(bce_loss, true_scores, gaus_scores, gaus_feats, r_g)


def local_anomaly_synthesis(
    fake_feats: torch.Tensor, mask: torch.Tensor, center: torch.Tensor, r_t: torch.Tensor, svd: int, radius: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LAS features of the Perlin-masked patches; with ``svd 1`` they are pushed to [2 r_t, 4 r_t] from c.

    Returns the (possibly adjusted) features and r_f, the ``radius`` quantile of the masked
    features' distance to the centre.
    """
    inside = mask[:, 0] == 1
    masked_feats, masked_center = fake_feats[inside], center[inside]
    dist_f = torch.norm(masked_feats - masked_center, dim=1)
    r_f = quantile_radius(dist_f, radius)
    if svd == 1:
        pushed = truncate_to_band(masked_feats, masked_center, 2 * r_t, 4 * r_t, norm=dist_f)
        fake_feats = fake_feats.index_put((inside,), pushed)
    return fake_feats, r_f


def hard_sample_mining(scores: torch.Tensor, labels: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the samples whose squared error is at or above its ``p`` quantile (all of them if p <= 0)."""
    if p <= 0:
        return scores, labels
    error = (scores - labels) ** 2
    keep = error >= torch.quantile(error, q=p)
    return scores[keep].unsqueeze(1), labels[keep].unsqueeze(1)


# --------------------------------------------------------------------------------------------------

class GLASS(torch.nn.Module):
    """The GLASS detector: frozen backbone features, feature adaptor and discriminator, plus its training."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def load(
        self,
        backbone: torch.nn.Module,
        layers_to_extract_from: Sequence[str],
        device: torch.device,
        input_shape: Sequence[int],
        pretrain_embed_dimension: int,
        target_embed_dimension: int,
        patchsize: int = 3,
        patchstride: int = 1,
        meta_epochs: int = 640,
        eval_epochs: int = 1,
        dsc_layers: int = 2,
        dsc_hidden: int = 1024,
        dsc_margin: float = 0.5,
        train_backbone: bool = False,
        pre_proj: int = 1,
        mining: int = 1,
        noise: float = 0.015,
        radius: float = 0.75,
        p: float = 0.5,
        lr: float = 0.0001,
        svd: int = 0,
        step: int = 20,
        limit: int = 392,
        **kwargs,
    ) -> None:
        """Build the feature pipeline, projection, discriminator and their optimisers."""
        self.backbone = backbone.to(device)
        self.layers_to_extract_from = list(layers_to_extract_from)
        self.input_shape = tuple(input_shape)
        self.device = device
        self.embedder = common.PatchEmbedder(
            self.backbone,
            self.layers_to_extract_from,
            device,
            input_shape,
            pretrain_embed_dimension,
            target_embed_dimension,
            patchsize=patchsize,
            patchstride=patchstride,
            train_backbone=train_backbone,
        ).to(device)
        self.patch_maker = self.embedder.patch_maker
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension

        self.meta_epochs = meta_epochs
        self.lr = lr
        self.train_backbone = train_backbone
        if train_backbone:
            self.backbone_opt = torch.optim.AdamW(self.backbone.parameters(), lr)

        self.pre_proj = pre_proj
        if pre_proj > 0:
            self.pre_projection = Projection(target_embed_dimension, target_embed_dimension, pre_proj).to(device)
            self.proj_opt = torch.optim.Adam(self.pre_projection.parameters(), lr, weight_decay=1e-5)

        self.eval_epochs = eval_epochs
        self.dsc_layers = dsc_layers
        self.dsc_hidden = dsc_hidden
        self.discriminator = Discriminator(target_embed_dimension, n_layers=dsc_layers, hidden=dsc_hidden).to(device)
        self.dsc_opt = torch.optim.AdamW(self.discriminator.parameters(), lr=lr * 2)
        self.dsc_margin = dsc_margin

        self.c = torch.tensor(0)
        self.p = p
        self.radius = radius
        self.mining = mining
        self.noise = noise
        self.svd = svd
        self.step = step
        self.limit = limit
        self.distribution = 0
        self.judged_distribution: Optional[int] = None
        self.focal_loss = FocalLoss()
        self.anomaly_segmentor = common.RescaleSegmentor(device=device, target_size=self.input_shape[-2:])

        self.results_path = "results"
        self.excel_dirs: List[str] = []
        self.ckpt_dir = ""
        self.logger: Optional[SummaryWriter] = None
        self.global_step = 0

    # ----------------------------------------------------------------------------------------------
    # Folders and checkpoints

    def set_model_dir(self, model_dir: str, dataset_name: str, results_path: str | None = None) -> None:
        """Checkpoints go to ``<model_dir>/<dataset_name>/``, TensorBoard logs to its ``tb/``."""
        self.ckpt_dir = os.path.join(model_dir, dataset_name)
        self.tb_dir = os.path.join(self.ckpt_dir, "tb")
        os.makedirs(self.tb_dir, exist_ok=True)
        if results_path is not None:
            self.results_path = results_path
        self.logger = SummaryWriter(log_dir=self.tb_dir)

    def save_config(self, config: dict) -> str:
        """Write ``<class folder>/config.json``: what is needed to rebuild this model for inference."""
        path = os.path.join(self.ckpt_dir, CONFIG_NAME)
        utils.atomic_write(path, lambda tmp: utils.write_json(tmp, config))
        return path

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def best_checkpoint(self) -> Optional[str]:
        """Path of ``ckpt_best_<epoch>.pth`` in the class folder, if any (the highest epoch if several)."""
        found = [p for p in glob.glob(os.path.join(self.ckpt_dir, "ckpt_best_*.pth")) if BEST_CHECKPOINT_PATTERN.search(p)]
        if not found:
            return None
        return max(found, key=lambda p: int(BEST_CHECKPOINT_PATTERN.search(p).group(1)))

    def checkpoint_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The reference's checkpoint format: ``{"discriminator": ..., "pre_projection": ...}`` on CPU."""
        state = {"discriminator": {k: v.detach().cpu().clone() for k, v in self.discriminator.state_dict().items()}}
        if self.pre_proj > 0:
            state["pre_projection"] = {k: v.detach().cpu().clone() for k, v in self.pre_projection.state_dict().items()}
        return state

    def load_checkpoint(self, path: str) -> None:
        """Load a checkpoint written by this project or by the reference; refuse mismatching ones."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise GlassError(f"cannot read checkpoint {path} ({type(exc).__name__}): it is damaged or not a checkpoint; delete it and train again") from None
        if not isinstance(state, dict) or "discriminator" not in state:
            raise GlassError(f"{path} is not a GLASS checkpoint: it has no 'discriminator' entry")
        self._load_part(self.discriminator, state["discriminator"], "discriminator", path)
        if self.pre_proj > 0:
            if "pre_projection" not in state:
                raise GlassError(f"{path} has no 'pre_projection' entry but --pre_proj is {self.pre_proj}: use --pre_proj 0 or another checkpoint")
            self._load_part(self.pre_projection, state["pre_projection"], "pre_projection", path)

    @staticmethod
    def _load_part(module: torch.nn.Module, state: dict, part: str, path: str) -> None:
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise GlassError(
                f"{path}: {part} does not match this configuration (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "check --dsc_layers/--pre_proj"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise GlassError(
                    f"{path}: {part}.{key} has shape {tuple(value.shape)} but this configuration needs "
                    f"{tuple(expected[key].shape)}; check --target_embed_dimension/--dsc_hidden"
                )
        module.load_state_dict(state)

    # ----------------------------------------------------------------------------------------------
    # Features

    def _embed(self, images: torch.Tensor, evaluation: bool = False) -> Tuple[torch.Tensor, List[List[int]]]:
        """Patch embeddings (B * h * w, target_dim) of a batch and each layer's patch grid."""
        return self.embedder(images, evaluation=evaluation)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return self.pre_projection(features) if self.pre_proj > 0 else features

    # ----------------------------------------------------------------------------------------------
    # Training

    def trainer(self, training_data, val_data, name: str):
        """Train on ``training_data``, evaluating on ``val_data`` every ``eval_epochs``.

        Returns the best record ``[i_auroc, i_ap, p_auroc, p_ap, p_pro, epoch]``; ``None`` when a best
        checkpoint already exists (training is skipped); the judged flag (int) for ``--distribution 1``.
        """
        if self.best_checkpoint() is not None:
            LOGGER.info("%s: %s exists, skipping training", name, os.path.basename(self.best_checkpoint()))
            return None

        judge_only = self._choose_distribution(training_data, name)
        if judge_only:
            return self.svd

        ckpt_path_save = os.path.join(self.ckpt_dir, "ckpt.pth")
        best_record = None
        best_path = None
        summary = ""
        pbar = tqdm.tqdm(range(self.meta_epochs), unit="epoch", desc=name, dynamic_ncols=True)
        for epoch in pbar:
            self._compute_center(training_data)
            epoch_str = self._train_discriminator(training_data, epoch, pbar, summary)
            state = self.checkpoint_state()

            if (epoch + 1) % self.eval_epochs == 0:
                images, scores, segmentations, labels_gt, masks_gt = self.predict(val_data)
                result = self._evaluate(scores, segmentations, labels_gt, masks_gt, path="training")
                for tag, value in zip(("i-auroc", "i-ap", "p-auroc", "p-ap", "p-pro"), result):
                    self.logger.add_scalar(tag, value, epoch)

                if best_record is None or self._selection_score(result) > self._selection_score(best_record):
                    best_record = [*result, epoch]
                    new_best = os.path.join(self.ckpt_dir, f"ckpt_best_{epoch}.pth")
                    utils.atomic_torch_save(state, new_best)
                    if best_path is not None and best_path != new_best and os.path.exists(best_path):
                        os.remove(best_path)
                    best_path = new_best
                    self._write_heatmaps(images, segmentations, masks_gt, name, "eval")

                summary = " ".join(
                    f"{label}:{utils.format_metric(now)}({utils.format_metric(best)})"
                    for label, now, best in zip(("IAUC", "IAP", "PAUC", "PAP", "PRO"), result, best_record)
                ) + f" E:{epoch}({best_record[-1]})"
                pbar.set_description_str(f"{epoch_str} {summary}")

            utils.atomic_torch_save(state, ckpt_path_save)
        self.logger.flush()
        return best_record

    @staticmethod
    def _selection_score(record: Sequence[float]) -> float:
        """Model selection: image AUROC + pixel AUROC (pixel AUROC counts 0 where not available)."""
        pixel = record[2] if np.isfinite(record[2]) else 0.0
        return record[0] + pixel

    def _choose_distribution(self, training_data, name: str) -> bool:
        """Set ``self.svd`` from ``--distribution``; returns True when the run should only judge.

        1 = judge now and stop; 2 = manifold; 3 = hypersphere; 0 = the xlsx entry; 4 = its opposite.
        A class missing from the xlsx is judged, recorded and then trained in the same run.
        """
        choice = getattr(training_data.dataset, "distribution", 0)
        self.judged_distribution = None
        if choice == 1:
            self.svd = self._judge_distribution(training_data, name)
            self.judged_distribution = self.svd
            return True
        if choice in (2, 3):
            self.svd = 0 if choice == 2 else 1
            return False
        dataset_name = name.split("_")[0]
        found = utils.lookup_distribution(self.excel_dirs, dataset_name, name)
        if found is None:
            LOGGER.warning(
                "%s is not in any %s_distribution.xlsx (looked in %s): judging it now, recording the result and training with it",
                name, dataset_name, ", ".join(self.excel_dirs) or "nowhere",
            )
            self.svd = self._judge_distribution(training_data, name)
            self.judged_distribution = self.svd
        else:
            self.svd = found[0] if choice == 0 else 1 - found[0]
        LOGGER.info("%s: %s hypothesis (svd %d)", name, "hypersphere" if self.svd else "manifold", self.svd)
        return False

    def _judge_distribution(self, training_data, name: str) -> int:
        """Judge manifold vs hypersphere from the mean normalised training image (spec, "Training")."""
        total = None
        with torch.no_grad():
            for batch in training_data:
                batch_mean = batch["image"].to(torch.float).mean(dim=0)
                total = batch_mean if total is None else total + batch_mean
        mean_image = utils.torch_format_2_numpy_img((total / len(training_data)).cpu().numpy())
        judge_dir = os.path.join(self.results_path, "judge")
        flag = utils.distribution_judge(mean_image, name, output_dir=os.path.join(judge_dir, "fft"))
        avg_path = os.path.join(judge_dir, "avg", str(flag), f"{name}.png")
        os.makedirs(os.path.dirname(avg_path), exist_ok=True)
        cv2.imwrite(avg_path, mean_image)
        return flag

    def _compute_center(self, training_data) -> None:
        """Centre c: per patch position, the mean projected feature over each batch, averaged over batches."""
        self.embedder.eval()
        total = None
        with torch.no_grad():
            for batch in training_data:
                images = batch["image"].to(torch.float).to(self.device)
                features = self._project(self._embed(images)[0])
                batch_mean = features.reshape(images.shape[0], -1, features.shape[-1]).mean(dim=0)
                total = batch_mean if total is None else total + batch_mean
        self.c = total / len(training_data)

    def _train_discriminator(self, training_data, epoch: int, pbar, summary: str) -> str:
        """One epoch of discriminator (and projection) updates, stopping after more than ``limit`` samples."""
        self.embedder.eval()
        if self.pre_proj > 0:
            self.pre_projection.train()
        self.discriminator.train()

        history: Dict[str, List[float]] = {k: [] for k in ("loss", "p_true", "p_fake", "r_t", "r_g", "r_f")}
        sample_num = 0
        epoch_str = ""
        for batch in training_data:
            stats = self._train_step(batch)
            for key, value in stats.items():
                self.logger.add_scalar(key, value, self.global_step)
                history[key].append(value)
            self.global_step += 1
            sample_num += batch["image"].shape[0]

            means = {k: float(np.mean(v)) for k, v in history.items()}
            epoch_str = (
                f"epoch:{epoch} loss:{means['loss']:.2e} pt:{means['p_true'] * 100:.2f} pf:{means['p_fake'] * 100:.2f}"
                f" rt:{means['r_t']:.2f} rg:{means['r_g']:.2f} rf:{means['r_f']:.2f} svd:{self.svd} sample:{sample_num}"
            )
            pbar.set_description_str(f"{epoch_str} {summary}".strip())
            if sample_num > self.limit:
                break
        self.epoch_stats = {k: float(np.mean(v)) for k, v in history.items()}
        return epoch_str

    def _train_step(self, batch: dict) -> Dict[str, float]:
        """One optimisation step on a batch; returns the logged statistics."""
        self.dsc_opt.zero_grad()
        if self.pre_proj > 0:
            self.proj_opt.zero_grad()
        if self.train_backbone:
            self.backbone_opt.zero_grad()

        images = batch["image"].to(torch.float).to(self.device)
        aug = batch["aug"].to(torch.float).to(self.device)
        fake_feats = self._project(self._embed(aug)[0])
        true_feats = self._project(self._embed(images)[0])
        if self.pre_proj == 0 and not self.train_backbone:
            fake_feats.requires_grad_(True)
            true_feats.requires_grad_(True)

        mask_s_gt = batch["mask_s"].reshape(-1, 1).to(self.device)
        if mask_s_gt.shape[0] != true_feats.shape[0]:
            raise GlassError(
                f"the Perlin mask grid ({batch['mask_s'].shape[-2]}x{batch['mask_s'].shape[-1]}) does not match the "
                f"feature grid of layer {self.layers_to_extract_from[0]}: set --downsampling to the stride of that layer"
            )
        center = self.c.repeat(images.shape[0], 1, 1).reshape(-1, self.c.shape[-1])

        # r_t: the radius quantile of the distances of normal points (true + unmasked fake) to the centre.
        outside = mask_s_gt[:, 0] == 0
        true_points = torch.cat([fake_feats[outside], true_feats], dim=0)
        c_t_points = torch.cat([center[outside], center], dim=0)
        dist_t = torch.norm(true_points - c_t_points, dim=1)
        r_t = quantile_radius(dist_t, self.radius)

        gas = global_anomaly_synthesis(
            self.discriminator, true_feats, center, r_t,
            noise_std=self.noise, steps=self.step, svd=self.svd, mining=self.mining, radius=self.radius,
        )
        fake_feats, r_f = local_anomaly_synthesis(fake_feats, mask_s_gt, center, r_t, self.svd, self.radius)

        fake_scores = self.discriminator(fake_feats)
        hard_scores, hard_labels = hard_sample_mining(fake_scores, mask_s_gt, self.p)
        focal_loss = self.focal_loss(torch.cat([1 - hard_scores, hard_scores], dim=1), hard_labels)

        loss = gas.bce_loss + focal_loss
        if not torch.isfinite(loss):
            raise GlassError("the training loss became NaN/inf: lower --lr or check the input images; the best checkpoint so far is kept")
        loss.backward()
        if self.pre_proj > 0:
            self.proj_opt.step()
        if self.train_backbone:
            self.backbone_opt.step()
        self.dsc_opt.step()

        # Share of scores on the right side of the margin (masked fake scores count as anomalous).
        fake_scores = fake_scores.detach()
        pix_true = torch.cat([fake_scores * (1 - mask_s_gt), gas.true_scores.detach()])
        pix_fake = torch.cat([fake_scores * mask_s_gt, gas.gaus_scores.detach()])
        p_true = ((pix_true < self.dsc_margin).sum() - (pix_true == 0).sum()) / ((mask_s_gt == 0).sum() + len(gas.true_scores))
        p_fake = (pix_fake >= self.dsc_margin).sum() / ((mask_s_gt == 1).sum() + len(gas.gaus_scores))
        return {
            "loss": loss.item(),
            "p_true": p_true.item(),
            "p_fake": p_fake.item(),
            "r_t": r_t.item(),
            "r_g": gas.r_g.item(),
            "r_f": r_f.item(),
        }

    # ----------------------------------------------------------------------------------------------
    # Testing and inference

    def tester(self, test_data, name: str):
        """Evaluate the best checkpoint on ``test_data``: ``(i_auroc, i_ap, p_auroc, p_ap, p_pro, epoch)``."""
        path = self.best_checkpoint()
        if path is None:
            raise GlassError(
                f"no ckpt_best_*.pth in {self.ckpt_dir}: train first (--test ckpt) or point --results_path at the run that trained it"
            )
        self.load_checkpoint(path)
        images, scores, segmentations, labels_gt, masks_gt = self.predict(test_data)
        result = self._evaluate(scores, segmentations, labels_gt, masks_gt, path="eval")
        self._write_heatmaps(images, segmentations, masks_gt, name, "eval")
        epoch = int(BEST_CHECKPOINT_PATTERN.search(path).group(1))
        return (*result, epoch)

    def predict(self, dataloader):
        """Scores and maps for a whole loader: (images, scores, segmentations, labels_gt, masks_gt) as arrays."""
        images, scores, segmentations, labels_gt, masks_gt = [], [], [], [], []
        for batch in tqdm.tqdm(dataloader, desc="Inferring...", leave=False, unit="batch"):
            labels_gt.extend(np.asarray(batch["is_anomaly"]).tolist())
            if batch.get("mask_gt", None) is not None:
                masks_gt.append(batch["mask_gt"].numpy())
            images.append(batch["image"].numpy())
            batch_scores, batch_maps = self._predict(batch["image"])
            scores.extend(batch_scores)
            segmentations.extend(batch_maps)
        masks = np.concatenate(masks_gt) if masks_gt else np.zeros((0,))
        return np.concatenate(images), np.asarray(scores), np.stack(segmentations), np.asarray(labels_gt), masks

    @torch.no_grad()
    def _predict(self, images: torch.Tensor) -> Tuple[List[float], List[np.ndarray]]:
        """Image scores (max patch score) and smoothed anomaly maps for one batch."""
        images = images.to(torch.float).to(self.device)
        self.embedder.eval()
        if self.pre_proj > 0:
            self.pre_projection.eval()
        self.discriminator.eval()
        features, grids = self._embed(images, evaluation=True)
        patch_scores = self.discriminator(self._project(features))
        patch_scores = self.patch_maker.unpatch_scores(patch_scores, batchsize=images.shape[0])
        maps = self.anomaly_segmentor.convert_to_segmentation(patch_scores.reshape(images.shape[0], *grids[0]))
        image_scores = self.patch_maker.score(patch_scores).cpu().numpy()
        return list(image_scores), maps

    def _evaluate(self, scores, segmentations, labels_gt, masks_gt, path: str = "training") -> List[float]:
        """[i_auroc, i_ap, p_auroc, p_ap, p_pro]; AP and PRO only when ``path == "eval"`` (reference)."""
        scores = np.squeeze(np.asarray(scores))
        norm_scores = (scores - scores.min()) / (scores.max() - scores.min() + 1e-10)
        image_metrics = metrics.compute_imagewise_retrieval_metrics(norm_scores, labels_gt, path)

        masks = np.asarray(masks_gt)
        if masks.size == 0 or not np.any(masks > 0):
            nan = float("nan")
            return [image_metrics["auroc"], image_metrics["ap"], nan, nan, nan]
        segmentations = np.asarray(segmentations)
        norm_maps = (segmentations - segmentations.min()) / (segmentations.max() - segmentations.min() + 1e-10)
        pixel_metrics = metrics.compute_pixelwise_retrieval_metrics(norm_maps, masks, path)
        pixel_pro = metrics.compute_pro(np.squeeze(masks, axis=1) if masks.ndim == 4 else masks, norm_maps) if path == "eval" else 0.0
        return [image_metrics["auroc"], image_metrics["ap"], pixel_metrics["auroc"], pixel_metrics["ap"], pixel_pro]

    def _write_heatmaps(self, images, segmentations, masks_gt, name: str, folder: str) -> None:
        """``<results>/<folder>/<name>/NNN.png``: image | ground truth | jet-coloured normalised map."""
        segmentations = np.asarray(segmentations)
        norm_maps = (segmentations - segmentations.min()) / (segmentations.max() - segmentations.min() + 1e-10)
        out_dir = os.path.join(self.results_path, folder, name)
        os.makedirs(out_dir, exist_ok=True)
        masks = np.asarray(masks_gt)
        for i in range(len(images)):
            image = utils.torch_format_2_numpy_img(images[i])
            target = utils.torch_format_2_numpy_img(masks[i]) if masks.ndim == 4 else np.zeros_like(image)
            heat = cv2.resize(norm_maps[i], (image.shape[1], image.shape[0]))
            heat = cv2.applyColorMap((heat * 255).astype("uint8"), cv2.COLORMAP_JET)
            panel = cv2.resize(np.hstack([image, target, heat]), (256 * 3, 256))
            cv2.imwrite(os.path.join(out_dir, f"{i + 1:03d}.png"), panel)


def load_trained(class_dir: str, device: torch.device | str = "cpu", checkpoint: str | None = None) -> Tuple[GLASS, dict]:
    """Rebuild a trained model from its class folder (``<results>/models/backbone_<i>/<name>/``).

    Reads ``config.json`` written at training time, builds the backbone and GLASS, and loads
    ``checkpoint`` (default: the folder's ``ckpt_best_<epoch>.pth``). Returns the model and the config.
    """
    config_path = os.path.join(class_dir, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise GlassError(f"no {CONFIG_NAME} in {class_dir}: point at a class folder written by main.py (results/models/backbone_0/<dataset>_<class>)")
    config = utils.read_json(config_path)
    device = torch.device(device)
    backbone = backbones.load(config["backbone"])
    backbone.name, backbone.seed = config["backbone"], None
    model = GLASS(device)
    model.load(
        backbone=backbone,
        layers_to_extract_from=config["layers_to_extract_from"],
        device=device,
        input_shape=config["input_shape"],
        **{key: config["net"][key] for key in MODEL_OPTIONS},
    )
    model.ckpt_dir = class_dir
    path = checkpoint or model.best_checkpoint()
    if path is None:
        raise GlassError(f"no ckpt_best_*.pth in {class_dir}: train this class first")
    model.load_checkpoint(path)
    model.checkpoint_path = path
    return model, config
