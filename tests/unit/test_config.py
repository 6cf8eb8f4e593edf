import pytest

from headshots.config import Config, ConfigError, load_config


def test_defaults_load_without_a_file(tmp_path):
    config = load_config(environ={"HEADSHOTS_HOME": str(tmp_path)})
    assert config.home == str(tmp_path)
    assert config.store.buckets["uploads"] == "headshots-uploads"
    assert config.ray.num_gpus == 2


def test_yaml_file_and_env_override(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  steps: 12\nstore:\n  bucket_outputs: acme-outputs\n")
    config = load_config(path, environ={"HEADSHOTS_TRAINING_STEPS": "40", "HEADSHOTS_HOME": str(tmp_path)})
    assert config.training.steps == 40
    assert config.store.bucket_outputs == "acme-outputs"


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  stepz: 12\n")
    with pytest.raises(ConfigError, match=r"stepz.*training.*allowed:.*steps"):
        load_config(path, environ={})


def test_wrong_type_names_key_and_value(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"training.steps must be an integer but is 'many'"):
        load_config(path, environ={})


def test_out_of_range_value_names_key_and_range():
    with pytest.raises(ConfigError, match=r"training.rank must be between 0 and 256 but is 300"):
        Config.from_dict({"training": {"rank": 300}})


def test_auto_training_profile_depends_on_the_base_model_and_explicit_values_win():
    training = Config.from_dict({"training": {"steps": 50}}).training
    tiny, real = training.resolved(tiny_model=True), training.resolved(tiny_model=False)
    assert (tiny.steps, tiny.rank) == (50, 4)
    assert (real.steps, real.rank, real.learning_rate) == (50, 16, 1e-4)


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="HEADSHOTS_TRAINING_STEPS='x'"):
        load_config(environ={"HEADSHOTS_TRAINING_STEPS": "x"})


def test_unknown_env_key_in_a_known_section_is_an_error():
    with pytest.raises(ConfigError, match="HEADSHOTS_STORE_ENDPIONT names no config key"):
        load_config(environ={"HEADSHOTS_STORE_ENDPIONT": "x:1"})


@pytest.mark.parametrize("endpoint", ["minio.internal:9000", "10.0.0.5:9000"])
def test_remote_store_requires_tls(endpoint):
    with pytest.raises(ConfigError, match="store.secure must be true"):
        Config.from_dict({"store": {"endpoint": endpoint}})
    assert Config.from_dict({"store": {"endpoint": endpoint, "secure": True}}).store.secure


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "localhost:9000", "[::1]:9000"])
def test_loopback_store_may_be_plain_http(endpoint):
    assert Config.from_dict({"store": {"endpoint": endpoint}}).store.endpoint == endpoint


def test_endpoint_with_scheme_is_refused():
    with pytest.raises(ConfigError, match="without a scheme"):
        Config.from_dict({"store": {"endpoint": "https://minio:9000", "secure": True}})
