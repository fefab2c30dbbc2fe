"""The local assets: the small preset's tokenizer splits digits, and a stale asset directory is rebuilt."""

import json

from rlfw.assets import BUILD_FILE, build_tokenizer, ensure_assets


def test_split_digits_tokenizes_every_digit_alone_and_round_trips():
    merged, split = build_tokenizer(seed=0), build_tokenizer(seed=0, split_digits=True)
    text = 'Compute "137 + 4 * 12".'
    assert all(len(t.strip("Ġ")) == 1 for t in split.tokenize(text) if any(c.isdigit() for c in t))
    assert any(len(t.strip("Ġ")) > 1 and t.strip("Ġ").isdigit() for t in merged.tokenize(text))
    assert split.decode(split(text)["input_ids"]) == text


def test_ensure_assets_rebuilds_a_directory_built_by_another_definition(tmp_path):
    out = ensure_assets(tmp_path / "tiny", seed=0, preset="tiny")
    spec = json.loads((out / BUILD_FILE).read_text())
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_assets(out, seed=0, preset="tiny") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == weights  # complete and current: reused
    (out / BUILD_FILE).write_text(json.dumps({**spec, "size": {**spec["size"], "hidden_size": 32}}))
    ensure_assets(out, seed=0, preset="tiny")
    assert json.loads((out / BUILD_FILE).read_text()) == spec
    assert (out / "model.safetensors").stat().st_mtime_ns != weights
