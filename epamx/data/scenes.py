"""Procedural action scenes: COCO-17 stick figures performing a dozen actions, as keypoints and as RGB frames.

The embedded dataset (epamx.data.embedded) is built from these. Its classes are designed so that the two modalities
are complementary, as in real data:

- both streams see them: ``wave``, ``raise_arms``, ``clap``, ``squat``;
- only RGB tells the pairs apart (same motion, a different held object that keypoints do not carry):
  ``drink`` (red cup) / ``phone_call`` (blue phone), ``read`` (yellow book) / ``hold_tablet`` (green tablet);
- only the pose stream tells the pairs apart (same upper body, different legs, and the RGB camera frames the
  upper body of a person standing behind a desk, so the legs are never in view): ``hands_on_hips`` / ``march``,
  ``arms_out`` / ``side_kicks``.

Two views of one scene, as in real data where keypoints refer to the original video and the RGB clip is a
person-centred crop of it: the keypoints are in the coordinates of a wide view that holds the whole body
(``image_size`` square, the annotation's img_shape), the RGB frames show a closer view of the upper body (about
1.5x), centred on the actor.

A perfect pose-only model therefore reaches 10/12 (83%) top-1, as does a perfect RGB-only model; only the two
together can reach 100%. No class depends on left versus right, so a horizontal flip keeps every label.

Nuisances: position, size, speed and phase of the motion, which arm acts, keypoint noise and scores, missed
detections (coordinates and score 0, as PoseC3D writes them), sometimes a second, idle person, and random
background, clothing, skin, desk and lighting colours (muted, so that the held objects are the only vivid colours).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "render_clip"]

CLASSES = ("wave", "raise_arms", "clap", "squat", "drink", "phone_call", "read", "hold_tablet",
           "hands_on_hips", "march", "arms_out", "side_kicks")

# The standing pose in body units (height about 1, origin between the hips, y down, the person's left at +x).
_BASE = np.array([
    (0.0, -0.40), (0.025, -0.42), (-0.025, -0.42), (0.05, -0.41), (-0.05, -0.41),   # nose, eyes, ears
    (0.13, -0.30), (-0.13, -0.30), (0.15, -0.15), (-0.15, -0.15), (0.16, -0.01), (-0.16, -0.01),  # arms
    (0.08, 0.0), (-0.08, 0.0), (0.09, 0.24), (-0.09, 0.24), (0.09, 0.48), (-0.09, 0.48),  # legs
], dtype=np.float64)
_L_ELB, _R_ELB, _L_WRI, _R_WRI = 7, 8, 9, 10
_L_KNEE, _R_KNEE, _L_ANK, _R_ANK = 13, 14, 15, 16
_SIDE = {1: (_L_ELB, _L_WRI), -1: (_R_ELB, _R_WRI)}  # +1: the person's left arm (image right)

# Upper-body motions: (elbow, wrist) of the acting arm(s) at the two ends of the motion, mirrored for the other
# side; cycles per clip. "one": one arm (chosen at random), "both": both arms.
_UPPER = {
    "wave": ("one", ((0.26, -0.38), (0.20, -0.55)), ((0.26, -0.38), (0.38, -0.50)), 3.0),
    "raise_arms": ("both", ((0.15, -0.15), (0.16, -0.01)), ((0.27, -0.42), (0.31, -0.58)), 2.0),
    "clap": ("both", ((0.24, -0.20), (0.31, -0.23)), ((0.14, -0.17), (0.025, -0.22)), 4.0),
    "squat": ("both", ((0.17, -0.19), (0.13, -0.26)), ((0.17, -0.19), (0.13, -0.26)), 0.0),
    "to_mouth": ("one", ((0.15, -0.15), (0.16, -0.01)), ((0.19, -0.23), (0.05, -0.38)), 1.5),
    "in_front": ("both", ((0.16, -0.13), (0.08, -0.12)), ((0.16, -0.16), (0.09, -0.17)), 2.0),
    "on_hips": ("both", ((0.25, -0.13), (0.11, -0.02)), ((0.26, -0.14), (0.11, -0.03)), 2.0),
    "out": ("both", ((0.28, -0.31), (0.43, -0.31)), ((0.28, -0.28), (0.43, -0.25)), 2.0),
}
# class -> (upper motion, leg motion, held object)
_ACTIONS = {
    "wave": ("wave", "still", None), "raise_arms": ("raise_arms", "still", None), "clap": ("clap", "still", None),
    "squat": ("squat", "squat", None),
    "drink": ("to_mouth", "still", "cup"), "phone_call": ("to_mouth", "still", "phone"),
    "read": ("in_front", "still", "book"), "hold_tablet": ("in_front", "still", "tablet"),
    "hands_on_hips": ("on_hips", "still", None), "march": ("on_hips", "march", None),
    "arms_out": ("out", "still", None), "side_kicks": ("out", "kicks", None),
}
_OBJECTS = {  # colour, (half width, half height) in body units
    "cup": ((230, 20, 20), (0.09, 0.09)), "phone": ((20, 60, 250), (0.07, 0.12)),
    "book": ((250, 225, 20), (0.13, 0.09)), "tablet": ((20, 200, 50), (0.10, 0.10)),
}
_BONES = ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16))


def _wave(t: np.ndarray, cycles: float, phase: float) -> np.ndarray:
    """0 -> 1 -> 0 ``cycles`` times over t in [0, 1)."""
    return (1 - np.cos(2 * np.pi * (cycles * t + phase))) / 2


def _pose_sequence(rng: np.random.RandomState, action: str, frames: int):
    """(frames, 17, 2) body-unit keypoints of one performance, the held object (or None) and the wrist that holds
    it (the acting arm's)."""
    upper, legs, obj = _ACTIONS[action]
    arms, start, end, cycles = _UPPER[upper]
    speed = rng.uniform(0.75, 1.3)
    phase = rng.uniform(0, 1)
    t = np.arange(frames) / frames
    w = _wave(t, cycles * speed, phase)[:, None]
    pose = np.repeat(_BASE[None], frames, axis=0)
    sides = [int(rng.choice([-1, 1]))] if arms == "one" else [1, -1]
    for side in sides:
        elbow, wrist = _SIDE[side]
        for joint, a, b in ((elbow, start[0], end[0]), (wrist, start[1], end[1])):
            a, b = np.array(a), np.array(b)
            a[0] *= side
            b[0] *= side
            pose[:, joint] = a + (b - a) * w
    leg_w = _wave(t, 2.0 * speed, rng.uniform(0, 1))
    if legs == "squat":
        depth = 0.18 * leg_w[:, None]
        pose[:, :13, 1] += depth               # everything above the knees goes down, the feet stay
        knee_out = 0.10 * leg_w
        pose[:, _L_KNEE] = (pose[:, 11] + pose[:, _L_ANK]) / 2
        pose[:, _R_KNEE] = (pose[:, 12] + pose[:, _R_ANK]) / 2
        pose[:, _L_KNEE, 0] += knee_out
        pose[:, _R_KNEE, 0] -= knee_out
    elif legs in ("march", "kicks"):
        swing = np.sin(2 * np.pi * (2.0 * speed * t + phase))
        for knee, ankle, lift, side in ((_L_KNEE, _L_ANK, np.maximum(swing, 0), 1),
                                        (_R_KNEE, _R_ANK, np.maximum(-swing, 0), -1)):
            if legs == "march":
                pose[:, knee, 1] -= 0.18 * lift
                pose[:, ankle, 1] -= 0.32 * lift
            else:
                lift = np.sqrt(lift)  # the leg stays out longer than a sine would keep it
                pose[:, knee, 0] += side * 0.16 * lift
                pose[:, ankle, 0] += side * 0.36 * lift
                pose[:, ankle, 1] -= 0.14 * lift
    sway = rng.uniform(0, 0.02) * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * t + rng.uniform(0, 1)))
    pose[..., 0] += sway[:, None]
    return pose, obj, _SIDE[sides[0]][1]


def _idle_sequence(rng: np.random.RandomState, frames: int) -> np.ndarray:
    t = np.arange(frames) / frames
    pose = np.repeat(_BASE[None], frames, axis=0)
    pose[..., 0] += 0.015 * np.sin(2 * np.pi * (t + rng.uniform(0, 1)))[:, None]
    return pose


def _muted(rng: np.random.RandomState, low: int, high: int, tint: int = 30) -> Tuple[int, int, int]:
    """A desaturated colour: a grey level plus a small tint, so that only the held objects are vivid."""
    grey = rng.randint(low, high)
    return tuple(int(np.clip(grey + t, 0, 255)) for t in rng.randint(-tint, tint + 1, size=3))


def _draw_person(draw: ImageDraw.ImageDraw, kp: np.ndarray, size: float, clothes, skin, obj, hand: int) -> None:
    width = max(1, int(round(size * 0.06)))
    shoulders_hips = [tuple(kp[5]), tuple(kp[6]), tuple(kp[12]), tuple(kp[11])]
    draw.polygon(shoulders_hips, fill=clothes)
    for a, b in _BONES:
        draw.line([tuple(kp[a]), tuple(kp[b])], fill=clothes, width=width)
    head = (kp[1] + kp[2]) / 2
    r = size * 0.07
    draw.ellipse([head[0] - r, head[1] - r, head[0] + r, head[1] + r], fill=skin)
    for wrist in (9, 10):
        hr = max(1.0, size * 0.025)
        draw.ellipse([kp[wrist, 0] - hr, kp[wrist, 1] - hr, kp[wrist, 0] + hr, kp[wrist, 1] + hr], fill=skin)
    if obj is not None:
        colour, (hw, hh) = _OBJECTS[obj]
        if obj in ("book", "tablet"):  # held in both hands
            centre = (kp[9] + kp[10]) / 2 + np.array([0, -0.04 * size])
        else:
            centre = kp[hand] + np.array([0, -0.03 * size])
        box = [centre[0] - hw * size, centre[1] - hh * size, centre[0] + hw * size, centre[1] + hh * size]
        if obj == "cup":
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)


def render_clip(rng: np.random.RandomState, label: int, frames: int, image_size: int) -> Dict[str, np.ndarray]:
    """One clip of class ``label``: 'keypoint' (M, T, 17, 2) float32 image pixels, 'keypoint_score' (M, T, 17)
    float32, 'frames' (T, S, S, 3) uint8 RGB, with M = 1 or 2 persons (the actor first)."""
    action = CLASSES[label]
    s = float(image_size)
    # The camera frames the actor as the authors' person-cropped videos do: the figure fills most of the height.
    height = rng.uniform(0.78, 0.92) * s
    centre = np.array([rng.uniform(0.42, 0.58) * s, rng.uniform(0.48, 0.54) * s])
    pose, obj, hand = _pose_sequence(rng, action, frames)
    people: List[Tuple[np.ndarray, object]] = [(pose * height + centre, obj)]
    heights = [height]
    if rng.rand() < 0.2:  # an idle bystander at one side, smaller, partly outside the frame at times
        h2 = height * rng.uniform(0.5, 0.7)
        side = rng.choice([-1, 1])
        c2 = np.array([centre[0] + side * rng.uniform(0.36, 0.44) * s, centre[1] + rng.uniform(-0.05, 0.05) * s])
        people.append((_idle_sequence(rng, frames) * h2 + c2, None))
        heights.append(h2)

    keypoints, scores = [], []
    for (kp, _), h in zip(people, heights):
        noisy = kp + rng.normal(0, 0.008 * h, size=kp.shape)
        score = rng.uniform(0.55, 1.0, size=kp.shape[:2])
        missed = rng.rand(*kp.shape[:2]) < 0.03
        noisy[missed] = 0
        score[missed] = 0
        keypoints.append(noisy)
        scores.append(score)
    keypoint = np.stack(keypoints).astype(np.float32)
    keypoint_score = np.stack(scores).astype(np.float32)

    background = np.array(_muted(rng, 60, 200), dtype=np.float32)
    gradient = rng.uniform(-40, 40, size=3).astype(np.float32)
    ramp = np.linspace(0, 1, image_size, dtype=np.float32)[:, None, None]
    base = np.clip(background + gradient * ramp, 0, 255)
    base = np.broadcast_to(base, (image_size, image_size, 3)).astype(np.uint8)
    clothes = [_muted(rng, 20, 236) for _ in people]
    skin = [tuple(int(c) for c in np.array([224, 172, 130]) * rng.uniform(0.45, 1.1)) for _ in people]
    desk = tuple(int(c) for c in np.array([140, 90, 50]) * rng.uniform(0.5, 1.4))
    # The RGB camera: centred on the actor's upper body, zoomed in; everything below the desk's top is hidden.
    zoom = rng.uniform(1.45, 1.6)
    camera = np.array([centre[0], centre[1] - 0.24 * height]) + rng.normal(0, 0.02 * height, size=2)
    view = [((kp - camera) * zoom + s / 2, obj) for kp, obj in people]
    desk_top = (centre[1] + 0.05 * height - camera[1]) * zoom + s / 2
    contrast = rng.uniform(0.7, 1.0)
    out = np.empty((frames, image_size, image_size, 3), dtype=np.uint8)
    for t in range(frames):
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        for (kp, obj), h, c, sk in zip(view, heights, clothes, skin):
            _draw_person(draw, kp[t], h * zoom, c, sk, obj, hand)
        draw.rectangle([0, desk_top, image_size, image_size], fill=desk)
        frame = np.asarray(img, dtype=np.float32)
        frame = (frame - 128) * contrast + 128 + rng.normal(0, 3, size=frame.shape)
        out[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return {"keypoint": keypoint, "keypoint_score": keypoint_score, "frames": out}
