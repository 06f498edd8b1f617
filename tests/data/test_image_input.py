"""The ``image`` input kind: schema shape checks, per-channel standardisation, save/load, collation,
the mfeat ``pix`` orientation on the real data, and a SYNTHETIC table through encoders + early fusion."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from attnfuse.data import InputSpec, SchemaError, TableDataset, TablePreprocessor, TableSchema, collate_fn, make_split, validate
from attnfuse.data.datasets import MFEAT_PIX_SHAPE, load_mfeat
from attnfuse.encoders import ImageEncoder, create_encoder, encode_inputs
from attnfuse.fusion import EarlyFusion

C, H, W = 2, 3, 4
PIX = [f"img_{k}" for k in range(C * H * W)]


def _table(n: int = 30, seed: int = 0) -> pd.DataFrame:
    """SYNTHETIC: images whose channel 1 is 10 + 3 * channel 0; rows 1 and 4 have a NaN pixel."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, C, H, W))
    img[:, 1] = 10 + 3 * img[:, 1]
    df = pd.DataFrame(img.reshape(n, -1), columns=PIX)
    df.loc[1, "img_5"] = np.nan
    df.loc[4, "img_23"] = np.nan
    df["a"] = rng.normal(size=n)
    df["b"] = rng.normal(size=n)
    df["y"] = rng.integers(0, 2, size=n)
    df.attrs["synthetic"] = True
    return df


def _schema(policy: str = "missing", shape: tuple[int, ...] = (C, H, W)) -> TableSchema:
    return TableSchema(
        inputs=[InputSpec("img", "image", PIX, nan_policy=policy, shape=shape), InputSpec("num", "numeric", ["a", "b"])],
        target="y",
    )


# --- schema -------------------------------------------------------------------------------------


def test_shape_is_normalised_to_chw_and_round_trips():
    spec = InputSpec("digit", "image", [f"p{i}" for i in range(12)], shape=(3, 4))
    assert spec.shape == (1, 3, 4) and spec == InputSpec("digit", "image", [f"p{i}" for i in range(12)], shape=[1, 3, 4])
    assert spec.to_dict()["shape"] == [1, 3, 4]
    schema = _schema()
    assert TableSchema.from_dict(schema.to_dict()) == schema
    yaml_form = {"target": "y", "inputs": {"img": {"kind": "image", "columns": PIX, "shape": [2, 3, 4]}}}
    assert TableSchema.from_dict(yaml_form)["img"].shape == (2, 3, 4)
    assert "shape" not in InputSpec("v", "vector", ["a"]).to_dict()  # other kinds keep their old dict form


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"columns": PIX}, r"needs shape=\(C, H, W\)"),
        ({"columns": PIX, "shape": (2, 3, 5)}, "holds 30 pixels but 24 columns"),
        ({"columns": PIX, "shape": (24,)}, r"\(C, H, W\) or \(H, W\)"),
        ({"columns": PIX, "shape": (1, 2, 3, 4)}, r"\(C, H, W\) or \(H, W\)"),
        ({"columns": PIX, "shape": (2, 0, 4)}, "positive integers"),
        ({"columns": PIX, "shape": (2, 3.0, 4)}, "positive integers"),
        ({"columns": PIX, "shape": "2x3x4"}, r"\(C, H, W\) or \(H, W\)"),
    ],
)
def test_bad_image_shape_is_a_clear_schema_error(kwargs, match):
    with pytest.raises(SchemaError, match=match):
        InputSpec("img", "image", **kwargs)


def test_shape_only_for_image_inputs():
    with pytest.raises(SchemaError, match="shape is only for image inputs"):
        InputSpec("v", "vector", ["a", "b"], shape=(1, 2))
    with pytest.raises(SchemaError, match="keys are name, kind, columns, nan_policy, shape"):
        TableSchema.from_dict({"target": "y", "inputs": {"img": {"kind": "image", "columns": PIX, "size": [2, 3, 4]}}})


def test_validate_image_columns_and_arrays():
    df = _table()
    validate(df, _schema())
    bad = df.assign(img_3="dark")
    with pytest.raises(SchemaError, match="'img_3' has dtype"):
        validate(bad, _schema())
    arr_schema = TableSchema(inputs=[InputSpec("img", "image", shape=(C, H, W))], target="y")
    validate(df, arr_schema, arrays={"img": np.zeros((len(df), C, H, W))})
    with pytest.raises(SchemaError, match=r"has shape \(30, 2, 4, 3\), expected \(N, 2, 3, 4\)"):
        validate(df, arr_schema, arrays={"img": np.zeros((len(df), C, W, H))})
    with pytest.raises(SchemaError, match="empty column group"):
        validate(df, arr_schema)
    with pytest.raises(SchemaError, match="nan_policy='error'"):
        validate(df, _schema("error"))


# --- preprocessing ------------------------------------------------------------------------------


def test_per_channel_standardisation_on_train_rows_and_missing_rows():
    df = _table()
    train = np.arange(20)
    pre = TablePreprocessor.fit(df, _schema(), rows=train)
    img = df[PIX].to_numpy().reshape(-1, C, H, W)
    usable = img[[r for r in train if r not in (1, 4)]]  # rows with a NaN pixel take no part
    mean, std = pre.stats["img"]
    np.testing.assert_allclose(mean, usable.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(std, usable.std(axis=(0, 2, 3)))
    assert mean[1] > 8 and std[1] > 2  # the channels really are standardised separately
    enc = pre.transform(df)
    x = enc.values["img"]
    assert x.shape == (30, C, H, W) and x.dtype == np.float32
    assert enc.present["img"].tolist() == [i not in (1, 4) for i in range(30)]
    assert (x[[1, 4]] == 0).all() and np.isfinite(x).all()  # absent: zeros, never NaN
    expected = (img - np.asarray(mean)[None, :, None, None]) / np.asarray(std)[None, :, None, None]
    np.testing.assert_allclose(x[0], expected[0], rtol=1e-5)
    # row-major: column img_k is channel k // 12, row (k % 12) // 4, column k % 4
    raw = TablePreprocessor.fit(df, _schema(), standardize=False).transform(df).values["img"]
    assert raw[0, 1, 2, 3] == np.float32(df.loc[0, "img_23"]) and raw[0, 0, 1, 0] == np.float32(df.loc[0, "img_4"])


def test_zero_policy_keeps_rows_present():
    df = _table()
    pre = TablePreprocessor.fit(df, _schema("zero"))
    enc = pre.transform(df)
    assert enc.present["img"].all()
    assert enc.values["img"][1, 0, 1, 1] == 0 and enc.values["img"][1, 0, 0, 0] != 0  # NaN pixel -> 0 (the mean)


def test_all_missing_training_images_is_an_error():
    df = _table()
    df.loc[:9, "img_0"] = np.nan
    with pytest.raises(SchemaError, match="missing in every training row"):
        TablePreprocessor.fit(df, _schema(), rows=np.arange(10))


def test_save_load_round_trip_and_encoder_configs(tmp_path):
    df = _table()
    pre = TablePreprocessor.fit(df, _schema(), rows=np.arange(20))
    path = tmp_path / "preprocessor.json"
    pre.save(path)
    back = TablePreprocessor.load(path)
    assert back.schema == pre.schema and back.schema["img"].shape == (C, H, W)
    np.testing.assert_allclose(back.stats["img"], pre.stats["img"])
    a, b = pre.transform(df), back.transform(df)
    np.testing.assert_array_equal(a.values["img"], b.values["img"])
    assert back.encoder_configs()["img"] == {"kind": "image", "channels": C, "height": H, "width": W}
    assert back.encoder_configs()["num"] == {"kind": "numeric", "num_features": 2}


def test_precomputed_image_arrays():
    df = _table()
    images = df[PIX].to_numpy().reshape(-1, C, H, W)
    schema = TableSchema(inputs=[InputSpec("img", "image", shape=(C, H, W))], target="y")
    pre = TablePreprocessor.fit(df, schema, arrays={"img": images}, rows=np.arange(20))
    from_columns = TablePreprocessor.fit(df, _schema(), rows=np.arange(20))
    np.testing.assert_allclose(pre.stats["img"], from_columns.stats["img"])
    enc = pre.transform(df, arrays={"img": images})
    np.testing.assert_array_equal(enc.values["img"], from_columns.transform(df).values["img"])
    assert pre.encoder_configs()["img"] == {"kind": "image", "channels": C, "height": H, "width": W}
    one = TableSchema(inputs=[InputSpec("gray", "image", shape=(H, W))], target="y")  # (N, H, W) for one channel
    enc = TablePreprocessor.fit(df, one, arrays={"gray": images[:, 0]}).transform(df, arrays={"gray": images[:, 0]})
    assert enc.values["gray"].shape == (30, 1, H, W) and enc.present["gray"].sum() == 29


def test_missing_image_columns_at_prediction():
    df = _table()
    pre = TablePreprocessor.fit(df, _schema())
    enc = pre.transform(df.drop(columns=[*PIX, "y"]), require_target=False, allow_missing_inputs=True)
    assert enc.values["img"].shape == (30, C, H, W) and not enc.present["img"].any() and (enc.values["img"] == 0).all()


# --- collation ----------------------------------------------------------------------------------


def test_collate_stacks_images_with_presence_mask():
    df = _table()
    ds = TableDataset.from_frame(df, _schema(), indices=np.arange(6))
    batch = collate_fn([ds[i] for i in range(6)])
    img = batch["inputs"]["img"]
    assert img["x"].shape == (6, C, H, W) and img["x"].dtype == torch.float32
    assert img["mask"].shape == (6,) and img["mask"].tolist() == [True, False, True, True, False, True]
    assert (img["x"][[1, 4]] == 0).all()
    records = [{"inputs": {"im": torch.ones(1, 2, 2)}}, {"inputs": {"im": torch.full((1, 2, 2), float("nan"))}, "present": {"im": False}},
               {"inputs": {"im": None}}]
    out = collate_fn(records)["inputs"]["im"]
    assert out["x"].shape == (3, 1, 2, 2) and out["mask"].tolist() == [True, False, False] and (out["x"][1:] == 0).all()
    with pytest.raises(ValueError, match="share one shape"):
        collate_fn([{"inputs": {"im": torch.ones(1, 2, 2)}}, {"inputs": {"im": torch.ones(1, 2, 3)}}])
    with pytest.raises(ValueError, match=r"an image \(C, H, W\)"):
        collate_fn([{"inputs": {"im": torch.ones(1, 1, 2, 2)}}])


# --- end to end ---------------------------------------------------------------------------------


def test_encoders_from_configs_then_early_fusion_backprop():
    """SYNTHETIC table with an image + a numeric input -> encoder_configs -> encoders -> EarlyFusion -> backward."""
    torch.manual_seed(0)
    df = _table()
    pre = TablePreprocessor.fit(df, _schema(), rows=np.arange(20))
    ds = TableDataset(pre.transform(df), np.arange(8))
    batch = collate_fn([ds[i] for i in range(8)])
    dim = 16
    encoders = {name: create_encoder(cfg.pop("kind"), dim=dim, **cfg) for name, cfg in pre.encoder_configs().items()}
    assert isinstance(encoders["img"], ImageEncoder) and encoders["img"].grid_size == (1, 1)
    fusion = EarlyFusion(sorted(encoders), dim, heads=2, depth=1)
    tokens = encode_inputs(encoders, batch["inputs"])
    assert tokens["img"].x.shape == (8, 1, dim) and tokens["img"].mask[:, 0].tolist() == batch["inputs"]["img"]["mask"].tolist()
    out = fusion(tokens)
    assert torch.isfinite(out.fused.x).all()
    out.fused.x[:, 0].square().sum().backward()
    for enc in encoders.values():
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    assert encoders["img"].stem[0].weight.grad.abs().sum() > 0
    # a sample whose image is absent is fused exactly as if the image were not passed
    with torch.no_grad():
        alone = fusion({"num": tokens["num"]}).fused.x[1]
        torch.testing.assert_close(fusion(tokens).fused.x[1, 0], alone[0])


# --- real data ----------------------------------------------------------------------------------


@pytest.mark.registry("mfeat")
def test_mfeat_pix_is_16_rows_by_15_columns():
    data = load_mfeat(views=["pix", "mor"])
    pix = data.views["pix"]
    # orientation: the right reshape makes vertical neighbours about as similar as horizontal ones;
    # the transposed layout (15 x 16) shears every digit, so "vertical" neighbours differ far more
    right, wrong = pix.reshape(-1, 16, 15), pix.reshape(-1, 15, 16)
    vdiff = np.abs(np.diff(right, axis=1)).mean()
    assert vdiff < 1.1 * np.abs(np.diff(right, axis=2)).mean() and vdiff < 0.75 * np.abs(np.diff(wrong, axis=1)).mean()
    ones = right[data.labels == 1].mean(axis=0)  # the mean "1" is an upright stroke in the middle columns
    assert 5 <= ones.mean(axis=0).argmax() <= 9 and ones.mean(axis=0).std() > 2 * ones.mean(axis=1).std()
    # the pipeline: schema(image_views=...) -> preprocessor -> batch (B, 1, 16, 15) in that orientation
    frame = data.to_frame()
    schema = data.schema(image_views={"pix": MFEAT_PIX_SHAPE})
    assert schema["pix"].kind == "image" and schema["mor"].kind == "vector"
    split = make_split(stratify=frame["label"].to_numpy(), seed=0)
    pre = TablePreprocessor.fit(frame, schema, rows=split.train)
    assert pre.encoder_configs()["pix"] == {"kind": "image", "channels": 1, "height": 16, "width": 15}
    rows = split.test[:4]
    batch = collate_fn([TableDataset(pre.transform(frame), rows)[i] for i in range(4)])
    x = batch["inputs"]["pix"]["x"]
    assert x.shape == (4, 1, 16, 15) and batch["inputs"]["pix"]["mask"].all()
    mean, std = pre.stats["pix"]
    expected = (right[rows] - mean[0]) / std[0]
    np.testing.assert_allclose(x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    tokens = ImageEncoder(1, 16, 15, 8)(x, batch["inputs"]["pix"]["mask"])
    assert tokens.x.shape == (4, 16, 8)
    with pytest.raises(ValueError, match="not among the chosen views"):
        data.schema(["mor"], image_views={"pix": MFEAT_PIX_SHAPE})
    with pytest.raises(SchemaError, match="holds 256 pixels but 240 columns"):
        data.schema(image_views={"pix": (16, 16)})
