"""The bundled motion model (trained by `polydiff train` on synthetic:motions) does what each
prompt says: a walk travels, a jump leaves the ground, a squat drops the pelvis, a wave
raises the right wrist above the head."""

import numpy as np
import pytest

from polydiff.core.modality import GenerationRequest, generate_files
from polydiff.motion.bvh import bvh_joints, read_bvh
from polydiff.motion.skeleton import joint_index

PROMPTS = ("a person walks forward", "a person jumps", "a person squats down",
           "a person waves with the right hand")  # fmt: skip


@pytest.fixture(scope="module")
def bvh_motions(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "m.bvh"
    paths = generate_files("motion", GenerationRequest.of(list(PROMPTS), seed=0), out)
    return [bvh_joints(read_bvh(p.read_text())) for p in paths]


def test_the_bundled_models_motions_do_what_their_prompts_say(bvh_motions):
    walk, jump, squat, wave = bvh_motions
    pelvis, head, wrist = joint_index("pelvis"), joint_index("head"), joint_index("right_wrist")
    assert np.linalg.norm(walk[-1, pelvis, [0, 2]] - walk[0, pelvis, [0, 2]]) > 1.0
    assert jump[..., 1].min(axis=1).max() > 0.08  # every joint in the air at once
    assert squat[0, pelvis, 1] - squat[:, pelvis, 1].min() > 0.25
    assert (wave[:, wrist, 1] - wave[:, head, 1]).max() > 0.1
    assert walk.shape == (80, 22, 3)  # the default 4 seconds at 20 fps
