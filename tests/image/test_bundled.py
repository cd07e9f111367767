"""The bundled digits model (trained by `polydiff train` from shared/configs/image/digits.yaml)
ships in the package and draws the digit it is asked for."""

from __future__ import annotations

from PIL import Image

from polydiff.cli.main import main
from polydiff.core.modality import bundled_checkpoint
from polydiff.image.metrics import digit_agreement
from polydiff.image.pipeline import generate
from polydiff.image.recipe import ImageRecipe


def test_bundled_model_draws_each_asked_digit_recognisably():
    prompts = [f"a handwritten digit {d}" for d in range(10)]
    images = generate(prompts, num=2, seed=3)  # no checkpoint: the bundled default
    assert digit_agreement(images, [d for d in range(10) for _ in range(2)]) >= 0.9


def test_cli_generates_from_the_bundled_model_without_a_checkpoint(tmp_path, capsys):
    assert bundled_checkpoint(ImageRecipe).is_dir()
    out = tmp_path / "seven.png"
    assert (
        main(
            [
                "generate",
                "image",
                "--prompt",
                "a handwritten digit 7",
                "--out",
                str(out),
                "--num",
                "2",
                "--steps",
                "10",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "seven_0.png", "seven_0.png.json", "seven_1.png", "seven_1.png.json"
    ]  # fmt: skip
    assert digit_agreement([Image.open(tmp_path / "seven_0.png")], [7]) == 1.0
