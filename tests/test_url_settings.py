"""A deployment's URL setting written wrong (SEEDS_TF_URL_ALLOW=10.0.0.1/8, host bits set) made every
prediction a bare 500, uploads too: the server now says so at start, answers uploads, and refuses
URLs naming the setting. Through the real DEEPaaS app, an app of its own (DEEPaaS keeps one per
process, and this one's environment differs from the other modules')."""

import logging

from seeds_tf import api
from seeds_tf.core.paths import MODELS_ENV
from seeds_tf.data import sources
from tests.helpers import in_process_service, seed_photo

WRONG = "10.0.0.1/8"


def test_uploads_are_answered_and_urls_refused_naming_the_setting(tmp_path, session_roots, tiny_run):
    with in_process_service(tmp_path, session_roots, **{sources.ALLOW_ENV: WRONG}) as (app, roots, _):
        photo = seed_photo(roots).read_bytes()
        uploaded = app.predict({"image": ("seed.jpg", photo)})
        assert uploaded.status == 200, uploaded.body
        # Refused before anything is fetched: nothing listens on port 9 of loopback, and nothing is sent.
        refused = app.predict({}, urls="http://127.0.0.1:9/seed.jpg")
    assert refused.status == 422, refused.body
    assert refused.json()["field"] == "urls"
    assert refused.json()["message"] == (
        f"urls: this server fetches no URL until its operator corrects its setting {sources.ALLOW_ENV}: "
        f"'{WRONG}' is neither a host name nor a network or address: upload the image"
    )


def test_warm_says_which_setting_is_wrong(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(sources.ALLOW_ENV, WRONG)
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))  # no run: warm loads nothing
    with caplog.at_level(logging.ERROR, logger=api.__name__):
        api.warm()
    (record,) = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert record.getMessage() == (
        f"Predictions from URLs are refused until this setting is corrected: {sources.ALLOW_ENV}: "
        f"'{WRONG}' is neither a host name nor a network or address"
    )
