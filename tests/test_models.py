"""Model library: SEED2017 fidelity, DNN parameter matching, config JSON round trips,
self-contained .keras files, normalisation statistics and input validation."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from model.cnn import (
    SEED2017,
    SEED2017_PARAMS,
    CNNConfig,
    ConvSpec,
    DropoutSpec,
    PadSpec,
    PoolSpec,
    build_cnn,
    feature_shapes,
)
from model.configs import (
    DNNConfig,
    build_model,
    config_from_dict,
    config_to_dict,
    config_to_params,
)
from model.dnn import build_dnn, dnn_param_count, param_matched_dnn
from model.preprocessing import AugmentationConfig, pixel_statistics

RNG = np.random.default_rng(2017)


def _images(n: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, 48, 48, 1), dtype=np.uint8)


def _stats() -> tuple[np.ndarray, np.ndarray]:
    return pixel_statistics(_images(64))


TINY_CNN = CNNConfig(filters=(4, 8), convs_per_block=1, dense_units=(8,))


# ---------------------------------------------------------------- SEED2017


def test_seed2017_param_count_is_exact() -> None:
    assert build_cnn(SEED2017).count_params() == SEED2017_PARAMS == 3146503


def test_seed2017_conv_output_shapes() -> None:
    model = build_cnn(SEED2017)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    shapes = [tuple(layer.output.shape[1:]) for layer in convs]
    assert shapes == [(44, 44, 32), (19, 19, 64), (19, 19, 128), (9, 9, 256), (3, 3, 512)]
    assert [layer.kernel_size for layer in convs] == [(5, 5)] + [(3, 3)] * 4
    # The analytic walk agrees with Keras for every layer spec.
    conv_specs = [s for s in SEED2017.specs if isinstance(s, ConvSpec)]
    walked = [
        shape
        for shape, s in zip(feature_shapes(SEED2017), SEED2017.specs, strict=True)
        if isinstance(s, ConvSpec)
    ]
    assert len(conv_specs) == 5 and walked == shapes


def test_seed2017_layer_sequence_and_head() -> None:
    model = build_cnn(SEED2017)
    kinds = [type(layer).__name__ for layer in model.layers]
    expected = (
        ["InputLayer", "Rescaling"]
        + ["Conv2D", "ZeroPadding2D", "MaxPooling2D", "Dropout"]
        + ["Conv2D", "ZeroPadding2D", "Dropout"]
        + ["Conv2D", "AveragePooling2D", "ZeroPadding2D", "Dropout"]
        + ["Conv2D", "ZeroPadding2D", "AveragePooling2D", "Dropout"]
        + ["Conv2D", "ZeroPadding2D", "AveragePooling2D", "Dropout"]
        + ["Flatten"]
        + ["Dense", "Dropout"] * 3
        + ["Dense"]
    )
    assert kinds == expected
    head = model.get_layer("predictions")
    assert head.units == 7 and head.activation.__name__ == "softmax"
    assert model.input.shape == (None, 48, 48, 1) and model.output.shape == (None, 7)


# ---------------------------------------------------------------- DNN


def test_param_matched_dnn_hits_seed2017_within_one_percent() -> None:
    config = param_matched_dnn(3146503)
    assert len(config.hidden_units) == 3 and len(set(config.hidden_units)) == 1
    count = build_dnn(config).count_params()
    assert count == dnn_param_count(config.hidden_units)
    assert abs(count - 3146503) / 3146503 <= 0.01


@pytest.mark.parametrize(
    ("target", "depth", "kwargs"),
    [(200_000, 1, {}), (1_000_000, 2, {"batch_norm": True}), (5_000_000, 4, {"taper": 0.5})],
)
def test_param_matched_dnn_other_targets(target: int, depth: int, kwargs: dict) -> None:
    config = param_matched_dnn(target, depth=depth, **kwargs)
    assert len(config.hidden_units) == depth
    assert abs(build_dnn(config).count_params() - target) / target <= 0.01


def test_param_matched_dnn_rejects_impossible_targets() -> None:
    with pytest.raises(ValueError, match="target_params"):
        param_matched_dnn(1000)  # below even one hidden unit per layer
    with pytest.raises(ValueError, match="target_params"):
        param_matched_dnn(20_000, depth=3)  # width ~8: one unit more or less is > 1%
    with pytest.raises(ValueError, match="hidden_units"):
        param_matched_dnn(3146503, hidden_units=(10,))


# ---------------------------------------------------------------- configs


ROUND_TRIP_CONFIGS = [
    SEED2017,
    TINY_CNN,
    CNNConfig(
        filters=(32, 64, 128),
        convs_per_block=3,
        kernel_size=5,
        pooling="avg",
        batch_norm=True,
        dropout=0.3,
        dense_units=(),
        activation="elu",
        head_pooling="global_avg",
        normalization="standardize",
        augmentation=AugmentationConfig(flip=True, shift=0.1, rotation=0.05, zoom=0.2),
    ),
    CNNConfig(
        layers=(ConvSpec(8, 3, 2, "same"), PoolSpec("avg", 3, 1), PadSpec(2), DropoutSpec(0.1))
    ),
    DNNConfig(),
    DNNConfig(hidden_units=(), dropout=0.0, normalization="none"),
    DNNConfig(
        hidden_units=(100, 50),
        batch_norm=True,
        activation="gelu",
        augmentation=AugmentationConfig(flip=True),
    ),
]


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
def test_config_json_round_trip(config: CNNConfig | DNNConfig) -> None:
    data = config_to_dict(config)
    assert data["family"] == ("cnn" if isinstance(config, CNNConfig) else "dnn")
    text = json.dumps(data)
    rebuilt = config_from_dict(json.loads(text))
    assert rebuilt == config and type(rebuilt) is type(config)
    assert config_to_dict(rebuilt) == data
    params = config_to_params(config)
    assert params["model.family"] == data["family"] and all(
        isinstance(v, str) for v in params.values()
    )


def test_config_to_dict_shape_for_seed2017() -> None:
    data = config_to_dict(SEED2017)
    assert data["layers"][0] == {
        "type": "conv",
        "filters": 32,
        "kernel_size": 5,
        "strides": 1,
        "padding": "valid",
    }
    assert data["augmentation"] == {
        "flip": False,
        "shift": 0.0,
        "rotation": 0.0,
        "zoom": 0.0,
        "crop": 0,
    }
    assert data["dense_units"] == [512, 512, 512]


def test_config_from_dict_rejects_unknowns() -> None:
    with pytest.raises(ValueError, match="family"):
        config_from_dict({"family": "rnn"})
    with pytest.raises(ValueError, match="family"):
        config_from_dict({"filters": [8]})
    with pytest.raises(ValueError, match=r"unknown fields \['depth', 'width'\]"):
        config_from_dict({"family": "dnn", "width": 3, "depth": 2})
    with pytest.raises(ValueError, match=r"layers\[0\]\.type"):
        config_from_dict({"family": "cnn", "layers": [{"type": "lstm"}]})
    with pytest.raises(ValueError, match=r"augmentation: unknown fields \['blur'\]"):
        config_from_dict({"family": "cnn", "augmentation": {"blur": 1}})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"filters": (8, 0)}, r"filters\[1\]"),
        ({"filters": (8, True)}, r"filters\[1\]"),
        ({"filters": ()}, "filters"),
        ({"convs_per_block": 0}, "convs_per_block"),
        ({"pooling": "min"}, "pooling"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"batch_norm": 1}, "batch_norm"),
        ({"activation": "sigmoidish"}, "activation"),
        ({"normalization": "zscore"}, "normalization"),
        ({"head_pooling": "attention"}, "head_pooling"),
        ({"dense_units": 128}, "dense_units"),
        ({"filters": (8,) * 6}, "filters"),  # 48 / 2**6 < 1: the image vanishes
        ({"layers": (PadSpec(1),)}, "layers"),
        ({"layers": ({"type": "conv", "filters": 8, "kernel_size": 49},)}, "layers"),
        ({"augmentation": {"shift": 1.5}}, r"augmentation\.shift"),
        ({"augmentation": {"flip": "yes"}}, r"augmentation\.flip"),
    ],
)
def test_cnn_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CNNConfig(**kwargs)


def test_dnn_config_validation() -> None:
    with pytest.raises(ValueError, match=r"hidden_units\[0\]"):
        DNNConfig(hidden_units=(-3,))
    with pytest.raises(ValueError, match="dropout"):
        DNNConfig(dropout=2)
    with pytest.raises(ValueError, match="config"):
        build_cnn(DNNConfig())  # type: ignore[arg-type]


def test_config_size_range_tiny_to_ten_million() -> None:
    tiny = CNNConfig(filters=(8, 16, 32), convs_per_block=1, dense_units=())
    big = CNNConfig(filters=(64, 128, 256, 512), dense_units=(1024,))
    assert 5_000 <= build_model(tiny).count_params() <= 20_000
    assert 8_000_000 <= build_model(big).count_params() <= 12_000_000


# ---------------------------------------------------------------- preprocessing


def test_pixel_statistics_values_and_validation() -> None:
    images = _images(50)
    mean, variance = pixel_statistics(images)
    assert mean.shape == variance.shape == (48, 48, 1)
    assert mean.dtype == variance.dtype == np.float32
    np.testing.assert_allclose(mean, images.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(variance, images.astype(np.float64).var(0), rtol=1e-5)
    with pytest.raises(ValueError, match="dtype uint8"):
        pixel_statistics(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, 48, 48, 1\)"):
        pixel_statistics(images[:, :, :40])


def test_standardize_requires_and_uses_stats() -> None:
    config = CNNConfig(filters=(4,), convs_per_block=1, dense_units=(), normalization="standardize")
    with pytest.raises(ValueError, match="stats"):
        build_cnn(config)
    with pytest.raises(ValueError, match="stats"):
        build_dnn(DNNConfig(normalization="standardize"))
    with pytest.raises(ValueError, match="stats mean"):
        build_cnn(config, stats=(np.zeros((48, 48)), np.ones((48, 48))))
    mean = np.full((48, 48, 1), 100.0, np.float32)
    mean[0, 0, 0] = 10.0
    variance = np.full((48, 48, 1), 25.0, np.float32)
    model = build_cnn(config, stats=(mean, variance))
    probe = keras.Model(model.input, model.get_layer("normalize_standardize").output)
    images = _images(3)
    out = probe.predict(images, verbose=0)
    np.testing.assert_allclose(out, (images.astype(np.float32) - mean) / 5.0, rtol=1e-5, atol=1e-5)
    # The stats add no weights, so count_params matches the rescale variant.
    assert (
        model.count_params()
        == build_cnn(CNNConfig(filters=(4,), convs_per_block=1, dense_units=())).count_params()
    )


def test_rescale_and_none_normalization() -> None:
    images = _images(2)
    rescaled = build_dnn(DNNConfig(hidden_units=(4,)))
    probe = keras.Model(rescaled.input, rescaled.get_layer("normalize_rescale").output)
    np.testing.assert_allclose(probe.predict(images, verbose=0), images / 255.0, rtol=1e-6)
    raw = build_dnn(DNNConfig(hidden_units=(4,), normalization="none"))
    assert not any("normalize" in layer.name for layer in raw.layers)


def test_augmentation_layers_train_only() -> None:
    aug = AugmentationConfig(flip=True, shift=0.1, rotation=0.1, zoom=0.1)
    model = build_cnn(CNNConfig(filters=(4,), convs_per_block=1, dense_units=(), augmentation=aug))
    names = [layer.name for layer in model.layers]
    assert names[1:5] == ["augment_flip", "augment_shift", "augment_rotation", "augment_zoom"]
    probe = keras.Model(model.input, model.get_layer("augment_zoom").output)
    images = _images(4).astype(np.float32)
    np.testing.assert_array_equal(probe(images, training=False).numpy(), images)
    assert not np.allclose(probe(images, training=True).numpy(), images)
    partial = build_dnn(DNNConfig(augmentation=AugmentationConfig(flip=True)))
    assert [layer.name for layer in partial.layers if "augment" in layer.name] == ["augment_flip"]


def test_predicts_from_raw_uint8_pixels() -> None:
    model = build_model(TINY_CNN)
    images = _images(5)
    probs_uint8 = model.predict(images, verbose=0)
    probs_float = model.predict(images.astype(np.float32), verbose=0)
    assert probs_uint8.shape == (5, 7)
    np.testing.assert_allclose(probs_uint8.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs_uint8, probs_float, rtol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        CNNConfig(
            filters=(4, 8),
            convs_per_block=1,
            batch_norm=True,
            dense_units=(8,),
            normalization="standardize",
            augmentation=AugmentationConfig(flip=True, shift=0.1, rotation=0.05, zoom=0.1),
        ),
        DNNConfig(
            hidden_units=(16,),
            normalization="standardize",
            augmentation=AugmentationConfig(zoom=0.1),
        ),
    ],
    ids=["cnn", "dnn"],
)
def test_saved_keras_reloads_in_safe_mode_with_identical_predictions(
    tmp_path: Path, config: CNNConfig | DNNConfig
) -> None:
    model = build_model(config, stats=_stats())
    # Random positive weights (cheaper than a training step) so that BN moving statistics
    # and biases differ from their initial values and a reload that dropped them would show.
    model.set_weights(
        [RNG.uniform(0.5, 1.5, w.shape).astype(w.dtype) * 0.1 for w in model.get_weights()]
    )
    images = _images(16)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(
        reloaded.predict(images, verbose=0), model.predict(images, verbose=0)
    )
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in model.layers]
    assert not any(type(layer).__name__ == "Lambda" for layer in reloaded.layers)


def test_the_matched_dnn_is_one_config_with_seed2017s_parameter_count() -> None:
    """The search's fixed point and the `train` preset are the same DNN, sized to SEED2017."""
    from jobs.space import fixed_points, matched_dnn
    from jobs.train import preset_configs
    from model.configs import config_from_dict

    dnn = matched_dnn()
    assert abs(build_dnn(dnn, stats=_stats()).count_params() - SEED2017_PARAMS) <= 0.01 * (
        SEED2017_PARAMS
    )
    assert preset_configs()["dnn-matched"] == dnn
    (point,) = [p for p in fixed_points(("dnn",), 30, 2017, 0.25) if p.name == "dnn-matched"]
    assert config_from_dict(point.model) == dnn
    assert point.training.lr_schedule == "cosine"
    assert point.training.train_fraction == 1.0  # every row, whatever the explored share


def test_residual_cnn_adds_shortcuts_and_reloads_safely(tmp_path: Path) -> None:
    from model.configs import build_model

    config = CNNConfig(
        filters=(8, 16),
        convs_per_block=2,
        batch_norm=True,
        residual=True,
        head_pooling="global_avg",
        dense_units=(),
        augmentation=AugmentationConfig(flip=True, crop=4),
    )
    model = build_model(config)
    names = [layer.name for layer in model.layers]
    assert {"block1_add", "block2_add", "block1_shortcut", "block2_shortcut"} <= set(names)
    assert "augment_crop" in names
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 1)).astype("float32")
    path = tmp_path / "residual.keras"
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    assert np.allclose(again.predict(images, verbose=0), model.predict(images, verbose=0))
    # The crop (like every augmentation) is identity at inference.
    crop = model.get_layer("augment_crop")
    assert np.allclose(np.asarray(crop(images, training=False)), images)
    assert not np.allclose(np.asarray(crop(images, training=True)), images)
    with pytest.raises(ValueError, match="augmentation.crop"):
        AugmentationConfig(crop=20)
    with pytest.raises(ValueError, match="residual"):
        CNNConfig(residual="yes")


def test_image_cost_counts_macs_and_elementwise_outputs() -> None:
    from model.flops import epoch_work, image_cost

    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 48*48*4 outputs x 9 MACs each
    x = keras.layers.ReLU()(x)  # 48*48*4 elementwise
    x = keras.layers.Flatten()(x)  # free
    outputs = keras.layers.Dense(7)(x)  # 9216 x 7 MACs
    cost = image_cost(keras.Model(inputs, outputs))
    assert cost.macs == 48 * 48 * 4 * 9 + 9216 * 7
    assert cost.elements == 48 * 48 * 4
    assert (
        epoch_work(cost, 128, 0, 64) < epoch_work(cost, 128, 64, 64) < epoch_work(cost, 256, 0, 64)
    )
