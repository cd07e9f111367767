"""Built-in motion set that needs no download: ``synthetic:motions[:COUNT]``.

Twelve actions on the SMPL skeleton (:mod:`.skeleton`), each with one exact caption
(:data:`CAPTIONS`), made by forward kinematics from joint-angle curves at 20 fps. Every motion
draws its own speed, stride, amplitudes, timing and small per-joint sway, so no two are alike:

==================================  =========================================================
caption                             motion (durations at 20 fps)
==================================  =========================================================
a person walks forward              a gait cycle of 0.85-1.1 Hz, hips +-18-30 deg, 3-6 s
a person runs forward               1.25-1.5 Hz, hips +-32-45 deg, knees to 90-115 deg, leaning
a person walks backward             the walking gait played backwards (steps go back)
a person turns left / right         walking while the heading turns 70-120 deg (left: toward
                                    the body's left, +X from +Z)
a person jumps                      crouch, take off, 0.3-0.45 s in the air, land, stand
a person squats down                stand, squat (hips 95-115, knees 110-130 deg), hold
a person waves with the left /      raise that arm, forearm up, wave it side to side at
right hand                          1.8-2.8 Hz: the wrist above the head
a person raises both arms           both arms up over the head, hold, sometimes down again
a person kicks                      one leg (either) kicks forward to 60-90 deg and back
a person sits down                  stand, sit on an invisible seat (hips and knees ~90 deg)
==================================  =========================================================

Feet stay on the ground: each frame the lowest foot joint is the support, and the root moves
so that the support joint does not slide (the body walks *on* its feet; a walk backwards goes
backwards because its steps do); the lowest joint rests on the floor except in a jump's
flight, which follows a ballistic arc. Motions start at a random place and heading (the
features make them canonical). :func:`motions` yields them as shard samples: 263-d features
(``npy``), the caption (``txt``) and metadata (``json``: frames, fps, action).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .features import FPS, MAX_FRAMES, MIN_FRAMES, joints_to_features
from .skeleton import FEET, NUM_JOINTS, forward_kinematics, joint_index

__all__ = ["ACTIONS", "CAPTIONS", "DEFAULT_COUNT", "SOURCE", "motions", "render"]

ACTIONS: dict[str, str] = {
    "a person walks forward": "walk",
    "a person runs forward": "run",
    "a person walks backward": "walk_backward",
    "a person turns left": "turn_left",
    "a person turns right": "turn_right",
    "a person jumps": "jump",
    "a person squats down": "squat",
    "a person waves with the left hand": "wave_left",
    "a person waves with the right hand": "wave_right",
    "a person raises both arms": "raise_arms",
    "a person kicks": "kick",
    "a person sits down": "sit",
}
CAPTIONS: tuple[str, ...] = tuple(ACTIONS)
DEFAULT_COUNT = 2400  # 200 of each of the 12 actions
SOURCE = "synthetic:motions"

_J = {name: joint_index(name) for name in (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "neck", "head", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_collar", "right_collar",
)}  # fmt: skip
_ARM_DOWN = np.radians(72.0)  # arms hang this far below the T-pose
_GRAVITY = 9.81


def _rx(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    r = np.zeros((*np.shape(a), 3, 3))
    r[..., 0, 0] = 1.0
    r[..., 1, 1], r[..., 1, 2], r[..., 2, 1], r[..., 2, 2] = c, -s, s, c
    return r


def _ry(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    r = np.zeros((*np.shape(a), 3, 3))
    r[..., 1, 1] = 1.0
    r[..., 0, 0], r[..., 0, 2], r[..., 2, 0], r[..., 2, 2] = c, s, -s, c
    return r


def _rz(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    r = np.zeros((*np.shape(a), 3, 3))
    r[..., 2, 2] = 1.0
    r[..., 0, 0], r[..., 0, 1], r[..., 1, 0], r[..., 1, 1] = c, -s, s, c
    return r


def _ease(x: np.ndarray) -> np.ndarray:
    """Smooth 0 -> 1 over x in [0, 1] (clipped), zero slope at both ends."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _window(time: np.ndarray, start: float, rise: float, end: float, fall: float) -> np.ndarray:
    """0 before ``start``, easing up to 1 over ``rise`` s, 1 until ``end``, down over ``fall``."""
    return _ease((time - start) / rise) * (1.0 - _ease((time - end) / fall))


class _Pose:
    """Joint angles over T frames (radians), composed into local rotations at the end."""

    def __init__(self, frames: int, rng: np.random.Generator) -> None:
        self.frames = frames
        self.time = np.arange(frames) / FPS
        self.hip = {s: np.zeros(frames) for s in ("left", "right")}  # flexion (forward +)
        self.knee = {s: np.zeros(frames) for s in ("left", "right")}  # flexion (back +)
        self.foot = {s: np.zeros(frames) for s in ("left", "right")}  # toe up + (vs flat)
        self.arm_down = {s: np.full(frames, _ARM_DOWN) for s in ("left", "right")}  # lowered
        self.arm_forward = {s: np.zeros(frames) for s in ("left", "right")}  # swing forward +
        self.elbow = {s: np.full(frames, np.radians(rng.uniform(8, 20))) for s in ("left", "right")}
        self.forearm_up = {s: np.zeros(frames) for s in ("left", "right")}  # in the arm's plane
        self.lean = np.zeros(frames)  # torso forward +
        self.twist = np.zeros(frames)  # torso yaw
        self.heading = np.zeros(frames)  # the body's facing, radians about +Y (left +)
        # Small slow sway, different in every motion, so that no two poses repeat exactly.
        self.sway = {
            j: sum(rng.uniform(0.01, 0.035) * np.sin(2 * np.pi * rng.uniform(0.15, 0.6)
                   * self.time + rng.uniform(0, 2 * np.pi)) for _ in range(2))
            for j in ("spine2", "neck", "head", "left_collar", "right_collar")
        }  # fmt: skip

    def local(self) -> np.ndarray:
        """(T, 22, 3, 3) local rotations."""
        eye = np.broadcast_to(np.eye(3), (self.frames, 3, 3))
        local = np.array(np.broadcast_to(eye[:, None], (self.frames, NUM_JOINTS, 3, 3)))
        local[:, _J["pelvis"]] = _ry(self.heading) @ _ry(-0.4 * self.twist)
        local[:, _J["spine1"]] = _rx(0.4 * self.lean) @ _ry(0.3 * self.twist)
        local[:, _J["spine2"]] = _rx(0.3 * self.lean + self.sway["spine2"]) @ _ry(0.3 * self.twist)
        local[:, _J["spine3"]] = _rx(0.3 * self.lean) @ _ry(0.4 * self.twist)
        local[:, _J["neck"]] = _rx(-0.5 * self.lean + self.sway["neck"])
        local[:, _J["head"]] = _rx(self.sway["head"])
        for side, sign in (("left", 1.0), ("right", -1.0)):
            hip, knee = self.hip[side], self.knee[side]
            local[:, _J[f"{side}_hip"]] = _rx(-hip)
            local[:, _J[f"{side}_knee"]] = _rx(knee)
            # The foot stays level with the floor (plus its own angle): undo hip and knee.
            local[:, _J[f"{side}_ankle"]] = _rx(hip - knee - self.lean * 0.0 - self.foot[side])
            local[:, _J[f"{side}_collar"]] = _rz(sign * self.sway[f"{side}_collar"])
            # Lower the arm from the T-pose, then swing it forward in the body's frame.
            local[:, _J[f"{side}_shoulder"]] = _rx(-self.arm_forward[side]) @ _rz(
                -sign * self.arm_down[side]
            )
            local[:, _J[f"{side}_elbow"]] = _rz(sign * self.forearm_up[side]) @ _ry(
                -sign * self.elbow[side]
            )
        return local


def _gait(pose: _Pose, rng: np.random.Generator, *, run: bool, backward: bool = False,
          start: float = 0.0) -> None:  # fmt: skip
    """Add a walking (or running) gait from ``start`` seconds on."""
    frequency = rng.uniform(1.25, 1.5) if run else rng.uniform(0.85, 1.1)
    hip_amp = np.radians(rng.uniform(32, 45) if run else rng.uniform(18, 30))
    knee_amp = np.radians(rng.uniform(90, 115) if run else rng.uniform(45, 65))
    arm_amp = np.radians(rng.uniform(30, 50) if run else rng.uniform(12, 28))
    active = _ease((pose.time - start) / 0.4)
    phase = 2 * np.pi * frequency * np.clip(pose.time - start, 0, None) + rng.uniform(0, 2 * np.pi)
    if backward:
        phase = -phase
    for side, offset in (("left", 0.0), ("right", np.pi)):
        p = phase + offset
        pose.hip[side] += active * (hip_amp * np.sin(p) + (np.radians(10) if run else 0.0))
        # The knee bends while the leg swings forward (hip flexing): that lifts the foot.
        # Only in the swing (about 40 % of the cycle), so the stance leg stays the lowest.
        swing = np.clip((np.cos(p - (0.5 if not backward else -0.5)) - 0.3) / 0.7, 0, None)
        pose.knee[side] += active * (knee_amp * swing + np.radians(6))
        pose.foot[side] += active * np.radians(8) * np.sin(p)
        other = "right" if side == "left" else "left"
        pose.arm_forward[other] += active * arm_amp * np.sin(p)
    pose.twist += active * np.radians(6 if run else 4) * np.sin(phase)
    if run:
        pose.lean += active * np.radians(rng.uniform(10, 18))
        for side in ("left", "right"):
            pose.elbow[side] += active * np.radians(rng.uniform(55, 75))


def _walk(pose: _Pose, rng: np.random.Generator) -> None:
    _gait(pose, rng, run=False)


def _run(pose: _Pose, rng: np.random.Generator) -> None:
    _gait(pose, rng, run=True)


def _walk_backward(pose: _Pose, rng: np.random.Generator) -> None:
    _gait(pose, rng, run=False, backward=True)
    pose.lean -= np.radians(rng.uniform(0, 6))


def _turn(sign: float) -> Callable[[_Pose, np.random.Generator], None]:
    def turn(pose: _Pose, rng: np.random.Generator) -> None:
        _gait(pose, rng, run=False)
        total = pose.time[-1]
        start = rng.uniform(0.1, 0.3) * total
        length = rng.uniform(0.4, 0.6) * total
        pose.heading += (
            sign * np.radians(rng.uniform(70, 120)) * _ease((pose.time - start) / length)
        )

    return turn


def _jump(pose: _Pose, rng: np.random.Generator) -> np.ndarray:
    """Crouch, take off, fly, land. Returns the flight height over the ground (T,)."""
    t = pose.time
    takeoff = rng.uniform(0.6, 1.0)
    crouch_start = takeoff - rng.uniform(0.35, 0.5)
    flight = rng.uniform(0.3, 0.45)
    land = takeoff + flight
    depth = rng.uniform(0.7, 1.0)
    # Crouch before the take-off and after the landing; stretched legs in the air.
    crouch = _window(t, crouch_start, takeoff - crouch_start - 0.05, takeoff - 0.05, 0.08)
    crouch += _window(t, land - 0.02, 0.08, land + 0.12, rng.uniform(0.3, 0.5))
    air = _window(t, takeoff, 0.05, land - 0.08, 0.08)
    for side in ("left", "right"):
        pose.hip[side] += depth * np.radians(55) * crouch + np.radians(12) * air
        pose.knee[side] += depth * np.radians(85) * crouch + np.radians(25) * air
        pose.foot[side] -= np.radians(25) * air  # toes point down in the air
        pose.arm_forward[side] += np.radians(rng.uniform(40, 80)) * air - np.radians(30) * crouch
    pose.lean += np.radians(25) * depth * crouch
    rise = 0.5 * _GRAVITY * flight  # vertical take-off speed for that flight time
    s = np.clip(t - takeoff, 0, flight)
    return np.where((t > takeoff) & (t < land), rise * s - 0.5 * _GRAVITY * s * s, 0.0)


def _squat(pose: _Pose, rng: np.random.Generator) -> None:
    t = pose.time
    start = rng.uniform(0.3, 0.8)
    down = _window(t, start, rng.uniform(0.8, 1.3), t[-1] + 1, 1.0)
    if rng.random() < 0.4:  # sometimes stand up again at the end
        rise_at = t[-1] - rng.uniform(1.0, 1.4)
        down = _window(t, start, rng.uniform(0.8, 1.2), rise_at, 0.9)
    for side in ("left", "right"):
        pose.hip[side] += np.radians(rng.uniform(95, 115)) * down
        pose.knee[side] += np.radians(rng.uniform(110, 130)) * down
        pose.foot[side] += np.radians(-5) * down
        pose.arm_forward[side] += np.radians(rng.uniform(50, 85)) * down
    pose.lean += np.radians(rng.uniform(30, 45)) * down


def _sit(pose: _Pose, rng: np.random.Generator) -> None:
    t = pose.time
    start = rng.uniform(0.3, 0.8)
    length = rng.uniform(1.0, 1.6)
    down = _window(t, start, length, t[-1] + 1, 1.0)
    lean = _window(t, start, 0.5 * length, start + 0.6 * length, 0.6)  # lean in, then back
    for side in ("left", "right"):
        pose.hip[side] += np.radians(rng.uniform(82, 95)) * down
        pose.knee[side] += np.radians(rng.uniform(82, 95)) * down
        pose.arm_forward[side] += np.radians(rng.uniform(20, 40)) * down
        pose.elbow[side] += np.radians(rng.uniform(30, 50)) * down
    pose.lean += np.radians(rng.uniform(25, 35)) * lean + np.radians(-5) * down


def _wave(side: str) -> Callable[[_Pose, np.random.Generator], None]:
    def wave(pose: _Pose, rng: np.random.Generator) -> None:
        t = pose.time
        start = rng.uniform(0.2, 0.6)
        end = t[-1] - rng.uniform(0.3, 0.9)
        up = _window(t, start, rng.uniform(0.4, 0.7), end, 0.5)
        lift = np.radians(rng.uniform(30, 55))  # upper arm above the horizontal
        pose.arm_down[side] += (-_ARM_DOWN - lift) * up
        pose.elbow[side] *= 1 - up
        rate = rng.uniform(1.8, 2.8)
        waving = np.radians(rng.uniform(18, 30)) * np.sin(2 * np.pi * rate * (t - start))
        # The forearm stands up from the upper arm (to vertical), waving in the arm's plane.
        pose.forearm_up[side] += (np.pi / 2 - lift) * up + waving * up
        pose.arm_forward[side] += np.radians(rng.uniform(5, 20)) * up

    return wave


def _raise_arms(pose: _Pose, rng: np.random.Generator) -> None:
    t = pose.time
    start = rng.uniform(0.2, 0.7)
    end = t[-1] + 1 if rng.random() < 0.5 else t[-1] - rng.uniform(0.8, 1.2)
    up = _window(t, start, rng.uniform(0.6, 1.0), end, 0.7)
    high = np.radians(rng.uniform(70, 85))  # above the horizontal
    for side in ("left", "right"):
        pose.arm_down[side] += (-_ARM_DOWN - high) * up
        pose.elbow[side] *= 1 - 0.7 * up
        pose.arm_forward[side] += np.radians(rng.uniform(0, 15)) * up


def _kick(pose: _Pose, rng: np.random.Generator) -> None:
    t = pose.time
    side = "right" if rng.random() < 0.6 else "left"
    other = "left" if side == "right" else "right"
    start = rng.uniform(0.4, 0.9)
    length = rng.uniform(0.5, 0.8)
    swing = _window(t, start, 0.45 * length, start + 0.5 * length, 0.5 * length)
    chamber = _window(t, start - 0.1, 0.25 * length, start + 0.2 * length, 0.25 * length)
    pose.hip[side] += np.radians(rng.uniform(60, 90)) * swing
    pose.knee[side] += np.radians(rng.uniform(50, 80)) * chamber + np.radians(8) * swing
    pose.knee[other] += np.radians(10) * swing
    pose.lean -= np.radians(rng.uniform(5, 15)) * swing
    pose.arm_forward[other] += np.radians(rng.uniform(20, 45)) * swing
    pose.arm_forward[side] -= np.radians(rng.uniform(10, 30)) * swing


_MAKERS: dict[str, Callable[[_Pose, np.random.Generator], Any]] = {
    "walk": _walk,
    "run": _run,
    "walk_backward": _walk_backward,
    "turn_left": _turn(1.0),
    "turn_right": _turn(-1.0),
    "jump": _jump,
    "squat": _squat,
    "wave_left": _wave("left"),
    "wave_right": _wave("right"),
    "raise_arms": _raise_arms,
    "kick": _kick,
    "sit": _sit,
}
_SECONDS = {
    "walk": (3.0, 6.0), "run": (2.5, 5.0), "walk_backward": (3.0, 6.0), "turn_left": (3.5, 6.5),
    "turn_right": (3.5, 6.5), "jump": (2.0, 3.5), "squat": (2.5, 4.5), "wave_left": (2.5, 5.0),
    "wave_right": (2.5, 5.0), "raise_arms": (2.5, 4.5), "kick": (2.0, 3.5), "sit": (2.5, 4.5),
}  # fmt: skip
_FOOT_JOINTS = (*FEET["left"], *FEET["right"])


def _place(local: np.ndarray, flight: np.ndarray | None) -> np.ndarray:
    """World joints: the root moves so the lowest foot joint does not slide, and the lowest
    joint rests on the floor (plus ``flight`` in the air)."""
    frames = local.shape[0]
    body = forward_kinematics(local, np.zeros((frames, 3)))  # root at the origin
    root = np.zeros((frames, 3))
    feet = body[:, _FOOT_JOINTS]
    for t in range(1, frames):
        support = int(np.argmin(feet[t, :, 1]))
        slide = feet[t, support] - feet[t - 1, support]
        root[t, [0, 2]] = root[t - 1, [0, 2]] - slide[[0, 2]]
        if flight is not None and flight[t] > 0:  # in the air: keep the take-off speed
            root[t, [0, 2]] = root[t - 1, [0, 2]]
    root[:, 1] = -body[..., 1].min(axis=1)
    if flight is not None:
        root[:, 1] += flight
    return body + root[:, None]


def render(caption: str, rng: np.random.Generator) -> np.ndarray:
    """One motion of ``caption`` (one of :data:`CAPTIONS`): (T, 22, 3) float64 joint
    positions at 20 fps, 41 <= T <= 197 (40 to 196 feature frames), at a random place and
    heading."""
    if caption not in ACTIONS:
        raise ValueError(f"unknown caption {caption!r}; captions: {', '.join(CAPTIONS)}")
    action = ACTIONS[caption]
    low, high = _SECONDS[action]
    # One joint frame more than the features get: 40 to 196 feature frames.
    frames = int(np.clip(round(rng.uniform(low, high) * FPS), MIN_FRAMES + 1, MAX_FRAMES + 1))
    pose = _Pose(frames, rng)
    flight = _MAKERS[action](pose, rng)
    joints = _place(pose.local(), flight)
    heading = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(heading), np.sin(heading)
    turn = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    place = np.array([rng.uniform(-2, 2), 0.0, rng.uniform(-2, 2)])
    return joints @ turn.T + place


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as the bytes of a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def motions(count: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``count`` motions (default :data:`DEFAULT_COUNT`), the captions in turn, as shard
    samples: ``npy`` the (T - 1, 263) features, ``txt`` the caption, ``json`` metadata."""
    count = DEFAULT_COUNT if count is None else int(count)
    rng = np.random.default_rng(seed)
    for index in range(count):
        caption = CAPTIONS[index % len(CAPTIONS)]
        features = joints_to_features(render(caption, rng))
        yield {
            "__key__": f"motion-{index:06d}",
            "npy": npy_bytes(features),
            "txt": caption,
            "json": {
                "frames": len(features),
                "fps": FPS,
                "action": ACTIONS[caption],
                "source": SOURCE,
            },
        }
