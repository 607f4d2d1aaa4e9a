"""The unified schema and validation of a parquet against its spec."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.config import load_config
from model.schema import UNIFIED_SCHEMA, SchemaError, validate_files, validate_schema

pytestmark = pytest.mark.unit


def test_unified_schema_satisfies_default_spec():
    validate_schema(UNIFIED_SCHEMA, load_config(None).dataset, "unified")


def test_labels_nullable_ids_not():
    assert UNIFIED_SCHEMA.field("checkout").nullable
    assert not UNIFIED_SCHEMA.field("item_id").nullable


def test_missing_column_names_file_column_and_type(tmp_path):
    spec = load_config(None).dataset
    table = UNIFIED_SCHEMA.empty_table().drop_columns(["item_id"])
    path = tmp_path / "part.parquet"
    pq.write_table(table, path)
    with pytest.raises(SchemaError) as err:
        validate_files([str(path)], spec)
    assert f"{path}: column 'item_id' is missing (expected int or string)" in str(err.value)


def test_wrong_type_names_expected_and_found(tmp_path):
    spec = load_config(None).dataset
    schema = UNIFIED_SCHEMA.set(
        UNIFIED_SCHEMA.get_field_index("device"), pa.field("device", pa.string())
    )
    path = tmp_path / "bad.parquet"
    pq.write_table(schema.empty_table(), path)
    with pytest.raises(SchemaError) as err:
        validate_files([str(path)], spec)
    assert "column 'device' has type string, expected int (a vocab_size feature; use " in str(
        err.value
    )


def test_string_ids_are_accepted_for_hashed_features(tmp_path):
    """user_id is hashed (hash_buckets): string, large_string and dictionary columns pass."""
    spec = load_config(None).dataset
    i = UNIFIED_SCHEMA.get_field_index("user_id")
    for t in (pa.string(), pa.large_string(), pa.dictionary(pa.int32(), pa.string())):
        path = tmp_path / f"{t}.parquet".replace("<", "_").replace(">", "_")
        pq.write_table(UNIFIED_SCHEMA.set(i, pa.field("user_id", t)).empty_table(), path)
        assert validate_files([str(path)], spec) == 1
