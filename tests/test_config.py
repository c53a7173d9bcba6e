"""The configuration contract: documented keys, clear errors, paths anchored to the file."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dicom_node.config import Config, load_config

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


def test_pipelines_whose_series_numbers_meet_are_refused(tmp_path):
    path = tmp_path / "node.toml"
    second = '\n[[pipelines]]\nname = "second"\nmodel = "models/ct_body_demo"\nseries_number = 901\n'
    path.write_text(MINIMAL + second)
    with pytest.raises(ValidationError, match="'ct-demo' and 'second' would both write series number 901"):
        load_config(path)
    path.write_text(MINIMAL + second.replace("901", "910"))
    assert load_config(path).series_number(load_config(path).pipelines[1]) == 910


@pytest.mark.parametrize("total, receivers, shares", [(64, 1, [64]), (64, 3, [22, 21, 21]), (5, 2, [3, 2])])
def test_association_shares_add_up_to_max_associations(total, receivers, shares):
    from dicom_node.service import association_shares

    assert association_shares(total, receivers) == shares


@pytest.mark.parametrize("http, login_required", [
    ({}, False),
    ({"host": "0.0.0.0"}, True),
    ({"host": "0.0.0.0", "require_login": False}, True),  # listening beyond the machine cannot be made open
    ({"require_login": True}, True),
])
def test_the_http_surface_asks_for_credentials_beyond_loopback(http, login_required):
    assert Config.model_validate({"http": http}).http.login_required is login_required


def test_a_webhook_needs_an_http_url_and_known_events():
    with pytest.raises(ValidationError, match="url"):
        Config.model_validate({"webhooks": [{"url": "file:///etc/passwd"}]})
    with pytest.raises(ValidationError, match="events"):
        Config.model_validate({"webhooks": [{"url": "https://x.example/", "events": ["study.started"]}]})
    hook = Config.model_validate({"webhooks": [{"url": "https://x.example/"}]}).webhooks[0]
    assert hook.events == ["study.done", "study.failed", "delivery.dead"]


@pytest.mark.parametrize(("destination", "message"), [
    ({"type": "dicomweb"}, "a dicomweb destination has a url"),
    ({"type": "dicomweb", "url": "https://pacs/dicom-web", "ae_title": "PACS"}, "no ae_title, host, port or tls"),
    ({"type": "dicomweb", "url": "https://pacs/dicom-web", "username": "node"}, "username with password, or token"),
    ({"type": "dicomweb", "url": "https://pacs/dicom-web", "username": "node", "password": "p", "token": "t"},
     "username with password, or token"),
    ({"ae_title": "PACS", "host": "pacs", "port": 104, "url": "https://pacs"}, "no url"),
    ({"ae_title": "PACS", "host": "pacs"}, "ae_title, host and port"),
    ({"ae_title": "PACS", "host": "pacs", "port": 104, "ca": "ca.pem"}, "need tls = true"),
    ({"type": "dicomweb", "url": "ftp://pacs"}, "should match pattern"),
])
def test_a_destination_is_either_dimse_or_dicomweb_and_complete(destination, message):
    with pytest.raises(ValidationError, match=message):
        Config.model_validate({"destinations": [{"name": "pacs", **destination}]})
    web = Config.model_validate({"destinations": [{"name": "web", "type": "dicomweb", "url": "https://pacs/dicom-web",
                                                   "token": "t", "ca": "ca.pem"}]})
    assert web.destinations[0].address == "https://pacs/dicom-web"
