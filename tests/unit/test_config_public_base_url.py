"""api.public_base_url: the origin of the URLs the API hands out (never the request's Host header)."""

import pytest

from headshots.config import Config, ConfigError, load_config


@pytest.mark.parametrize("url", ["https://api.studio.example", "https://api.studio.example:8443/headshots/",
                                 "http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"])
def test_https_or_loopback_base_urls_are_accepted(url):
    assert Config.from_dict({"api": {"public_base_url": url}}).api.public_base_url == url


def test_unset_by_default():
    assert Config().api.public_base_url == ""


@pytest.mark.parametrize("url", ["http://api.studio.example", "http://10.0.0.5:8080"])
def test_plain_http_off_loopback_is_refused_naming_the_key(url):
    with pytest.raises(ConfigError, match=r"api.public_base_url .* is not on loopback, so it must start with https://"):
        Config.from_dict({"api": {"public_base_url": url}})


@pytest.mark.parametrize("url", ["api.studio.example", "ftp://api.studio.example", "https://", "https://u:p@x.example",
                                 "https://x.example/?a=1", "https://x.example/#top", "https://x.example:99999",
                                 "https://x .example"])
def test_anything_but_an_absolute_origin_with_a_path_is_refused(url):
    with pytest.raises(ConfigError, match=r"api.public_base_url must be an absolute URL such as https://"):
        Config.from_dict({"api": {"public_base_url": url}})


def test_environment_override(tmp_path):
    config = load_config(environ={"HEADSHOTS_HOME": str(tmp_path),
                                  "HEADSHOTS_API_PUBLIC_BASE_URL": "https://api.studio.example"})
    assert config.api.public_base_url == "https://api.studio.example"
    with pytest.raises(ConfigError, match="api.public_base_url"):
        load_config(environ={"HEADSHOTS_HOME": str(tmp_path), "HEADSHOTS_API_PUBLIC_BASE_URL": "http://x.example"})
