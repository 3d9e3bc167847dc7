"""A missing file's message names the close names next to it (issue 19: a typo is the usual cause)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedspatial.shared.data.manifest import ManifestError, read_manifest
from fedspatial.shared.storage.hints import did_you_mean


def test_did_you_mean_names_close_siblings_only(tmp_path: Path) -> None:
    (tmp_path / "federation.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("")
    assert did_you_mean(tmp_path / "federaton.json") == f"; did you mean {tmp_path / 'federation.json'}?"
    assert did_you_mean(tmp_path / "config.yml") == f"; did you mean {tmp_path / 'config.yaml'}?"
    assert did_you_mean(tmp_path / "unrelated.txt") == ""
    assert did_you_mean(tmp_path / "no-such-folder" / "x.json") == ""


def test_manifest_errors_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "federation.json").write_text('{"sites": [')
    with pytest.raises(ManifestError, match=r"did you mean .*federation\.json\?.*fedspatial manifest"):
        read_manifest(tmp_path / "federaton.json")
    with pytest.raises(ManifestError, match=r"not valid JSON: .*json\.tool"):
        read_manifest(tmp_path / "federation.json")


def test_config_messages_name_the_fix(tmp_path: Path) -> None:
    from fedspatial.shared.config import ConfigError, load_config

    (tmp_path / "config.yaml").write_text("features:\n  n-top-features: 30\n  n-pcs: 50\n")
    with pytest.raises(ConfigError, match=r"did you mean .*config\.yaml\?"):
        load_config(tmp_path / "config.yml")
    with pytest.raises(ConfigError, match=r"n-pcs is 50, more than features.n-top-features \(30\).*--set features.n-pcs=30"):
        load_config(tmp_path / "config.yaml")
