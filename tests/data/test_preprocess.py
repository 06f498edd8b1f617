"""TablePreprocessor: presence masks per kind and NaN policy, train-only statistics, codes, classes, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnfuse.data import InputSpec, SchemaError, TablePreprocessor, TableSchema, embed_text_inputs, text_values


@pytest.fixture
def df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "a": [1.0, 2.0, np.nan, 4.0, 5.0],
            "b": [10.0, 20.0, 30.0, np.nan, 50.0],
            "c1": ["x", "y", None, "x", None],
            "c2": [1, 2, 3, 1, None],
            "t1": ["hello", None, "  ", "a", None],
            "t2": ["world", "b", None, None, None],
            "y": [3, 1, 2, 3, 1],
        }
    )


def _schema(policy: str = "missing") -> TableSchema:
    return TableSchema(
        inputs=[
            InputSpec("num", "numeric", ["a", "b"], nan_policy=policy),
            InputSpec("cat", "categorical", ["c1", "c2"], nan_policy=policy),
        ],
        target="y",
    )


def test_missing_policy_marks_absent_never_zero_fills(df):
    pre = TablePreprocessor.fit(df, _schema())
    enc = pre.transform(df)
    # numeric: any NaN in the group -> absent
    assert enc.present["num"].tolist() == [True, True, False, False, True]
    assert np.isfinite(enc.values["num"]).all() and (enc.values["num"][[2, 3]] == 0).all()
    # categorical: all null -> absent; one null -> reserved code 0
    assert enc.present["cat"].tolist() == [True, True, True, True, False]
    codes = enc.values["cat"]
    assert codes[2].tolist() == [0, 3] and codes[4].tolist() == [0, 0]
    assert codes[0, 0] == codes[3, 0] != 0 and codes[0, 1] == codes[3, 1] != 0


def test_categorical_all_null_row_is_absent():
    df = pd.DataFrame({"c1": ["x", None], "c2": ["u", None], "y": [0, 1]})
    schema = TableSchema(inputs=[InputSpec("cat", "categorical", ["c1", "c2"])], target="y")
    enc = TablePreprocessor.fit(df, schema).transform(df)
    assert enc.present["cat"].tolist() == [True, False] and enc.values["cat"][1].tolist() == [0, 0]


def test_zero_policy_keeps_rows_present(df):
    pre = TablePreprocessor.fit(df, _schema("zero"))
    enc = pre.transform(df)
    assert enc.present["num"].all() and enc.present["cat"].all()
    # NaN becomes 0 in the standardised space (the training mean)
    assert enc.values["num"][2, 0] == 0.0 and enc.values["num"][3, 1] == 0.0


def test_standardisation_uses_fit_rows_only(df):
    pre = TablePreprocessor.fit(df, _schema(), rows=[0, 1])
    mean, std = pre.stats["num"]
    np.testing.assert_allclose(mean, [1.5, 15.0])
    np.testing.assert_allclose(std, [0.5, 5.0])
    enc = pre.transform(df)
    np.testing.assert_allclose(enc.values["num"][4], [(5 - 1.5) / 0.5, (50 - 15) / 5], rtol=1e-6)


def test_unknown_category_maps_to_reserved_code(df):
    pre = TablePreprocessor.fit(df, _schema(), rows=[0, 1])  # knows c1 in {x, y}, c2 in {1, 2}
    new = df.assign(c1=["z", "y", "x", "x", "x"], c2=[2.0, 3.0, 1.0, 1.0, 2.0])  # 2.0 == 2
    codes = pre.transform(new).values["cat"]
    assert codes[:, 0].tolist() == [0, 2, 1, 1, 1]
    assert codes[:, 1].tolist() == [2, 0, 1, 1, 2]
    assert pre.encoder_configs()["cat"] == {"kind": "categorical", "cardinalities": [2, 2]}


def test_classes_and_unseen_class(df):
    pre = TablePreprocessor.fit(df, _schema())
    assert pre.classes == [1, 2, 3] and pre.num_classes == 3
    assert pre.transform(df).target.tolist() == [2, 0, 1, 2, 0]
    with pytest.raises(SchemaError, match=r"class\(es\) \['7'\] not seen"):
        pre.transform(df.assign(y=[1, 2, 3, 7, 1]))


def test_regression_target_float(df):
    schema = TableSchema(inputs=[InputSpec("num", "numeric", ["a"])], target="b", task="regression")
    enc = TablePreprocessor.fit(df.dropna(subset=["b"]), schema).transform(df.dropna(subset=["b"]))
    assert enc.target.dtype == np.float32 and enc.target.tolist() == [10.0, 20.0, 30.0, 50.0]


def test_text_values_and_embedded_arrays(df):
    assert text_values(df, ["t1", "t2"]) == ["hello\nworld", "b", None, "a", None]
    assert text_values(df, ["t1"], "zero") == ["hello", "", "", "a", ""]
    schema = TableSchema(inputs=[InputSpec("num", "numeric", ["a"]), InputSpec("txt", "text", ["t1", "t2"])], target="y")
    with pytest.raises(SchemaError, match="needs precomputed embeddings"):
        TablePreprocessor.fit(df, schema)
    seen = []

    def stub(texts):
        seen.extend(texts)
        return np.array([[len(t), 1.0] for t in texts], np.float32)

    arrays = embed_text_inputs(df, schema, stub)
    assert seen == ["hello\nworld", "b", "a"]
    pre = TablePreprocessor.fit(df, schema, arrays=arrays)
    enc = pre.transform(df, arrays=arrays)
    assert enc.present["txt"].tolist() == [True, True, False, True, False]
    assert enc.values["txt"][0].tolist() == [11.0, 1.0] and (enc.values["txt"][2] == 0).all()
    assert pre.encoder_configs()["txt"] == {"kind": "text", "embedding_dim": 2}


def test_vector_arrays_fixed_and_sequences():
    df = pd.DataFrame({"y": [0, 1, 0]})
    fixed = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, 4.0]])
    seqs = [np.ones((2, 3)), None, np.zeros((0, 3))]
    schema = TableSchema(inputs=[InputSpec("v", "vector", []), InputSpec("s", "vector", [])], target="y")
    arrays = {"v": fixed, "s": seqs}
    pre = TablePreprocessor.fit(df, schema, arrays=arrays)
    assert pre.sequences == ["s"] and pre.encoder_configs()["s"] == {"kind": "vector", "in_features": 3}
    enc = pre.transform(df, arrays=arrays)
    assert enc.present["v"].tolist() == [True, False, True] and np.isfinite(enc.values["v"]).all()
    assert enc.present["s"].tolist() == [True, False, False] and [len(a) for a in enc.values["s"]] == [2, 0, 0]
    with pytest.raises(SchemaError, match=r"expected \(N, 2\)"):
        pre.transform(df, arrays={"v": np.zeros((3, 5)), "s": seqs})


def test_missing_input_columns_at_predict_time(df):
    pre = TablePreprocessor.fit(df, _schema())
    new = df.drop(columns=["a", "b", "y"])
    enc = pre.transform(new, require_target=False, allow_missing_inputs=True)
    assert not enc.present["num"].any() and enc.values["num"].shape == (5, 2) and enc.target is None
    assert enc.present["cat"].tolist() == [True, True, True, True, False]


def test_save_load_roundtrip(df, tmp_path):
    pre = TablePreprocessor.fit(df, _schema(), rows=[0, 1, 3])
    pre.save(tmp_path / "pre.json")
    again = TablePreprocessor.load(tmp_path / "pre.json")
    a, b = pre.transform(df), again.transform(df)
    for name in a.values:
        np.testing.assert_array_equal(a.values[name], b.values[name])
    np.testing.assert_array_equal(a.target, b.target)
    assert again.schema == pre.schema and again.classes == pre.classes


def test_input_missing_in_every_training_row_is_a_schema_error():
    from attnfuse.data import SchemaError, TablePreprocessor, make_synthetic_table

    df, schema = make_synthetic_table(60, seed=0, missing_rate=0.0)
    df["num_3"] = float("nan")
    with pytest.raises(SchemaError, match="num_3"):
        TablePreprocessor.fit(df, schema)


# --- non-finite values are missing (issue 14) --------------------------------------------------------


@pytest.mark.parametrize("bad", [np.inf, -np.inf, 1e39, -3.5e38])
def test_non_finite_or_float32_overflow_is_missing_like_nan(df, bad):
    nan_df = df.assign(a=[1.0, np.nan, np.nan, 4.0, 5.0])
    bad_df = df.assign(a=[1.0, bad, np.nan, 4.0, 5.0])
    nan_pre, bad_pre = TablePreprocessor.fit(nan_df, _schema()), TablePreprocessor.fit(bad_df, _schema())
    assert bad_pre.stats == nan_pre.stats  # excluded from the statistics exactly like NaN
    nan_enc, bad_enc = nan_pre.transform(nan_df), bad_pre.transform(bad_df)
    assert bad_enc.present["num"].tolist() == nan_enc.present["num"].tolist() == [True, False, False, False, True]
    np.testing.assert_array_equal(bad_enc.values["num"], nan_enc.values["num"])
    assert bad_enc.values["num"].dtype == np.float32 and np.isfinite(bad_enc.values["num"]).all()


def test_non_finite_with_zero_policy_becomes_the_mean_and_stays_present(df):
    bad_df = df.assign(a=[1.0, np.inf, 3.0, 4.0, 1e39])
    enc = TablePreprocessor.fit(bad_df, _schema("zero")).transform(bad_df)
    assert enc.present["num"].all() and enc.values["num"][1, 0] == enc.values["num"][4, 0] == 0.0
    assert np.isfinite(enc.values["num"]).all()


def test_only_non_finite_training_values_is_a_schema_error(df):
    with pytest.raises(SchemaError, match=r"column\(s\) \['a'\] hold no finite value"):
        TablePreprocessor.fit(df.assign(a=[np.inf, -np.inf, 1e39, np.nan, np.inf]), _schema())


def test_predict_time_inf_is_absent_not_nan(df):
    pre = TablePreprocessor.fit(df, _schema())
    new = df.drop(columns=["y"]).assign(a=[np.inf, 2.0, 3.0, 1e300, 5.0], b=[1.0, 2.0, 3.0, 4.0, 5.0])
    enc = pre.transform(new, require_target=False)
    assert enc.present["num"].tolist() == [False, True, True, False, True] and np.isfinite(enc.values["num"]).all()


def test_huge_value_over_a_tiny_std_is_missing_not_inf():
    df = pd.DataFrame({"a": [0.0, 2e-6, 0.0, 2e-6], "b": [1.0, 2.0, 3.0, 4.0], "y": [0, 1, 0, 1]})
    schema = TableSchema(inputs=[InputSpec("num", "numeric", ["a", "b"])], target="y")
    pre = TablePreprocessor.fit(df, schema)  # a: std 1e-6
    new = df.assign(a=[0.0, 3e38, 1e-6, -3e38])  # finite float32, but 3e38 / 1e-6 is not
    enc = pre.transform(new)
    assert enc.present["num"].tolist() == [True, False, True, False] and np.isfinite(enc.values["num"]).all()


def test_image_and_array_inputs_treat_float32_overflow_as_missing():
    df = pd.DataFrame({f"p{k}": [0.0, 1.0, 1e39, 2.0] for k in range(4)} | {"y": [0, 1, 0, 1]})
    vec = np.array([[0.0, 1.0], [1e39, 0.0], [1.0, 2.0], [3.0, 4.0]])
    schema = TableSchema(inputs=[InputSpec("img", "image", [f"p{k}" for k in range(4)], shape=(2, 2)),
                                 InputSpec("vec", "vector")], target="y")
    enc = TablePreprocessor.fit(df, schema, arrays={"vec": vec}).transform(df, arrays={"vec": vec})
    assert enc.present["img"].tolist() == [True, True, False, True] and np.isfinite(enc.values["img"]).all()
    assert enc.present["vec"].tolist() == [True, False, True, True] and np.isfinite(enc.values["vec"]).all()
