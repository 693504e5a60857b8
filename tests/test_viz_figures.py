"""viz figure functions on tiny models: shapes, real content, numbers that can be wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import viz_helpers as h
from viz import confusion, curves, filters, saliency
from viz.blocks import Figure, render_markdown
from viz.facts import FilterSummary, ModelFacts, ReportFacts
from viz.figure_names import FigureKind
from viz.recipe import Phase, Recipe
from viz.report import build_blocks, write_reports
from viz.search import Anchor, seed2017_sentence
from viz.settings import VizSettings

NAMES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    csv = h.write_fer_csv(tmp_path_factory.mktemp("viz-data") / "fer.csv")
    images, labels, usage = h.load_csv_arrays(csv)
    return {
        "train_x": images[usage == "Training"],
        "train_y": labels[usage == "Training"],
        "val_x": images[usage == "PublicTest"],
        "val_y": labels[usage == "PublicTest"],
    }


@pytest.fixture(scope="module")
def cnn(data: dict[str, np.ndarray]):
    model = h.tiny_cnn()
    h.fit_briefly(model, data["train_x"], data["train_y"], (data["val_x"], data["val_y"]), 4)
    return model


@pytest.fixture(scope="module")
def dnn(data: dict[str, np.ndarray]):
    model = h.tiny_dnn()
    h.fit_briefly(model, data["train_x"], data["train_y"], (data["val_x"], data["val_y"]), 3)
    return model


def _close(size: tuple[int, int], expected: tuple[int, int]) -> bool:
    """Pixel sizes equal up to matplotlib's rounding of inches x dpi."""
    return all(abs(a - b) <= 1 for a, b in zip(size, expected, strict=True))


# ---------------------------------------------------------------- settings


def test_settings_defaults_match_the_mlproject_parameters() -> None:
    s = VizSettings()
    assert (s.run_id, s.data, s.split, s.out, s.filters_per_layer, s.layers) == (
        "",
        "data/fer2013.csv",
        "PublicTest",
        "",
        8,
        "",
    )
    assert s.layer_names() == []
    assert VizSettings(layers=" conv_1, conv_2 ,").layer_names() == ["conv_1", "conv_2"]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"filters_per_layer": 0}, "filters_per_layer: expected an int >= 1, found 0"),
        ({"ascent_steps": 2.5}, "ascent_steps"),
        ({"split": ""}, "split"),
        ({"layers": "conv 1"}, "layers"),
        ({"sanity_threshold": 1.5}, "sanity_threshold"),
    ],
)
def test_settings_reject_bad_values(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        VizSettings(**kwargs)


def test_cli_defaults_come_from_the_dataclass() -> None:
    from viz.main import build_parser

    parser = build_parser()
    args = parser.parse_args([])
    assert VizSettings(**vars(args)) == VizSettings()
    args = parser.parse_args(
        ["--run-id", "abc", "--filters-per-layer", "3", "--layers", "conv_1", "--out", "x"]
    )
    assert (args.run_id, args.filters_per_layer, args.layers, args.out) == ("abc", 3, "conv_1", "x")


# ---------------------------------------------------------------- architecture and curves


def test_architecture_table(cnn) -> None:
    rows = curves.architecture_rows(cnn)
    assert [r.name for r in rows] == [layer.name for layer in cnn.layers]
    assert sum(r.params for r in rows) == cnn.count_params()
    conv = next(r for r in rows if r.name == "conv_1")
    assert (conv.kind, conv.output_shape, conv.params) == ("Conv2D", "(None, 48, 48, 6)", 60)


def test_learning_curves_one_or_two_families(tmp_path: Path) -> None:
    def curve(family: str, run_id: str, values: list[float]) -> curves.Curve:
        steps = np.arange(1, len(values) + 1)
        return curves.Curve(
            curves.FamilyRun(run_id, family, max(values), 1234, "question 1" * (family == "cnn")),
            (steps, np.array(values) - 0.05),
            (steps, np.array(values)),
            explored_epochs=2 if family == "cnn" else None,
        )

    both = [curve("cnn", "a" * 32, [0.3, 0.4, 0.5]), curve("dnn", "b" * 32, [0.2, 0.25])]
    path = curves.plot_learning_curves(both, tmp_path / "two.png", "two families")
    assert h.png_size(path) == (1300, 500) and h.png_has_content(path)
    path = curves.plot_learning_curves(both[:1], tmp_path / "one.png", "CNN only")
    assert h.png_has_content(path)
    with pytest.raises(ValueError, match="at least one"):
        curves.plot_learning_curves([], tmp_path / "none.png", "none")


# ---------------------------------------------------------------- confusion


def test_confusion_counts_sum_to_split_and_pairs(cnn, data, tmp_path: Path) -> None:
    probs = confusion.predict_probabilities(cnn, data["val_x"])
    assert probs.shape == (len(data["val_y"]), 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    counts = confusion.confusion_counts(data["val_y"], probs.argmax(axis=1), 7)
    assert counts.sum() == len(data["val_y"])
    np.testing.assert_array_equal(counts.sum(axis=1), np.bincount(data["val_y"], minlength=7))
    path = confusion.plot_confusion(counts, NAMES, tmp_path / "cm.png", "tiny")
    assert h.png_size(path) == (1500, 640) and h.png_has_content(path)


def test_top_confused_pairs_are_row_normalised() -> None:
    counts = np.zeros((7, 7), dtype=np.int64)
    counts[1, 1], counts[1, 0] = 38, 12  # Disgust: 12 of 50 called Angry = 24 %
    counts[2, 2], counts[2, 4] = 80, 20  # Fear: 20 of 100 called Sad = 20 %
    counts[3, 3], counts[3, 6] = 990, 10
    pairs = confusion.top_confused_pairs(counts, NAMES, top=2)
    assert [str(p) for p in pairs] == ["Disgust → Angry 24 %", "Fear → Sad 20 %"]
    assert pairs[0].count == 12
    with pytest.raises(ValueError, match="expected classes in 0..6"):
        confusion.confusion_counts(np.array([0, 7]), np.array([0, 1]), 7)


# ---------------------------------------------------------------- saliency


def _examples(model, data):
    probs = confusion.predict_probabilities(model, data["val_x"])
    examples = saliency.pick_examples(data["val_y"], probs, 7)
    images, flat = saliency.example_batch(data["val_x"], examples)
    return examples, images, flat


def test_pick_examples_correct_and_wrong() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.full((5, 7), 0.01)
    probs[0, 0], probs[1, 2], probs[2, 1], probs[3, 1], probs[4, 5] = 0.9, 0.8, 0.6, 0.7, 0.5
    chosen = saliency.pick_examples(labels, probs, 7)
    assert chosen[0][0].index == 0 and chosen[0][1].index == 1 and chosen[0][1].predicted == 2
    assert chosen[1][0].index == 3  # the more confident of the two correct ones
    assert chosen[1][1].index == 4 and not chosen[1][1].correct
    assert chosen[2] == (None, None)


def test_saliency_maps_cnn(cnn, data, tmp_path: Path) -> None:
    examples, images, flat = _examples(cnn, data)
    targets = [e.predicted for e in flat]
    maps = saliency.compute_saliency(cnn, images, targets, smooth_samples=2, seed=1)
    k = len(flat)
    for values in (maps.vanilla, maps.smoothgrad, maps.gradcam):
        assert values.shape == (k, 48, 48)
        assert np.all(values.reshape(k, -1).std(axis=1) > 0), "a map is constant"
        assert values.min() >= 0 and values.max() <= 1 + 1e-6
    assert maps.gradcam_layer == "conv_2"
    # The model's own softmax must survive (tf-keras-vis modifies a clone).
    assert cnn.get_layer("predictions").activation.__name__ == "softmax"
    path = saliency.plot_saliency(images, examples, maps, NAMES, tmp_path / "sal.png", "t")
    # 7 classes x (input + 3 maps) x 2 sides of 1.6 in tiles, margins and gaps, at 100 dpi.
    assert _close(h.png_size(path), (1540, 1505))
    assert h.png_has_content(path, min_colours=200)


def test_saliency_dnn_skips_gradcam_and_sanity_check(dnn, data, tmp_path: Path) -> None:
    examples, images, flat = _examples(dnn, data)
    targets = [e.predicted for e in flat]
    maps = saliency.compute_saliency(dnn, images, targets, smooth_samples=2, seed=1)
    assert maps.gradcam is None and maps.gradcam_layer is None
    assert maps.vanilla.shape == (len(flat), 48, 48)
    check = saliency.sanity_check(dnn, images, targets, maps, 2, 0.2, 5, threshold=0.5)
    assert set(check.rho) == {"vanilla", "SmoothGrad"}
    for values in check.rho.values():
        assert values.shape == (len(flat),)
        assert np.all(np.isfinite(values)) and np.all(np.abs(values) <= 1)
    # Randomised weights differ, so maps must not be identical to the trained ones.
    assert not np.allclose(check.randomised_maps["vanilla"], maps.vanilla)
    path = saliency.plot_saliency(images, examples, maps, NAMES, tmp_path / "sal.png", "dnn")
    assert _close(h.png_size(path), (1190, 1505))  # no Grad-CAM column
    path = saliency.plot_sanity(images, maps, check, tmp_path / "sanity.png", "sanity")
    assert h.png_has_content(path, min_colours=200)


def test_spearman_and_warning_threshold() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((3, 48, 48))
    rho = saliency.spearman_per_image(a, a * 2 + 1)
    np.testing.assert_allclose(rho, 1.0)
    rho = saliency.spearman_per_image(a, 1 - a)
    np.testing.assert_allclose(rho, -1.0)
    constant = saliency.spearman_per_image(a, np.zeros_like(a))
    assert np.isnan(constant).all()
    check = saliency.SanityCheck({"vanilla": np.array([0.9, 0.7]), "x": np.array([0.1])}, 0.5)
    warnings = check.warnings()
    assert len(warnings) == 1 and warnings[0].startswith("vanilla: mean Spearman rho 0.80")


# ---------------------------------------------------------------- filters


def test_gradient_ascent_raises_activation(cnn, tmp_path: Path) -> None:
    result = filters.maximize_filters(cnn, "conv_2", [0, 1, 2, 3], steps=30, seed=3)
    assert result.images.shape == (4, 48, 48, 1)
    assert result.images.min() >= 0 and result.images.max() <= 255
    # A filter that barely fires on the noise (ReLU almost off) gets no gradient and the
    # regularisers may shrink it to 0; every filter that does fire must be driven up.
    alive = result.start_activation > 1e-3
    assert alive.sum() >= 2, f"too few filters respond to noise: {result.start_activation}"
    assert np.all(result.final_activation[alive] > result.start_activation[alive])
    assert result.final_activation.mean() > 1.2 * result.start_activation.mean()
    path = filters.plot_filter_ascent(result, tmp_path / "filters.png", "conv_2")
    assert _close(h.png_size(path), (885, 285))
    assert h.png_has_content(path)


def test_all_layers_ascend_in_one_batched_call(cnn, monkeypatch: pytest.MonkeyPatch) -> None:
    from tf_keras_vis.activation_maximization import ActivationMaximization

    calls = []
    original = ActivationMaximization.__call__

    def counting(self, score, seed_input=None, **kwargs):
        calls.append(np.asarray(seed_input).shape)
        return original(self, score, seed_input=seed_input, **kwargs)

    monkeypatch.setattr(ActivationMaximization, "__call__", counting)
    selection = {"conv_1": [0, 2], "conv_2": [1, 3, 5]}
    results = filters.maximize_layers(cnn, selection, steps=20, seed=4)
    assert calls == [(5, 48, 48, 1)], "expected ONE call with every selected filter"
    assert list(results) == ["conv_1", "conv_2"]
    for layer, result in results.items():
        assert result.filters == selection[layer]
        assert result.images.shape == (len(selection[layer]), 48, 48, 1)
        # Measured independently of the ascent's own bookkeeping.
        real = filters.activation_model(cnn, layer)
        np.testing.assert_allclose(
            filters.filter_means(real, result.images, result.filters),
            result.final_activation,
            rtol=1e-5,
        )
    assert results["conv_2"].final_activation.mean() > results["conv_2"].start_activation.mean()


def test_feature_maps_and_layer_selection(cnn, data, tmp_path: Path) -> None:
    maps = filters.feature_maps(cnn, "conv_2", data["val_x"][0], [0, 2, 5])
    assert maps.shape == (12, 12, 3)  # conv_2 sees the 4x4-pooled 12x12 maps
    with saliency.quiet_keras():
        full = filters.activation_model(cnn, "conv_2")(data["val_x"][:1].astype("float32"))
    np.testing.assert_allclose(maps, np.asarray(full)[0][..., [0, 2, 5]], rtol=1e-5)
    path = filters.plot_feature_maps(data["val_x"][0], maps, [0, 2, 5], tmp_path / "fm.png", "t")
    assert h.png_has_content(path)
    assert filters.select_layers(cnn, []) == ["conv_1", "conv_2"]
    assert filters.select_layers(cnn, ["conv_2"]) == ["conv_2"]
    with pytest.raises(ValueError, match=r"expected conv layer names from \['conv_1', 'conv_2'\]"):
        filters.select_layers(cnn, ["dense"])


def test_activation_layer_follows_batch_norm_and_relu() -> None:
    import keras

    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, name="c")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="act")(x)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(x))
    assert filters.activation_layer(model, "c") == "act"
    assert filters.activation_layer(model, "c2") == "c2"


# ---------------------------------------------------------------- report


def _model(run_id: str, recipe: Recipe | None) -> ModelFacts:
    return ModelFacts(
        run_id=run_id,
        name="cnn-fast-final",
        family="cnn",
        role="the search's champion",
        layers=[curves.LayerRow("conv_1", "Conv2D", "(None, 48, 48, 6)", 60)],
        params_total=1000,
        params_trainable=990,
        recipe=recipe,
        accuracy=0.25,
        best_val_accuracy=0.5,
    )


def test_report_renders_all_questions(tmp_path: Path) -> None:
    figures_dir = tmp_path / "figures"
    figures_dir.mkdir()
    from viz.plotting import plt, save_figure

    names = {}
    for kind, layer in (
        (FigureKind.LEARNING_CURVES, ""),
        (FigureKind.CONFUSION_MATRIX, ""),
        (FigureKind.SALIENCY, ""),
        (FigureKind.FILTERS, "conv_1"),
        (FigureKind.FEATURE_MAPS, "conv_1"),
    ):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [1, 0])
        save_figure(fig, figures_dir / kind.file_name(layer))
        names[kind.key(layer)] = kind.file_name(layer)
    phases = [
        Phase("explored", "e" * 32, "cnn-fast", 30, 0.25, 7177, "constant", 0.55),
        Phase("final", "r" * 32, "cnn-fast-final", 12, 1.0, 28709, "cosine", 0.5),
    ]
    recipe = Recipe([("optimizer", "adam, learning rate 0.001"), ("batch size", "64")], phases)
    cnn = _model("r" * 32, recipe)
    facts = ReportFacts(
        run_id="r" * 32,
        run_name="cnn-fast-final",
        family="cnn",
        model_name="tiny",
        params_total=1000,
        split="PublicTest",
        split_size=28,
        accuracy=0.25,
        best_val_accuracy=0.5,
        val_usage="PublicTest",
        data_source="x.csv",
        data_sha256="f" * 64,
        data_fraction=1.0,
        model_uri="",
        champion=cnn,
        cnn=cnn,
        seed2017=seed2017_sentence(None, None),
        family_best=[curves.FamilyRun("r" * 32, "cnn", 0.5, 1000, "question 1")],
        confused=[confusion.ConfusedPair("Disgust", "Angry", 3, 0.75)],
        recall={n: 0.5 for n in NAMES},
        sanity_rho={"vanilla": 0.7, "SmoothGrad": 0.2},
        sanity_threshold=0.5,
        sanity_warnings=["vanilla: mean Spearman rho 0.70 > 0.50"],
        gradcam_layer="conv_1",
        saliency_examples=10,
        filters=[FilterSummary("conv_1", "conv_1", [0, 1], 0.1, 0.4, 2)],
        ascent_steps=20,
        feature_map_caption="an image",
        figures=names,
        coursework_notes=["seed2017 trained 8 epoch(s) on 0.25 of the training rows"],
    )
    blocks = build_blocks(facts)
    assert {b.name for b in blocks if isinstance(b, Figure)} == set(names.values())
    text = render_markdown(blocks)
    for heading in ("## Summary", "## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert heading in text
    assert "## The model" not in text  # the champion is question 1's CNN: shown once
    assert "Disgust → Angry" in text and "75 %" in text and "rho 0.70" in text
    assert "Only these families have finished runs in this search: cnn" in text
    assert "differs from the recorded" in text  # 25 % recomputed vs 50 % recorded
    assert "seed2017 trained 8 epoch(s) on 0.25 of the training rows" in text  # said in words
    assert "| explored | cnn-fast | 30 | 7,177 (0.25 of the rows) | constant | 55.0 % |" in text
    assert "42 epochs in all" in text
    # No PrivateTest rows in the data: the summary says there is no held-out accuracy.
    assert "**Held-out accuracy**: none: `x.csv` has no PrivateTest rows" in text
    assert "runs:/" + "r" * 32 + "/mlflow_model" in text  # not a champion: its own URI
    md, html_path = write_reports(facts, tmp_path)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == len(names)
    assert page.count("<img ") == page.count('src="data:image/png;base64,')  # all embedded
    assert md.read_text() == text


def _anchor(**kwargs) -> Anchor:
    base = dict(
        run_id="s" * 32,
        status="finished",
        epochs=30,
        train_fraction=1.0,
        best_val_accuracy=0.61,
        refusal="",
        stop_reason="",
        error="",
        note="",
    )
    base.update(kwargs)
    return Anchor(**base)


def test_seed2017_sentence_says_what_happened() -> None:
    text = seed2017_sentence(_anchor(), 28709)
    assert "trained 30 epoch(s) on every training row (28,709 rows)" in text
    assert "61.0 %" in text and "every planned epoch" in text
    text = seed2017_sentence(_anchor(status="early_stopped", stop_reason="scheduler"), None)
    assert "the scheduler (ASHA) stopped it" in text
    refusal = "fits no worker: needs 9000 MiB, 4000 MiB per worker"
    text = seed2017_sentence(_anchor(status="does_not_fit", refusal=refusal), None)
    assert "was not started" in text and refusal in text
    assert "was not part of this search" in seed2017_sentence(None, None)


def test_figure_names_per_layer_and_not() -> None:
    assert FigureKind.SALIENCY.key() == "saliency"
    assert FigureKind.SALIENCY.file_name() == "saliency.png"
    assert FigureKind.FILTERS.key("block/conv") == "filters:block/conv"
    assert FigureKind.FILTERS.file_name("block/conv") == "filters_block_conv.png"
    with pytest.raises(ValueError, match="figure filters: expected a layer name"):
        FigureKind.FILTERS.key()
    with pytest.raises(ValueError, match="figure saliency: expected no layer"):
        FigureKind.SALIENCY.file_name("conv_1")
