"""The configuration contract: documented keys, clear errors, paths anchored to the file."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dicom_node.config import load_config

MINIMAL = """
[node]
ae_title = "DICOMNODE"
port = 11112
data_dir = "var"
stable_after = 10

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

[[pipelines]]
name = "ct-demo"
model = "models/ct_body_demo"
destinations = ["pacs"]
[pipelines.select]
Modality = "CT"
"""


def test_the_contract_of_the_architecture_note_loads(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(MINIMAL)
    config = load_config(path)
    assert config.node.data_dir == tmp_path / "var"
    assert config.pipelines[0].model == tmp_path / "models" / "ct_body_demo"
    assert config.pipelines[0].select == {"Modality": "CT"}
    assert config.destination("pacs").port == 4242


@pytest.mark.parametrize(
    "change, message",
    [
        (("stable_after = 10", "stable_afer = 10"), "stable_afer"),
        (('destinations = ["pacs"]', 'destinations = ["nowhere"]'), "unknown destinations"),
        (('ae_title = "DICOMNODE"', 'ae_title = "A_TITLE_FAR_TOO_LONG"'), "ae_title"),
    ],
)
def test_mistakes_are_refused_by_name(tmp_path, change, message):
    path = tmp_path / "node.toml"
    path.write_text(MINIMAL.replace(*change))
    with pytest.raises(ValidationError, match=message):
        load_config(path)
