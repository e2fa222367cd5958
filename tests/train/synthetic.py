"""A small synthetic stand-in for the data pipeline's training API (epamx.data.build_dataset, build_loader,
BatchTransform), producing batches in the same format, so the training layer is tested on its own.

Each class has its own tint and bright square in the RGB frames and its own joint layout in the keypoints, plus
noise, so both streams can learn it in a few dozen iterations. Per-clip randomness comes only from the sampler's
``sample_seed`` (training) or the index (evaluation), as the real pipeline's does.

Also a script, for the tests that need separate processes (a killed run, torchrun):

    python synthetic.py OUT_DIR MODE [section.key=value ...]      train one stage, write OUT_DIR/weights.pt
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

import epamx  # noqa: F401  (registers the ops)
import epamx.data
from epamx.data.sampler import ClipSampler
from epamx.ops import render_heatmaps

NUM_CLASSES = 3
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class SyntheticClips(torch.utils.data.Dataset):
    def __init__(self, cfg, split: str, train: bool, modalities=("rgb", "pose"), per_class: int = 8):
        self.cfg, self.split, self.train, self.modalities = cfg, split, train, tuple(modalities)
        self.num_classes = NUM_CLASSES
        self.class_names = [f"action_{c}" for c in range(NUM_CLASSES)]
        self.size = NUM_CLASSES * per_class
        offset = 0 if split == cfg.train_split else 10_000
        layouts = np.random.default_rng(1234)
        self.layouts = layouts.uniform(0.2, 0.8, size=(NUM_CLASSES, 17, 2))  # each class's pose, image fractions
        self.offset = offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item):
        index, seed = item
        rng = np.random.default_rng(seed if self.train else self.offset + index)
        label = index % NUM_CLASSES
        cfg = self.cfg
        size, frames_p = cfg.frame_size, cfg.clip_len
        frames = frames_p // cfg.rgb_every
        sample = {"label": np.int64(label), "index": np.int64(index), "frame_dir": f"{self.split}/{index:05d}",
                  "img_shape": np.array([size, size], dtype=np.int64),
                  "flip": bool(self.train and rng.random() < cfg.flip_prob)}
        if "rgb" in self.modalities:
            imgs = rng.normal(110, 30, size=(frames, size, size, 3))
            imgs[..., label % 3] += 60
            q = size // 4
            y0, x0 = (label * q) % (size - q), (2 * label * q + q) % (size - q)
            imgs[:, y0:y0 + q, x0:x0 + q, :] += 70
            sample["imgs"] = np.clip(imgs, 0, 255).astype(np.uint8)
        layout = self.layouts[label] * size
        motion = np.linspace(0, 1, frames_p)[:, None, None] * rng.normal(0, 0.05 * size, size=(1, 1, 2))
        keypoint = layout[None] + motion + rng.normal(0, 0.02 * size, size=(frames_p, 17, 2))
        sample["keypoint"] = keypoint[None].astype(np.float32)                       # (M=1, T_p, V, 2)
        sample["keypoint_score"] = rng.uniform(0.6, 1.0, size=(1, frames_p, 17)).astype(np.float32)
        return sample


def build_dataset(cfg, split: str, train: bool, modalities=("rgb", "pose"), num_classes=None,
                  progress=True, pipeline="multimodal") -> SyntheticClips:
    if num_classes is not None and num_classes < NUM_CLASSES:
        raise ValueError(f"synthetic: label {NUM_CLASSES - 1} >= num_classes = {num_classes}")
    dataset = SyntheticClips(cfg, split, train, modalities)
    if num_classes is not None:  # as the real one: more classes than the labels use (a split may lack some)
        dataset.num_classes = num_classes
        dataset.class_names += [f"class_{i}" for i in range(NUM_CLASSES, num_classes)]
    return dataset


def build_loader(dataset, batch_size: int, train: bool, seed: int, workers: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    sampler = ClipSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       drop_last=train, pin_memory=pin_memory)


class BatchTransform(nn.Module):
    """uint8 frames -> normalised float (N, 3, T, H, W), flipped where 'flip'; keypoints -> heatmaps."""
    num_joints = 17

    def __init__(self, cfg, modalities=("rgb", "pose"), pipeline="multimodal"):
        super().__init__()
        self.cfg, self.modalities = cfg, tuple(modalities)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1, 1), persistent=False)

    def forward(self, batch, device, channels_last: bool = False):
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        flip = batch["flip"].to(device)
        imgs = heatmaps = None
        if "rgb" in self.modalities:
            imgs = batch["imgs"].to(device).permute(0, 4, 1, 2, 3).float()
            imgs = torch.where(flip.view(-1, 1, 1, 1, 1), imgs.flip(-1), imgs)
            imgs = ((imgs - self.mean) / self.std).contiguous(memory_format=fmt)
        if "pose" in self.modalities:
            scale = self.cfg.heatmap_size / self.cfg.frame_size
            kp = batch["keypoint"].to(device) * scale
            x = torch.where(flip.view(-1, 1, 1, 1), (self.cfg.heatmap_size - 1) - kp[..., 0], kp[..., 0])
            kp = torch.stack([x, kp[..., 1]], dim=-1)
            heatmaps = render_heatmaps(kp, batch["keypoint_score"].to(device), self.cfg.heatmap_size,
                                       sigma=self.cfg.sigma, eps=self.cfg.eps).contiguous(memory_format=fmt)
        return imgs, heatmaps, batch["label"].to(device)


def install(monkeypatch=None) -> None:
    """Put the stand-in in epamx.data; through pytest's ``monkeypatch`` when given, so the test undoes it."""
    for name, value in (("build_dataset", build_dataset), ("build_loader", build_loader),
                        ("BatchTransform", BatchTransform)):
        if monkeypatch is not None:
            monkeypatch.setattr(epamx.data, name, value, raising=False)
        else:
            setattr(epamx.data, name, value)


TINY = {
    # 4 RGB frames of 32x32 and 12 pose frames of 8x8: both streams end at 1x1, EPAM-Net's full widths.
    "data": {"clip_len": 12, "rgb_every": 3, "frame_size": 32, "heatmap_size": 8},
    "model": {"dropout": 0.5},
    "optim": {"lr_per_16": 0.02},
    "train": {"epochs": 2, "batch_size": 2, "workers": 0, "progress": False, "checkpoint_every_iters": 0,
              "eval_every_epochs": 1, "deterministic": True, "device": "cpu"},
}


def tiny_config(out_dir, mode: str = "epamnet", overrides=()):
    from epamx.config import config_from_dict

    raw = {k: dict(v) for k, v in TINY.items()}
    raw["train"].update(mode=mode, out_dir=str(out_dir))
    return config_from_dict(raw, overrides)


def bn_free_stream(seed: int = 0) -> nn.Module:
    """A PoseStream whose backbone is one 1x1x1 convolution: no batch norm, so N processes with batch B compute
    exactly the gradients one process with batch N * B does (DDP averages them)."""
    from epamx.models import ClassificationHead, PoseStream

    torch.manual_seed(seed)
    model = PoseStream(NUM_CLASSES, dropout=0.0)
    model.pose_backbone = nn.Sequential(nn.Conv3d(17, 8, 1), nn.ReLU())
    model.pose_cls_head = ClassificationHead(8, NUM_CLASSES, dropout=0.0, init_std=0.1)
    return model


def train_bn_free(batch_size: int, rank: int = 0, world_size: int = 1):
    """One epoch of the BN-free stream on the stand-in data (CPU); returns the wrapped model."""
    from epamx import distributed
    from epamx.train import cosine_schedule, train_one_epoch

    cfg = tiny_config("unused", "pose").data
    dataset = build_dataset(cfg, cfg.train_split, train=True, modalities=("pose",))
    loader = build_loader(dataset, batch_size, train=True, seed=0, workers=0, rank=rank, world_size=world_size)
    info = distributed.DistInfo(rank, world_size, rank, torch.device("cpu"))
    model = distributed.wrap_model(bn_free_stream(), info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    scheduler = cosine_schedule(optimizer, len(loader))
    train_one_epoch(model, loader, BatchTransform(cfg, ("pose",)), optimizer, scheduler, mode="pose",
                    device=torch.device("cpu"), epoch=0)
    return model


def main(argv) -> int:
    """``stage OUT_DIR MODE [overrides]``: run_stage on the stand-in, final weights to OUT_DIR/weights.pt (with
    SYNTHETIC_KILL_AT_STEP=k the process SIGKILLs itself after step k). ``bn-free OUT_DIR``: one DDP epoch of
    the BN-free stream, weights to OUT_DIR/bn_free.pt."""
    import os
    import signal
    from pathlib import Path

    from epamx import distributed
    from epamx.train import run_stage

    torch.set_num_threads(1)
    command, out_dir = argv[0], Path(argv[1])
    install()
    if command == "stage":
        mode, overrides = argv[2], argv[3:]
        kill_at = int(os.environ.get("SYNTHETIC_KILL_AT_STEP", "0"))

        def on_iteration(record):
            if record["step"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        result = run_stage(tiny_config(out_dir, mode, overrides), mode, out_dir / mode, on_iteration=on_iteration)
        if distributed.is_main() and not result.stopped:
            from epamx.train.checkpoint import load_checkpoint

            torch.save(load_checkpoint(result.final_checkpoint)["model"], out_dir / "weights.pt")
    elif command == "bn-free":
        info = distributed.init_distributed("cpu")
        model = train_bn_free(2, info.rank, info.world_size)
        if info.is_main:
            torch.save(distributed.unwrap(model).state_dict(), out_dir / "bn_free.pt")
    else:
        raise SystemExit(f"unknown command {command!r}")
    distributed.barrier()  # everything is written: leave the group together
    # Leave without destroying the gloo process group: a rank still tearing it down while its peer has exited can die
    # in std::terminate (SIGABRT, "terminate called without an active exception"), failing a finished run about one
    # time in five when torchrun jobs follow each other.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
